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
``cross_layers`` (``cross_modal_transformer_mae.resblocks``, stacked: layer i is ``resblocks.{i}``), ``ln_post``
(``norm_7``), ``pred`` (``decoder_pred``). SEN's x5 learning rate hits every name containing ``cross``; ours
keep that property. Blocks are `layers.Block`, with HF CLIP's sub-names (``layer_norm1``,
``self_attn/{q,k,v,out}_proj``, ``layer_norm2``, ``mlp/fc1``, ``mlp/fc2``) like the CLIP towers.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from uit_jax.models import layers


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
      scan, remat: how the `layers` blocks run (`layers.blocks`: rolled or unrolled, rematerialised or not); the
        parameters and the maths are the same.
      attention: the attention kernel (`layers.ATTENTION_IMPLS`), cross-attention included.
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
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"

    def _check_inputs(self, img_tokens, ids_restore, txt_tokens, txt_mask) -> tuple[int, int, int]:
        """Returns (B, N patches, K kept patches), or a ValueError naming the mismatched input."""
        n = self.grid[0] * self.grid[1]
        b, k = img_tokens.shape[0], img_tokens.shape[1] - 1
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
        return b, n, k

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
        b, n, k = self._check_inputs(img_tokens, ids_restore, txt_tokens, txt_mask)
        # SEN's init (CLIP's): in-projections width^-0.5, output projections additionally (2 layers)^-0.5.
        std = layers.init_stds(self.width, self.layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda x, name: layers.LayerNorm(name=name, **kw)(x)

        img = ln(img_tokens, "ln_img")
        txt = ln(txt_tokens, "ln_txt")

        x = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(img)
        mask_token = layers.param(self, "mask_token", nn.initializers.zeros, (self.width,), self.param_dtype)
        fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n - k, self.width))
        patches = jnp.concatenate([x[:, 1:], fill], axis=1)  # (B, N, W): [kept..., mask tokens...]
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None].astype(jnp.int32), axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)  # (B, 1+N, W), original patch order
        if not self.is_initializing():  # keep init's variables to params only; tests read this via mutable=
            self.sow("intermediates", "restored", x)
        x = x + jnp.asarray(sincos_pos_embed_2d(self.width, self.grid, cls_token=True), self.dtype)

        q = ln(x, "ln_q")
        cross_attn = layers.Attention(
            self.width,
            self.heads,
            in_std=std["attn_std"],
            out_std=std["proj_std"],
            attention=self.attention,
            name="cross_attn",
            **kw,
        )
        c = cross_attn(q, txt, txt_mask)
        # SEN drops the residual here (its `x = norm_6(x + need_text)` is commented out), so the decoder's
        # only view of the kept pixels is through the caption-conditioned attention output.
        x = x + c if self.residual else c
        x = ln(x, "ln_cross")

        x = layers.blocks(
            self,
            x,
            self.layers,
            "cross_layers_",
            scan=self.scan,
            remat=self.remat,
            attention=self.attention,
            width=self.width,
            heads=self.heads,
            mlp=int(self.width * self.mlp_ratio),
            act=self.act,
            **std,
            **kw,
        )

        x = ln(x, "ln_post")
        x = layers.Dense(self.patch_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="pred")(x)
        return x[:, 1:].astype(jnp.float32)
