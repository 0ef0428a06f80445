"""Shared config blocks for every dataset config: model, objectives, optimiser, schedule, mesh, eval, logging.

Each dataset file (`cuhk.py`, `icfg.py`, `rstp.py`, `synthetic.py`) builds its config from these blocks; there is
no inheritance between config files. Values are the paper's (SEN's published `run_SEN.sh`: batch 128, lr 1e-5,
60 epochs, cosine, mask ratio 0.7, loss weights sdm 1, id 1, triplet 10, restoration 10) unless a comment says why.
"""

import ml_collections

from uit_jax.data import defaults as data_defaults

# Launch variants selectable with `--config=configs/cuhk.py:VARIANT`.
# ViT-L/14 runs at 378x126: IRRA/SEN's patch conv (kernel 14, stride 14, no padding) on their 384x128 input sees a
# 27 x 9 grid, (384 - 14) // 14 + 1 and (128 - 14) // 14 + 1, i.e. the top-left 378x126 pixels, and drops the rest.
# We resize to exactly that grid instead (same 243 patches, same 3:1 aspect, no pixel dropped), which also tiles the
# image for the restoration targets.
VARIANTS = {
    "vit-b16": dict(preset="vit-b16", init="openai/clip-vit-base-patch16", stride=16, image_size=(384, 128)),
    # ViT-L/14 at batch 128 fits one 80 GB GPU only when each layer's activations are recomputed in the backward
    # pass (remat 'full', under scan, where XLA honours it): 25 GiB against 167 GiB (docs/benchmarks.md).
    "vit-l14": dict(
        preset="vit-l14",
        init="openai/clip-vit-large-patch14",
        stride=14,
        image_size=(378, 126),
        scan_layers=True,
        remat="full",
    ),
}


def model_config(variant: str = "vit-b16") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown model variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    v = VARIANTS[variant]
    return ml_collections.ConfigDict(
        dict(
            preset=v["preset"],  # CLIP size when model_init is None (random init); ignored otherwise.
            stride=v["stride"],  # patch-embedding stride (SEN: 16 for ViT-B/16, i.e. no overlap).
            drop_ratio=0.7,  # fraction of patches dropped for text-guided restoration (paper: 0.7).
            temperature=0.02,  # SDM / ITC temperature; logit scale is 1/temperature, fixed as in the reference.
            decoder_width=0,  # restoration decoder width; 0 means the CLIP embedding width (as SEN).
            decoder_heads=0,  # 0 means width // 64 (as SEN).
            decoder_layers=4,  # SEN's cmt_depth.
            decoder_residual=False,  # SEN drops the residual around the text cross-attention; True keeps it.
            mlm_layers=4,  # IRRA-style MLM head depth (only built when loss.mlm > 0).
            dtype="auto",  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU. Params stay float32.
            # Each tower's (and the decoder's) layers as a rolled jax.lax.scan rather than unrolled: XLA compiles one
            # layer, not 12/24; same parameters and maths (models/layers.blocks). Off by default: it compiles faster
            # but slows the CPU step (the mini step to 0.73x, docs/benchmarks.md); vit-l14 turns it on, for remat.
            scan_layers=v.get("scan_layers", False),
            # Per-layer rematerialisation: 'none', 'full' (recompute every activation) or 'dots' (keep matmul
            # outputs). Trades compute for activation memory (docs/benchmarks.md, the memory table).
            remat=v.get("remat", "none"),
            # Attention kernel, the same maths in each: 'auto' ('einsum' on CPU, 'xla' elsewhere), 'xla'
            # (jax.nn.dot_product_attention), 'einsum' (head-major, hand-written gradient, faster on XLA:CPU)
            # or 'cudnn' (cuDNN's fused flash attention; CUDA GPUs, bfloat16). docs/benchmarks.md has the times.
            attention="auto",
        )
    )


def loss_config() -> ml_collections.ConfigDict:
    # One weight per objective; weight 0 turns it off and skips its computation.
    return ml_collections.ConfigDict(
        dict(
            sdm=1.0,
            id=1.0,
            triplet=10.0,
            restoration=10.0,
            itc=0.0,
            mlm=0.0,
            triplet_margin=0.05,
            # The triplet joins the total from this epoch on (0: from the start, as the paper, which fine-tunes
            # CLIP). From scratch, hardest-negative mining collapses the embedding unless SDM has shaped it first.
            triplet_start_epochs=0.0,
            norm_pix=False,
        )
    )


