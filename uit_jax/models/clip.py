"""CLIP dual encoder in Flax Linen: text and vision transformers, projections, patch dropping (modules only).

Submodule names mirror the Hugging Face `CLIPModel` key paths, with each tower's layers stacked on a leading axis
(`text_model/encoder/layers/self_attn/q_proj`, layer 3 of which is `text_model.encoder.layers.3.self_attn.q_proj`;
`stacking.py`), so `convert.py` is a rename, transposes and a stack.

Shapes: B batch, L text length, N = gh * gw image patches, K kept patches, D tower width, E embed_dim.
Weights are loaded (Hugging Face / OpenAI checkpoints, position-embedding resize) by `convert.load`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from uit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Every hyperparameter the CLIP modules need (no defaults read from elsewhere).

    `image_size` is (H, W) of the inputs this model is built for; the vision position embeddings have one row
    per patch of that grid plus the class row. `stride` defaults to `patch_size` (non-overlapping patches).
    `eot_token_id` None means "pool at the largest token id" (OpenAI's convention, and what transformers does
    for old configs with eos_token_id 2); otherwise pool at the first occurrence of that id.
    """

    embed_dim: int = 512
    vocab_size: int = 49408
    text_len: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int | None = None  # None: 4 * text_width
    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    stride: int | None = None
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int | None = None  # None: 4 * vision_width
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eot_token_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(s) for s in _pair(self.image_size)))
        if self.stride is None:
            object.__setattr__(self, "stride", self.patch_size)
        if self.text_mlp is None:
            object.__setattr__(self, "text_mlp", 4 * self.text_width)
        if self.vision_mlp is None:
            object.__setattr__(self, "vision_mlp", 4 * self.vision_width)
        if self.act not in layers.ACTIVATIONS:
            raise ValueError(f"CLIPConfig.act must be one of {sorted(layers.ACTIVATIONS)}, got {self.act!r}.")
        for width, heads, name in [
            (self.text_width, self.text_heads, "text"),
            (self.vision_width, self.vision_heads, "vision"),
        ]:
            if width % heads:
                raise ValueError(f"CLIPConfig.{name}_width={width} is not divisible by {name}_heads={heads}.")
        h, w = self.image_size
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"CLIPConfig.image_size={self.image_size} is smaller than patch_size={self.patch_size}.")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw): ((H - p) // s + 1, (W - p) // s + 1)."""
        p, s = self.patch_size, self.stride
        return ((self.image_size[0] - p) // s + 1, (self.image_size[1] - p) // s + 1)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int | np.integer) else tuple(x)


# fmt: off
PRESETS: dict[str, CLIPConfig] = {
    # OpenAI ViT-B/16, the checkpoint IRRA and SEN start from.
    "vit-b16": CLIPConfig(),
    "vit-b32": CLIPConfig(patch_size=32),
    "vit-l14": CLIPConfig(
        embed_dim=768, text_width=768, text_heads=12, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16,
    ),
    # Unit tests: odd sizes so that a wrong transpose cannot hide.
    "tiny": CLIPConfig(
        embed_dim=24, vocab_size=99, text_len=77, text_width=40, text_layers=2, text_heads=5, text_mlp=72,
        image_size=(32, 32), patch_size=8, vision_width=48, vision_layers=2, vision_heads=4, vision_mlp=80,
    ),
    # Trainable from scratch on 2 CPU cores in minutes: the embedded synthetic default.
    "mini": CLIPConfig(
        embed_dim=128, text_width=128, text_layers=3, text_heads=4, image_size=(128, 64), patch_size=16,
        vision_width=128, vision_layers=3, vision_heads=4,
    ),
    # A larger from-scratch size for CPU/GPU experiments on synthetic data.
    "small": CLIPConfig(
        embed_dim=256, text_width=256, text_layers=4, text_heads=4, image_size=(384, 128), patch_size=16,
        vision_width=256, vision_layers=4, vision_heads=4,
    ),
}
# fmt: on


def config_from_preset(name: str, **overrides) -> CLIPConfig:
    """A named preset with fields replaced, e.g. `config_from_preset('small', vocab_size=600)`."""
    if name not in PRESETS:
        raise KeyError(f"Unknown CLIP preset {name!r}; known: {sorted(PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(CLIPConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"Unknown CLIPConfig field(s) {bad}; fields are {sorted(fields)}.")
    base = PRESETS[name]
    if "patch_size" in overrides and "stride" not in overrides:
        overrides["stride"] = None  # follow the new patch size
    for k in ("text_mlp", "vision_mlp"):  # keep 4x when only the width changes
        width = k.replace("mlp", "width")
        if width in overrides and k not in overrides:
            overrides[k] = None
    return dataclasses.replace(base, **overrides)


class Encoder(nn.Module):
    """`layers` pre-LN blocks, their parameters stacked as `layers`; `scan` / `remat` as in `layers.blocks`."""

    width: int
    layers: int
    heads: int
    mlp: int
    act: str
    eps: float
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        return layers.blocks(
            self,
            x,
            self.layers,
            "layers_",
            scan=self.scan,
            remat=self.remat,
            attention=self.attention,
            width=self.width,
            heads=self.heads,
            mlp=self.mlp,
            act=self.act,
            eps=self.eps,
            causal=self.causal,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


class TextEmbeddings(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        c = self.config
        if ids.shape[-1] > c.text_len:
            raise ValueError(f"Text length {ids.shape[-1]} exceeds the {c.text_len} position embeddings.")
        embed = lambda n, std, name: nn.Embed(
            n,
            c.text_width,
            embedding_init=nn.initializers.normal(std),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        x = embed(c.vocab_size, 0.02, "token_embedding")(ids)
        return x + embed(c.text_len, 0.01, "position_embedding")(jnp.arange(ids.shape[-1]))


class VisionEmbeddings(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """images (B, H, W, 3) -> class token (B, 1, D), patch tokens (B, N, D), position embeddings added."""
        c = self.config
        if tuple(images.shape[1:3]) != c.image_size:
            raise ValueError(
                f"Image size {tuple(images.shape[1:3])} differs from CLIPConfig.image_size={c.image_size}; "
                "position embeddings are built for the configured size (load with image_size=...)."
            )
        d = c.vision_width
        x = nn.Conv(
            d,
            (c.patch_size, c.patch_size),
            strides=(c.stride, c.stride),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embedding",
        )(images)
        x = x.reshape(x.shape[0], -1, d)  # row-major over (gh, gw), as torch's flatten(2)
        cls = layers.param(self, "class_embedding", nn.initializers.normal(d**-0.5), (d,), self.param_dtype)
        # OpenAI CLIP's init, width^-0.5 like the class embedding; it only matters from scratch (a narrower spread
        # over seeds, docs/results.md).
        pos = nn.Embed(
            1 + c.num_patches,
            d,
            embedding_init=nn.initializers.normal(d**-0.5),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="position_embedding",
        )(jnp.arange(1 + c.num_patches))
        cls = (cls.astype(self.dtype) + pos[0])[None, None].repeat(x.shape[0], 0)
        return cls, x + pos[1:]


def num_dropped(drop_ratio: float, n: int) -> int:
    """How many of `n` patches `drop_patches` drops from every image: round(drop_ratio * n)."""
    n_drop = int(round(drop_ratio * n))
    if not 0 <= n_drop < n:
        raise ValueError(f"drop_ratio={drop_ratio} drops {n_drop} of {n} patches; at least one must be kept.")
    return n_drop


def patch_noise(rng, batch: int, n: int):
    """The (batch, n) uniform noise whose sort picks the dropped patches: what `drop_patches` draws from `rng`, so
    a caller that runs the batch in pieces can draw the whole batch's noise once and pass each piece its rows."""
    return jax.random.uniform(rng, (batch, n))


def drop_patches(x, drop_ratio: float, rng, noise=None):
    """MAE-style random patch dropping on (B, N, D) tokens.

    Drops exactly round(drop_ratio * N) patches per image, chosen by sorting uniform noise: `noise` (B, N) when
    given, else `patch_noise(rng, B, N)`. Returns (kept (B, K, D), mask (B, N) float32 with 1.0 where dropped,
    ids_restore (B, N) int32) where `take_along_axis(concat([kept, dropped]), ids_restore)` puts tokens back in
    patch order.
    """
    b, n, _ = x.shape
    n_drop = num_dropped(drop_ratio, n)
    if n_drop == 0:
        return x, jnp.zeros((b, n), jnp.float32), jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if noise is None:
        if rng is None:
            raise ValueError("encode_image(drop_ratio > 0) needs rng=jax.random.key(...) or noise.")
        noise = patch_noise(rng, b, n)
    elif noise.shape != (b, n):
        raise ValueError(f"drop_patches: noise has shape {noise.shape}, the tokens need {(b, n)}.")
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the first K are kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    kept = jnp.take_along_axis(x, ids_shuffle[:, : n - n_drop, None], axis=1)
    mask = jnp.take_along_axis((jnp.arange(n) >= n - n_drop).astype(jnp.float32)[None].repeat(b, 0), ids_restore, 1)
    return kept, mask, ids_restore


class TextModel(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, ids):
        """Returns the final-LayerNorm'ed per-token states (B, L, D): HF's last_hidden_state."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = TextEmbeddings(c, name="embeddings", **kw)(ids)
        x = Encoder(
            c.text_width,
            c.text_layers,
            c.text_heads,
            c.text_mlp,
            c.act,
            c.layer_norm_eps,
            causal=True,
            scan=self.scan,
            remat=self.remat,
            attention=self.attention,
            name="encoder",
            **kw,
        )(x)
        return layers.LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(x)


class VisionModel(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = VisionEmbeddings(c, **kw)
        self.pre_layrnorm = layers.LayerNorm(c.layer_norm_eps, **kw)  # (sic) HF's spelling
        self.encoder = Encoder(
            c.vision_width,
            c.vision_layers,
            c.vision_heads,
            c.vision_mlp,
            c.act,
            c.layer_norm_eps,
            False,
            scan=self.scan,
            remat=self.remat,
            attention=self.attention,
            **kw,
        )
        self.post_layernorm = layers.LayerNorm(c.layer_norm_eps, **kw)

    def __call__(self, images, drop_ratio: float = 0.0, rng=None, noise=None):
        """Returns (hidden (B, 1+K, D) before post-LN, mask, ids_restore)."""
        cls, patches = self.embeddings(images)
        # Dropping after position embeddings, so kept tokens remember where they came from (as in MAE).
        patches, mask, ids_restore = drop_patches(patches, drop_ratio, rng, noise)
        x = self.pre_layrnorm(jnp.concatenate([cls, patches], axis=1))
        return self.encoder(x), mask, ids_restore


class CLIP(nn.Module):
    """CLIP with both towers and their projections; see `encode_text` / `encode_image` for the outputs.

    `scan` runs each tower's layers as a rolled `jax.lax.scan` (one layer compiled, not 12 or 24) rather than
    unrolled, and `remat` picks a rematerialisation policy per layer (`layers.REMAT_POLICIES`); `attention` the
    kernel (`layers.ATTENTION_IMPLS`). None of them changes the parameters or the maths.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        opts = dict(scan=self.scan, remat=self.remat, attention=self.attention)
        self.text_model = TextModel(c, **opts, **kw)
        self.vision_model = VisionModel(c, **opts, **kw)
        proj = lambda width, name: layers.Dense(
            c.embed_dim, use_bias=False, kernel_init=nn.initializers.normal(width**-0.5), name=name, **kw
        )
        self.text_projection = proj(c.text_width, "text_projection")
        self.visual_projection = proj(c.vision_width, "visual_projection")
        self.logit_scale = layers.param(
            self, "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32
        )

    def encode_text(self, ids):
        """ids (B, L) int -> dict(embed (B, E), tokens (B, L, E), hidden (B, L, D), mask (B, L) bool).

        embed: the projected state at the first end-of-text token (not normalised); tokens: every state
        projected; hidden: HF's last_hidden_state; mask: True up to and including that end-of-text token.
        """
        ids = jnp.asarray(ids)
        hidden = self.text_model(ids)
        eot = self.config.eot_token_id
        # argmax returns the first maximal position, so both branches pick the first end-of-text token.
        pos = jnp.argmax(ids, axis=-1) if eot is None else jnp.argmax(ids == eot, axis=-1)
        tokens = self.text_projection(hidden)
        embed = jnp.take_along_axis(tokens, pos[:, None, None], axis=1)[:, 0]
        mask = jnp.arange(ids.shape[-1])[None] <= pos[:, None]
        return dict(embed=embed, tokens=tokens, hidden=hidden, mask=mask)

    def encode_image(self, images, *, drop_ratio: float = 0.0, rng=None, noise=None):
        """images (B, H, W, 3), CLIP-normalised -> dict(embed, tokens, hidden, mask, ids_restore).

        embed (B, E): projected post-LN class token. tokens (B, 1+K, E): post-LN + projection of the class
        token and every kept patch. hidden (B, 1+K, D): HF's last_hidden_state (no post-LN). mask (B, N):
        1.0 where a patch was dropped. ids_restore (B, N) int32: un-shuffles [kept..., dropped...].
        `drop_ratio` is a Python float (it fixes K, a shape); when it is > 0, `rng` (a jax key) or `noise`
        (`drop_patches`) picks the patches.
        """
        hidden, mask, ids_restore = self.vision_model(jnp.asarray(images, self.dtype), drop_ratio, rng, noise)
        tokens = self.visual_projection(self.vision_model.post_layernorm(hidden))
        return dict(embed=tokens[:, 0], tokens=tokens, hidden=hidden, mask=mask, ids_restore=ids_restore)

    def __call__(self, images, ids, **kw):
        return self.encode_image(images, **kw), self.encode_text(ids)
