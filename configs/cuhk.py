"""UIT on CUHK-PEDES with CLIP ViT-B/16 (default) or ViT-L/14, the paper's hyperparameters.

Run:
  python -m uit_jax.main --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.data.manual_dir=/path/to/CUHK-PEDES
  python -m uit_jax.main --config=configs/cuhk.py:vit-l14 --workdir=runs/cuhk_l14 ...

Expected (test, text-to-image, the SEN paper / its README, Delong-liu-bupt/SEN):
  75.00 R1, 89.98 R5, 94.09 R10, 67.23 mAP, 51.45 mINP (ViT-B/16; ViT-L/14: 76.64 R1, 69.19 mAP).
Our model selection uses the validation split, so figures may differ from the reference's test-set selection.
"""

from configs import common


def get_config(arg=None):
    return common.base_config("cuhk", variant=arg or "vit-b16")