# SEN's parameter groups: x5 lr for the randomly initialised classifier, MLM head and `cross*` modules (in our
# decoder, the text cross-attention and the transformer blocks after it; the decoder's embed/pred/norms stay x1,
# as in SEN), then x2 for every other bias. First match wins. IRRA's `mlm_head` is only the vocabulary head
# (dense, ln, fc); its cross-attention and blocks are `cross*` (bias x2) and its norms x1, as here.
# tests/test_optim.py checks every ViT-B/16 parameter against SEN's rule.
LR_RULES = (
    (r"^classifier/", 5.0),
    (r"^mlm_head/(dense|ln|fc)/", 5.0),
    (r"(^|/)bias$", 2.0),
    (r"(^|/)cross", 5.0),
)
# ... and no weight decay for biases (SEN's weight_decay_bias = 0).
NO_DECAY_RULES = (r"(^|/)bias$",)


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-3,  # the reference's Adam eps (it trains fp16 weights); a hyperparameter here.
            weight_decay=4e-5,  # coupled (added to the gradient) as torch.optim.Adam does.
            # Regex lr multipliers on the '/'-joined param path, first match wins; regexes of the parameters
            # without weight decay. The one table of parameter groups (uit_jax/optim.py applies it).
            lr_rules=LR_RULES,
            no_decay_rules=NO_DECAY_RULES,
            grad_clip=0.0,  # global-norm clipping; 0 disables (the reference does not clip).
        )
    )


def schedule_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(epochs=60, warmup_epochs=5.0, warmup_factor=0.1, end_lr_factor=0.0))


def base_config(dataset: str, variant: str = "vit-b16") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global batch of image-caption pairs (SEN's run_SEN.sh).
    c.data = data_defaults.data_config(dataset)
    c.model = model_config(variant)
    if dataset != "synthetic":
        c.data.image_size = VARIANTS[variant]["image_size"]
    # Hugging Face id or local folder (config.json + model.safetensors), or an OpenAI-format .pt file.
    # "" trains from a random init of `model.preset` (configs/synthetic.py:scratch does).
    c.model_init = VARIANTS[variant]["init"]
    c.tokenizer = ""  # tokenizer id/folder; empty: model_init's, or the synthetic set's own.
    c.loss = loss_config()
    c.optim = optim_config()
    c.schedule = schedule_config()
    # Device mesh: 'data' over all devices (-1); 'fsdp' > 1 shards large parameters (rules below).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.sharding_rules = ((".*", "fsdp"),)  # with fsdp=1 this replicates everything.
    c.eval = ml_collections.ConfigDict(
        dict(
            every_epochs=1.0,  # validation every N epochs (fractions allowed); <= 0 disables periodic eval.
            batch_size=512,
            # Which split selects the reported checkpoint: 'val' (config.data.val_split; ours, docs/design.md) or
            # 'test' (the papers' protocol, the best epoch on the test split: optimistic, and labelled as such in
            # results.json, the printed table and TensorBoard). The test split is always reported at the last step.
            select_on="val",
            # Cross-domain --mode=eval: the test split of another dataset (cuhk, icfg, rstp) in its official folder,
            # with its own split and id rules and the trained model's preprocessing; "" = the run's own dataset.
            dataset="",
            manual_dir="",  # that dataset's folder ("" = its default under $UIT_DATA_ROOT)
            data_dir=ml_collections.config_dict.placeholder(str),  # where its tfds build goes (None = tfds' default)
            tagger="",  # its POS tagger at build time, as data.tagger ("" = NLTK's)
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, async_save=True, max_nonfinite_in_row=20))
    c.log = ml_collections.ConfigDict(dict(every_steps=50))
    c.total_steps = 0  # > 0 overrides schedule.epochs (short runs, tests).
    # The train step as two programs, gradient then update (steps.SplitTrainStep): the same step, compiled and
    # loaded from the compilation cache faster on CPU (docs/benchmarks.md). False: one program.
    c.split_train_step = True
    # > 0: the gradient in chunks of this many rows per device, exactly the whole batch's (gradient caching,
    # steps.make_gradcache_grad_step): the batch-wide losses still see every row, while activations are held for
    # one chunk at a time, for an extra forward pass of the towers. 0: the whole batch at once. docs/gradcache.md.
    c.micro_batch = 0
    return c
