"""The embedded default: UIT fine-tunes the project's pre-trained mini CLIP on the synthetic pedestrian set, on CPU.

Run (generates the synthetic set on first use, then fine-tunes, validates, tests and prints the results table):
  python -m uit_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

As the paper: CLIP weights loaded from a Hugging Face folder (`uit_jax/assets/clip-mini-synthetic`, pre-trained
by `experiments/pretrain_clip.py` on a corpus of other identities, street scenes and generic captions: contrastively,
then with masked words predicted from the image), then SDM at temperature 0.02 + ID + the triplet from step 0 +
text-guided restoration (weight 10), SEN's lr groups (x5 for the new modules, x2 / no decay for biases), random
erasing, SEN's caption masking and the key-word filter. Batch 128 as the paper. Only the learning rate, the number
of epochs and Adam's eps (1e-8: our weights are float32, not fp16) change for a 2.5M-parameter model on 2 cores
(see `_fine_tune`).

Variants (`--config=configs/synthetic.py:VARIANT`), used for the ablation (docs/results.md):
  full (default) | no_restoration | no_triplet | no_text_aug
  scratch: the from-scratch setup (random init of the `mini` preset, with its own recipe, no restoration; see
           `_scratch` and get_config)
  tiny: a seconds-long from-scratch smoke run, for tests

Expected figures (docs/results.md, with the commands): seed 0 test R1 82.21 (mAP 83.22, mINP 78.09) at the best
validation step, about 6 minutes on 2 CPU cores; seeds 0-2 R1 82.01 ± 0.93 (tools/seeds.py). From scratch
(`:scratch`): R1 about 52 over five seeds.
"""

import os

from configs import common

# The shipped pre-trained mini CLIP (Hugging Face layout); experiments/pretrain_clip.py rebuilds it.
PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uit_jax", "assets")
PRETRAINED = os.path.join(PRETRAINED, "clip-mini-synthetic")


def _cpu_sized(c):
    """Shapes shared by every variant: 128x64 images (8 x 4 patches of 16 px), 56 tokens, float32; batch 64 (the
    from-scratch recipe's; fine-tuning uses the paper's 128)."""
    c.model.stride = 16
    c.model.dtype = "float32"
    c.data.image_size = (128, 64)
    c.data.text_len = 56  # the synthetic captions: median 34 tokens, 99th percentile 52, longest 58
    c.batch_size = 64
    c.eval.every_epochs = 1
    c.eval.batch_size = 256
    c.checkpoint.every_steps = 500
    c.log.every_steps = 25


def _fine_tune(c):
    """The paper's recipe on the pre-trained mini CLIP; only lr, Adam's eps and the epochs change."""
    c.model_init = PRETRAINED
    c.batch_size = 128  # the paper's
    # The paper's lr 1e-5 is for ViT-B/16 over 60 epochs; a 2.5M-parameter model fine-tuned for 4 epochs learns
    # fastest at 3e-4 (a sweep of 1e-4, 3e-4, 1e-3 by validation R1: docs/results.md). The paper's Adam eps 1e-3
    # keeps its fp16 weights stable; ours are float32, where 1e-3 only damps small-gradient parameters.
    c.optim.lr = 3e-4
    c.optim.eps = 1e-8
    c.schedule.epochs = 4
    c.schedule.warmup_epochs = 0.5


def _scratch(c):
    """From scratch (random init of `mini`): the recipe that learns without pre-training (docs/results.md)."""
    c.model_init = ""
    c.model.preset = "mini"
    c.optim.lr = 3e-4
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.schedule.epochs = 3
    c.schedule.warmup_epochs = 0.4
    # SDM at temperature 0.02 (logit scale 50) sits at chance for hundreds of steps from a random init; 0.1 learns.
    c.model.temperature = 0.1
    # The hardest-negative triplet collapses a random embedding: it joins after the first epoch.
    c.loss.triplet_start_epochs = 1.0
    # A short run from scratch is far from over-fitting, and the reference's regularisers slow it down.
    c.data.erasing_prob = 0.0
    c.data.mlm_masking = False


def get_config(arg=None):
    variant = arg or "full"
    c = common.base_config("synthetic")
    _cpu_sized(c)
    if variant == "scratch":
        _scratch(c)
        # Ten minutes from scratch: no restoration (the step runs 1.5x faster), batch 128, lr 1e-3, temperature 0.2,
        # 8 epochs, no pad-and-crop and no key-word filter (the model under-fits); docs/results.md has the figures.
        c.batch_size = 128
        c.optim.lr = 1e-3
        c.loss.restoration = 0.0
        c.model.temperature = 0.2
        c.schedule.epochs = 8
        c.schedule.warmup_epochs = 0.5
        c.data.crop_pad = 0
        c.data.keyword_prob = 0.0
        return c
    if variant == "tiny":
        _scratch(c)
        c.model.preset = "tiny"
        c.model.stride = 8
        c.data.synthetic.train_ids = 24
        c.data.synthetic.val_ids = 8
        c.data.synthetic.test_ids = 8
        c.data.synthetic.images_per_id = 2
        c.batch_size = 16
        c.total_steps = 4
        c.eval.every_epochs = 0
        c.eval.batch_size = 64
        c.log.every_steps = 2
        c.checkpoint.every_steps = 2
        return c
    _fine_tune(c)
    if variant == "full":
        pass
    elif variant == "no_restoration":
        c.loss.restoration = 0.0
    elif variant == "no_triplet":
        c.loss.triplet = 0.0
    elif variant == "no_text_aug":
        c.data.keyword_prob = 0.0
    else:
        raise ValueError(
            f"Unknown synthetic variant {variant!r}: use full, no_restoration, no_triplet, no_text_aug, scratch or "
            "tiny."
        )
    return c
