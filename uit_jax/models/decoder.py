"""Text-guided restoration decoder: rebuilds dropped image patches from the kept ones and the caption.

SEN's restoration branch (``cross_former_mae`` in Delong-liu-bupt/SEN ``model/build.py``), in Linen:

    x   = embed(LN(img_tokens))                     # (B, 1+K, W) class token + K kept patches
    x   = unshuffle([x_kept, mask_token x (N-K)])   # back to the N patch positions (MAE's ids_restore)
    x   = x + sincos_2d                             # fixed, class row zero
    c   = CrossAttn(LN(x), LN(txt_tokens))          # queries from the image, keys/values from the text
    x   = LN(c)            (SEN: no residual)       # or LN(x + c) with residual=True
    x   = Blocks(x)                                 # `layers` pre-LN transformer blocks
    out = pred(LN(x))[:, 1:]                        # (B, N, p*p*3), class token dropped

Where we differ from SEN: padding text tokens are masked out of the cross-attention (SEN attends to them);
the text keeps its own width (keys/values are projected from E_t to `width`, like torch's ``kdim``/``vdim``).

Parameter names: ``ln_img``/``ln_txt`` (SEN ``norm_1``/``norm_2``), ``embed`` (``decoder_embed``),
``mask_token``, ``ln_q`` (``norm_4``), ``cross_attn`` (``cross_attn_Text``), ``ln_cross`` (``norm_6``),
``cross_layers_{i}`` (``cross_modal_transformer_mae.resblocks.{i}``), ``ln_post`` (``norm_7``), ``pred``
(``decoder_pred``). SEN's x5 learning rate hits every name containing ``cross``; ours keep that property.
Blocks use HF CLIP's sub-names (``layer_norm1``, ``self_attn/{q,k,v,out}_proj``, ``layer_norm2``,
``mlp/fc1``, ``mlp/fc2``) like ``models/clip.py``.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torch.nn.LayerNorm's default; SEN's LayerNorms (and CLIP's) use it, Flax's default is 1e-6.
LN_EPS = 1e-5


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding for an (h rows, w cols) patch grid.

    MAE's convention (which SEN uses): positions are flattened row-major (index = row * w + col); the first
    dim/2 channels encode the column, the last dim/2 the row; each half is [sin(p * omega), cos(p * omega)]
    with omega_k = 10000^(-k / (dim/4)), k = 0..dim/4-1.

    Returns float32 (1 + h*w, dim) with a zero first row for the class token, or (h*w, dim) without.
    """
    h, w = (int(g) for g in grid)
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim={dim} must be divisible by 4 (sin, cos for rows, cols)")
    if h <= 0 or w <= 0:
        raise ValueError(f"sincos_pos_embed_2d: grid={grid} must have positive (rows, cols)")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def encode(pos):  # (h*w,) -> (h*w, dim/2)
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def quick_gelu(x):
    """CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
}


def _activation(name: str) -> Callable:
    if name not in _ACTIVATIONS:
        raise ValueError(f"RestorationDecoder.act={name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _layer_norm(x, name: str, param_dtype, out_dtype):
    # LayerNorm statistics in float32 whatever the compute dtype (as CLIP's fp16-safe LayerNorm does).
    norm = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=param_dtype, name=name)
    return norm(x.astype(jnp.float32)).astype(out_dtype)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (torch MultiheadAttention's maths)."""

    width: int
    heads: int
    in_std: float
    out_std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_in, kv_in, kv_mask=None):
        """q_in (B, T, Dq), kv_in (B, S, Dkv), kv_mask (B, S) bool True = attend -> (B, T, width)."""
        if self.width % self.heads:
            raise ValueError(f"Attention: width={self.width} is not divisible by heads={self.heads}")
        head_dim = self.width // self.heads

        def dense(name, std):
            return nn.Dense(
                self.width,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(std),
                name=name,
            )

        def split(x):  # (B, T, W) -> (B, T, heads, head_dim)
            return x.reshape(*x.shape[:-1], self.heads, head_dim)

        q = split(dense("q_proj", self.in_std)(q_in))
        k = split(dense("k_proj", self.in_std)(kv_in))
        v = split(dense("v_proj", self.in_std)(kv_in))
        mask = None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, S)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # (B, T, heads, head_dim)
        out = out.reshape(*out.shape[:-2], self.width)
        return dense("out_proj", self.out_std)(out)


