"""UIT on ICFG-PEDES with CLIP ViT-B/16 (default) or ViT-L/14, the paper's hyperparameters.

Run:
  python -m uit_jax.main --config=configs/icfg.py --workdir=runs/icfg \
      --config.data.manual_dir=/path/to/ICFG-PEDES
  python -m uit_jax.main --config=configs/icfg.py:vit-l14 --workdir=runs/icfg_l14 ...

Expected (test, text-to-image, the SEN paper / its README, Delong-liu-bupt/SEN):
  64.56 R1, 80.49 R5, 85.88 R10, 40.80 mAP, 9.51 mINP (ViT-B/16; ViT-L/14: 66.76 R1, 44.28 mAP).
Our model selection uses the validation split, so figures may differ from the reference's test-set selection.
"""

from configs import common


def get_config(arg=None):
    return common.base_config("icfg", variant=arg or "vit-b16")
