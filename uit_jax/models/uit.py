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

from uit_jax.models import clip as clip_lib
from uit_jax.models import decoder as decoder_lib
from uit_jax.models import layers


def grayscale_normalized(images: jax.Array) -> jax.Array:
    """Grayscale version of CLIP-normalised NHWC images, normalised again.

    SEN weights the *normalised* channels; we weight the pixel values (what a grayscale photo would give CLIP) and
    normalise the result, so the vision tower sees an in-distribution gray image. Target pixels are unaffected.
    """
    mean = jnp.asarray(layers.CLIP_MEAN, jnp.float32)
    std = jnp.asarray(layers.CLIP_STD, jnp.float32)
    rgb = images.astype(jnp.float32) * std + mean
    gray = jnp.sum(rgb * jnp.asarray(layers.GRAY_WEIGHTS, jnp.float32), axis=-1, keepdims=True)
    return ((gray - mean) / std).astype(images.dtype)


class MLMHead(nn.Module):
    """IRRA's masked-language-model head: text queries cross-attend to image tokens, a transformer, a vocab head."""

    vocab_size: int
    width: int
    heads: int
    layers: int
    dtype: Any = jnp.float32
    attention: str = "auto"  # the attention kernel (`layers.ATTENTION_IMPLS`)

    @nn.compact
    def __call__(self, txt_tokens, img_tokens):
        kw = dict(dtype=self.dtype)
        ln = lambda name: layers.LayerNorm(name=name, **kw)
        # IRRA's initialisation: std width^-0.5 in, width^-0.5 (2 layers)^-0.5 out, (2 width)^-0.5 for fc.
        std = layers.init_stds(self.width, self.layers)
        q = ln("ln_pre_t")(txt_tokens)
        kv = ln("ln_pre_i")(img_tokens)
        att = dict(attention=self.attention)
        x = layers.Attention(
            self.width, self.heads, in_std=std["attn_std"], out_std=std["proj_std"], name="cross_attn", **att, **kw
        )(q, kv)
        x = layers.blocks(
            self,
            x,
            self.layers,
            "cross_layers_",
            width=self.width,
            heads=self.heads,
            mlp=4 * self.width,
            **std,
            **att,
            **kw,
        )
        x = ln("ln_post")(x)
        dense = lambda n, s, name: layers.Dense(n, kernel_init=nn.initializers.normal(s), name=name, **kw)
        x = layers.quick_gelu(dense(self.width, std["fc_std"], "dense")(x))
        x = ln("ln")(x)
        return dense(self.vocab_size, std["proj_std"], "fc")(x).astype(jnp.float32)


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
    scan: bool = False  # the towers' and decoder's layers as a rolled jax.lax.scan (`layers.blocks`), not unrolled
    remat: str = "none"  # 'none' | 'full' | 'dots': per-layer rematerialisation (memory for compute)
    attention: str = "auto"  # the attention kernel (`layers.ATTENTION_IMPLS`)

    def setup(self):
        cfg = self.clip_config
        self.clip = clip_lib.CLIP(cfg, dtype=self.dtype, scan=self.scan, remat=self.remat, attention=self.attention)
        if self.use_id:
            # SEN: normal(std=0.001) weights, zero bias; kept in float32 (the reference runs it in fp16).
            self.classifier = layers.Dense(
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
                scan=self.scan,
                remat=self.remat,
                attention=self.attention,
            )
        if self.use_mlm:
            self.mlm_head = MLMHead(
                vocab_size=cfg.vocab_size,
                width=cfg.embed_dim,
                heads=max(1, cfg.embed_dim // 64),
                layers=self.mlm_layers,
                dtype=self.dtype,
                attention=self.attention,
            )

    def encode_image(self, images):
        """(B, H, W, 3) normalised images -> (B, E) float32 embeddings (not normalised)."""
        return self.clip.encode_image(images)["embed"].astype(jnp.float32)

    def encode_text(self, ids):
        """(B, L) token ids -> (B, E) float32 embeddings (not normalised)."""
        return self.clip.encode_text(ids)["embed"].astype(jnp.float32)

    def embed(self, images, text):
        """(z_img, z_txt) of the training forward pass alone: the embeddings the batch-wide losses need (the first,
        gradient-free pass of `steps.make_gradcache_grad_step`)."""
        return self.encode_image(images), self.encode_text(text)

    def classify(self, z):
        """(B, E) embeddings -> (B, num_classes) identity logits, the ID head of `__call__`."""
        return self.classifier(z)

    def __call__(self, images, text, *, rng=None, mlm_text=None, noise=None):
        """Training forward pass; returns every output a loss may need (float32).

        The restoration branch drops patches by `noise` (`clip.drop_patches`) when given, else by noise drawn from
        `rng` (or the 'dropout' rng stream): the model's only randomness."""
        img = self.clip.encode_image(images)
        txt = self.clip.encode_text(text)
        out = dict(z_img=img["embed"].astype(jnp.float32), z_txt=txt["embed"].astype(jnp.float32))
        if self.use_id:
            out["logits_img"] = self.classifier(out["z_img"])
            out["logits_txt"] = self.classifier(out["z_txt"])
        if self.use_restoration:
            if rng is None and noise is None:
                rng = self.make_rng("dropout")
            gray = self.clip.encode_image(
                grayscale_normalized(images), drop_ratio=self.drop_ratio, rng=rng, noise=noise
            )
            pred = self.decoder(gray["tokens"], gray["ids_restore"], txt["tokens"], txt["mask"])
            out["pixels_pred"] = pred.astype(jnp.float32)  # (B, N, p*p*3)
            out["patch_mask"] = gray["mask"]  # (B, N), 1 = dropped
        if self.use_mlm:
            if mlm_text is None:
                raise ValueError("use_mlm=True needs mlm_text (set data.mlm_outputs=True).")
            m = self.clip.encode_text(mlm_text)
            out["mlm_logits"] = self.mlm_head(m["tokens"], img["tokens"])
        return out