class Block(nn.Module):
    """Pre-LN transformer block (CLIP's ResidualAttentionBlock): x + attn(LN x), then x + mlp(LN x)."""

    width: int
    heads: int
    mlp_ratio: float
    attn_std: float
    proj_std: float
    fc_std: float
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _layer_norm(x, "layer_norm1", self.param_dtype, self.dtype)
        attn = Attention(
            self.width,
            self.heads,
            self.attn_std,
            self.proj_std,
            self.dtype,
            self.param_dtype,
            name="self_attn",
        )
        x = x + attn(y, y)
        y = _layer_norm(x, "layer_norm2", self.param_dtype, self.dtype)
        y = Mlp(
            int(self.width * self.mlp_ratio),
            self.fc_std,
            self.proj_std,
            self.act,
            self.dtype,
            self.param_dtype,
            name="mlp",
        )(y)
        return x + y


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, back to the input width."""

    hidden: int
    fc_std: float
    proj_std: float
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def dense(features, name, std):
            init = nn.initializers.normal(std)
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)

        y = _activation(self.act)(dense(self.hidden, "fc1", self.fc_std)(x))
        return dense(x.shape[-1], "fc2", self.proj_std)(y)


class RestorationDecoder(nn.Module):
    """Predicts the pixels of every patch (dropped ones included) from the kept tokens and the caption.

    Attributes:
      grid: (rows, cols) of the patch grid; N = rows * cols.
      patch_dim: output size per patch, p * p * 3.
      width: decoder width (SEN: the CLIP embedding size).
      heads: attention heads (SEN: width // 64).
      layers: transformer blocks after the cross-attention (SEN's cmt_depth, 4).
      mlp_ratio: MLP hidden size / width.
      residual: False (SEN) replaces x by the cross-attention output; True adds it to x.
      act: MLP activation, 'quick_gelu' (CLIP), 'gelu' or 'gelu_tanh'.
      dtype: compute dtype; LayerNorms run in float32. param_dtype: parameter dtype.
    """

    grid: tuple[int, int]
    patch_dim: int
    width: int
    heads: int
    layers: int = 4
    mlp_ratio: float = 4.0
    residual: bool = False
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, img_tokens, ids_restore, txt_tokens, txt_mask):
        """Decodes patches.

        Args:
          img_tokens: (B, 1+K, E) vision tokens, class token first, then the K kept patches in kept order.
          ids_restore: (B, N) int; MAE's inverse shuffle: position n takes element ids_restore[n] of
            [kept_0..kept_{K-1}, dropped...], so values < K are kept patches.
          txt_tokens: (B, L, E_t) text tokens.
          txt_mask: (B, L) bool, True on real tokens; the others are excluded from the cross-attention.

        Returns:
          (B, N, patch_dim) float32 pixel predictions for every patch position (class token removed).
        """
        h, w = self.grid
        n = h * w
        b, kept_plus_cls, _ = img_tokens.shape
        k = kept_plus_cls - 1
        if ids_restore.shape != (b, n):
            raise ValueError(
                f"RestorationDecoder: ids_restore has shape {ids_restore.shape}, expected (B={b}, N={n}) for "
                f"grid={self.grid}; check the decoder grid against the vision tower's patch grid"
            )
        if not 0 <= k <= n:
            raise ValueError(f"RestorationDecoder: img_tokens holds {k} kept patches, more than N={n}")
        if txt_mask.shape != txt_tokens.shape[:2]:
            raise ValueError(
                f"RestorationDecoder: txt_mask shape {txt_mask.shape} != txt_tokens (B, L) = {txt_tokens.shape[:2]}"
            )

        # SEN's init (CLIP's): in-projections width^-0.5, output projections additionally (2 layers)^-0.5.
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * max(self.layers, 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5

        img = _layer_norm(img_tokens, "ln_img", self.param_dtype, self.dtype)
        txt = _layer_norm(txt_tokens, "ln_txt", self.param_dtype, self.dtype)

        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(img)
        mask_token = self.param("mask_token", nn.initializers.zeros, (self.width,), self.param_dtype)
        fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n - k, self.width))
        patches = jnp.concatenate([x[:, 1:], fill], axis=1)  # (B, N, W): [kept..., mask tokens...]
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None].astype(jnp.int32), axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)  # (B, 1+N, W), original patch order
        if not self.is_initializing():  # keep init's variables to params only; tests read this via mutable=
            self.sow("intermediates", "restored", x)
        x = x + jnp.asarray(sincos_pos_embed_2d(self.width, self.grid, cls_token=True), self.dtype)

        q = _layer_norm(x, "ln_q", self.param_dtype, self.dtype)
        cross_attn = Attention(
            self.width, self.heads, attn_std, proj_std, self.dtype, self.param_dtype, name="cross_attn"
        )
        c = cross_attn(q, txt, txt_mask)
        # SEN drops the residual here (its `x = norm_6(x + need_text)` is commented out), so the decoder's
        # only view of the kept pixels is through the caption-conditioned attention output.
        x = x + c if self.residual else c
        x = _layer_norm(x, "ln_cross", self.param_dtype, self.dtype)

        for i in range(self.layers):
            x = Block(
                self.width,
                self.heads,
                self.mlp_ratio,
                attn_std,
                proj_std,
                fc_std,
                self.act,
                self.dtype,
                self.param_dtype,
                name=f"cross_layers_{i}",
            )(x)

        x = _layer_norm(x, "ln_post", self.param_dtype, self.dtype)
        x = nn.Dense(self.patch_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="pred")(x)
        return x[:, 1:].astype(jnp.float32)
