"""What a run is built from, in the order that fails fastest: the tokenizer and pretrained CLIP weights, then the
dataset (generated, built or read), then the model.

`build(config)` is shared by training and `--mode=eval`; a wrong path fails in seconds, not after minutes of
dataset work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from uit_jax import state as state_lib
from uit_jax.data import prepare as prepare_lib
from uit_jax.data import tokenizer as tok_lib
from uit_jax.models import clip as clip_lib
from uit_jax.models import convert
from uit_jax.models import uit as uit_lib


@dataclasses.dataclass
class Setup:
    model: uit_lib.UIT
    clip_config: clip_lib.CLIPConfig
    init_clip_params: Any  # the loaded CLIP weights (host arrays), or None for a random init
    tokenizer: Any
    info: prepare_lib.DatasetInfo


def build(config, *, num_classes: int | None = None) -> Setup:
    """Tokenizer, model (with pretrained CLIP weights when `config.model_init` is set) and the prepared dataset.

    `num_classes` overrides the ID head's size (default: the training split's identities)."""
    image_size = tuple(config.data.image_size)
    tok_src = config.tokenizer or config.model_init
    tokenizer = tok_lib.load_tokenizer(tok_src) if tok_src else None
    clip_params = None
    if config.model_init:
        dtype = state_lib.compute_dtype(config.model.dtype)
        stride = config.model.stride or None
        clip_model, clip_params = convert.load(config.model_init, image_size=image_size, stride=stride, dtype=dtype)
    prepare_lib.check_ready(config.data)
    info = prepare_lib.prepare(config.data)
    if tokenizer is None:
        if not info.tokenizer_dir:
            raise ValueError("No tokenizer: set config.tokenizer or config.model_init (an HF id or folder).")
        tokenizer = tok_lib.load_tokenizer(info.tokenizer_dir)
    if config.model_init:
        clip_cfg = clip_model.config
    else:
        clip_cfg = clip_lib.config_from_preset(
            config.model.preset,
            vocab_size=len(tokenizer),
            image_size=image_size,
            stride=config.model.stride or None,
            text_len=config.data.text_len,
            eot_token_id=tok_lib.eot_id(tokenizer),
        )
    if clip_cfg.text_len != config.data.text_len:
        raise ValueError(
            f"config.data.text_len={config.data.text_len} but the CLIP text tower takes {clip_cfg.text_len} tokens; "
            f"set --config.data.text_len={clip_cfg.text_len}."
        )
    model = state_lib.make_model(config, clip_cfg, num_classes or info.num_train_ids)
    return Setup(model=model, clip_config=clip_cfg, init_clip_params=clip_params, tokenizer=tokenizer, info=info)
