"""The UIT model: CLIP dual encoder + identity classifier + text-guided restoration decoder (+ optional MLM head).

Paper symbols (SEN, "Text-guided Image Restoration and Semantic Enhancement"): the image embedding z_img and the
caption embedding z_txt are aligned by SDM/ID/triplet losses; for text-guided image restoration (TIR) the image is
turned to grayscale, 70% of its patches are dropped inside the vision tower, and the decoder, cross-attending to the
caption's token features, predicts the colour pixels of every patch (scored on the dropped ones).

The model never reads the config: `train.py` turns config fields into these attributes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uit_jax import losses
from uit_jax.models import clip as clip_lib
from uit_jax.models import decoder as decoder_lib

# OpenAI CLIP's pixel statistics (images are normalised with them by the data pipeline).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def grayscale_normalized(images: jax.Array) -> jax.Array:
    """Grayscale version of CLIP-normalised NHWC images, normalised again.

    SEN weights the *normalised* channels; we weight the pixel values (what a grayscale photo would give CLIP) and
    normalise the result, so the vision tower sees an in-distribution gray image. Target pixels are unaffected.
    """
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    rgb = images.astype(jnp.float32) * std + mean
    gray = jnp.sum(rgb * jnp.asarray(losses.GRAY_WEIGHTS, jnp.float32), axis=-1, keepdims=True)
    return ((gray - mean) / std).astype(images.dtype)


class MLMHead(nn.Module):
    """IRRA's masked-language-model head: text queries cross-attend to image tokens, a transformer, a vocab head."""

    vocab_size: int
    width: int
    heads: int
    layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, txt_tokens, img_tokens):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
        # IRRA's initialisation: std width^-0.5 in, width^-0.5 (2 layers)^-0.5 out, (2 width)^-0.5 for fc.
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        q = ln("ln_pre_t")(txt_tokens).astype(self.dtype)
        kv = ln("ln_pre_i")(img_tokens).astype(self.dtype)
        x = decoder_lib.Attention(self.width, self.heads, attn_std, proj_std, self.dtype, name="cross_attn")(q, kv)
        for i in range(self.layers):
            x = decoder_lib.Block(
                self.width,
                self.heads,
                4.0,
                attn_std,
                proj_std,
                fc_std,
                dtype=self.dtype,
                name=f"cross_layers_{i}",
            )(x)
        x = ln("ln_post")(x)
        x = nn.Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.normal(fc_std), name="dense")(x)
        x = decoder_lib.quick_gelu(x)
        x = ln("ln")(x)
        x = nn.Dense(self.vocab_size, dtype=self.dtype, kernel_init=nn.initializers.normal(proj_std), name="fc")(x)
        return x.astype(jnp.float32)


class UIT(nn.Module):
    clip_config: clip_lib.CLIPConfig
    num_classes: int
    drop_ratio: float = 0.7
    decoder_width: int = 0  # 0: the CLIP embedding width.
    decoder_heads: int = 0  # 0: width // 64 (at least 1).
    decoder_layers: int = 4
    decoder_residual: bool = False
    use_id: bool = True
    use_restoration: bool = True
    use_mlm: bool = False
    mlm_layers: int = 4
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.clip_config
        self.clip = clip_lib.CLIP(cfg, dtype=self.dtype)
        if self.use_id:
            # SEN: normal(std=0.001) weights, zero bias; kept in float32 (the reference runs it in fp16).
            self.classifier = nn.Dense(
                self.num_classes, kernel_init=nn.initializers.normal(0.001), bias_init=nn.initializers.zeros
            )
        if self.use_restoration:
            if cfg.stride != cfg.patch_size:
                raise ValueError(
                    f"Restoration needs non-overlapping patches, but stride={cfg.stride} != patch_size="
                    f"{cfg.patch_size}; set model.stride to {cfg.patch_size} or loss.restoration=0."
                )
            width = self.decoder_width or cfg.embed_dim
            self.decoder = decoder_lib.RestorationDecoder(
                grid=cfg.grid,
                patch_dim=cfg.patch_size * cfg.patch_size * 3,
                width=width,
                heads=self.decoder_heads or max(1, width // 64),
                layers=self.decoder_layers,
                residual=self.decoder_residual,
                act=cfg.act,
                dtype=self.dtype,
            )
        if self.use_mlm:
            self.mlm_head = MLMHead(
                vocab_size=cfg.vocab_size,
                width=cfg.embed_dim,
                heads=max(1, cfg.embed_dim // 64),
                layers=self.mlm_layers,
                dtype=self.dtype,
            )

    def encode_image(self, images):
        """(B, H, W, 3) normalised images -> (B, E) float32 embeddings (not normalised)."""
        return self.clip.encode_image(images)["embed"].astype(jnp.float32)

    def encode_text(self, ids):
        """(B, L) token ids -> (B, E) float32 embeddings (not normalised)."""
        return self.clip.encode_text(ids)["embed"].astype(jnp.float32)

    def __call__(self, images, text, *, rng=None, mlm_text=None):
        """Training forward pass; returns every output a loss may need (float32)."""
        img = self.clip.encode_image(images)
        txt = self.clip.encode_text(text)
        out = dict(z_img=img["embed"].astype(jnp.float32), z_txt=txt["embed"].astype(jnp.float32))
        if self.use_id:
            out["logits_img"] = self.classifier(out["z_img"])
            out["logits_txt"] = self.classifier(out["z_txt"])
        if self.use_restoration:
            if rng is None:
                rng = self.make_rng("dropout")
            gray = self.clip.encode_image(grayscale_normalized(images), drop_ratio=self.drop_ratio, rng=rng)
            pred = self.decoder(gray["tokens"], gray["ids_restore"], txt["tokens"], txt["mask"])
            out["pixels_pred"] = pred.astype(jnp.float32)  # (B, N, p*p*3)
            out["patch_mask"] = gray["mask"]  # (B, N), 1 = dropped
        if self.use_mlm:
            if mlm_text is None:
                raise ValueError("use_mlm=True needs mlm_text (set data.mlm_outputs=True).")
            m = self.clip.encode_text(mlm_text)
            out["mlm_logits"] = self.mlm_head(m["tokens"], img["tokens"])
        return out
