"""Analytic FLOP count of a UIT training step, per component: what MFU is computed from.

Why not XLA's count: on GPU, `compiled.cost_analysis()` leaves out the cuBLAS/cuDNN custom calls (most of the
matmuls), so it under-reports several times; on CPU it counts every op, elementwise ones included. Here only
matrix multiplies count (2 m n k each, the MFU convention), forward pass by forward pass; a training step is
3x the forward (the backward computes two matmuls per forward one). `tools/benchmark.py` prints these next to
XLA's CPU count, and tests/test_flops.py checks the forward counts against the matmuls in the traced program.

Conventions, as the model computes them (not as an ideal kernel would):
- attention scores and their weighted sum are over all T x T pairs, causal text included (the mask is applied
  to full score matrices);
- the vision tower's patch embedding runs on every patch, also in the restoration pass (patches are dropped
  after it); the projections apply to every token (`tokens` feed the decoder and the MLM head);
- losses: the B x B similarity matrices of SDM/ITC and the triplet, and the identity classifier on both sides.
"""

from __future__ import annotations

import dataclasses

from uit_jax.models.clip import CLIPConfig


def block(tokens: int, width: int, mlp: int) -> int:
    """One pre-LN self-attention block on `tokens` tokens: q, k, v, out projections, scores, mixing, MLP."""
    t, d = tokens, width
    return 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * mlp)


def cross_attention(queries: int, keys: int, width: int, kv_width: int) -> int:
    """Queries of `width` attend to `keys` tokens of `kv_width` (projected to `width`)."""
    return 2 * (2 * queries * width * width + 2 * keys * kv_width * width + 2 * queries * keys * width)


def text_tower(c: CLIPConfig, length: int) -> int:
    """Per caption: the encoder on `length` tokens and the projection of every token."""
    return c.text_layers * block(length, c.text_width, c.text_mlp) + 2 * length * c.text_width * c.embed_dim


def vision_tower(c: CLIPConfig, kept: int | None = None) -> int:
    """Per image: patch embedding of every patch, the encoder on the class token + `kept` patches (all by default)
    and the projection of those tokens."""
    n = c.num_patches
    kept = n if kept is None else kept
    t = 1 + kept
    patch = 2 * n * c.patch_size * c.patch_size * 3 * c.vision_width
    return patch + c.vision_layers * block(t, c.vision_width, c.vision_mlp) + 2 * t * c.vision_width * c.embed_dim


def decoder(c: CLIPConfig, length: int, kept: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """Per image: the restoration decoder (`models/decoder.py`) on the 1 + N patch positions."""
    t = 1 + c.num_patches
    embed = 2 * (1 + kept) * c.embed_dim * width
    cross = cross_attention(t, length, width, c.embed_dim)
    blocks = layers * block(t, width, int(width * mlp_ratio))
    pred = 2 * t * width * c.patch_size * c.patch_size * 3
    return embed + cross + blocks + pred


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one global batch, per component (`components`), and the training step (3x forward)."""

    components: dict[str, int]
    batch: int

    @property
    def forward(self) -> int:
        return sum(self.components.values())

    @property
    def train(self) -> int:
        return 3 * self.forward

    def per_pair(self, train: bool = True) -> float:
        return (self.train if train else self.forward) / self.batch


def train_step(
    c: CLIPConfig,
    batch: int,
    *,
    text_len: int | None = None,
    num_classes: int = 0,
    restoration: bool = True,
    drop_ratio: float = 0.7,
    decoder_width: int = 0,
    decoder_layers: int = 4,
    triplet: bool = True,
) -> StepFlops:
    """The components of one training step of `models/uit.UIT` at global batch `batch` (forward FLOPs)."""
    length = text_len or c.text_len
    comp = {
        "text_tower": batch * text_tower(c, length),
        "vision_tower": batch * vision_tower(c),
    }
    if restoration:
        kept = c.num_patches - int(round(drop_ratio * c.num_patches))
        comp["restoration_vision"] = batch * vision_tower(c, kept)
        comp["restoration_decoder"] = batch * decoder(c, length, kept, decoder_width or c.embed_dim, decoder_layers)
    heads = 2 * 2 * c.embed_dim * num_classes * batch  # identity classifier on both embeddings
    sims = (2 if triplet else 1) * 2 * batch * batch * c.embed_dim  # SDM's similarity matrix (+ the triplet's)
    comp["heads_and_losses"] = heads + sims
    return StepFlops(components=comp, batch=batch)
