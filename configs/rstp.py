"""UIT on RSTPReid with CLIP ViT-B/16 (default) or ViT-L/14, the paper's hyperparameters.

Run:
  python -m uit_jax.main --config=configs/rstp.py --workdir=runs/rstp \
      --config.data.manual_dir=/path/to/RSTPReid
  python -m uit_jax.main --config=configs/rstp.py:vit-l14 --workdir=runs/rstp_l14 ...

Expected (test, text-to-image, the SEN paper / its README, Delong-liu-bupt/SEN):
  61.60 R1, 81.75 R5, 88.05 R10, 48.62 mAP, 26.43 mINP (ViT-B/16; ViT-L/14: 62.70 R1, 49.89 mAP).
Our model selection uses the validation split, so figures may differ from the reference's test-set selection.
"""

from configs import common


def get_config(arg=None):
    return common.base_config("rstp", variant=arg or "vit-b16")
