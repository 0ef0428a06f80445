"""The transformer layers every model here is made of: Dense, LayerNorm, Attention, MLP, Block; CLIP's pixel constants.

One library for the CLIP towers (`clip.py`), the restoration decoder (`decoder.py`) and the MLM head (`uit.py`).
Submodule names follow Hugging Face's CLIP (`self_attn/{q,k,v,out}_proj`, `layer_norm1`, `mlp/fc1`, ...), so
weight conversion stays a rename plus transposes (`convert.py`).

Initialisation: `None` standard deviations keep Flax's default Dense init (the CLIP towers, whose weights are
loaded); the randomly initialised modules pass CLIP's/SEN's normal stds (in: width^-0.5, out: that times
(2 layers)^-0.5, fc: (2 width)^-0.5).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from uit_jax.models import stacking

Dtype = Any

# OpenAI CLIP's pixel statistics (the data pipelines normalise with them; the grayscale view undoes them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Luma weights of torchvision's rgb_to_grayscale (ITU-R BT.601, rounded as torchvision does).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# torch.nn.LayerNorm's default; CLIP's and SEN's LayerNorms use it (Flax's default is 1e-6).
LN_EPS = 1e-5


def quick_gelu(x):
    """CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def _kernel_init(std: float | None):
    return nn.initializers.lecun_normal() if std is None else nn.initializers.normal(std)


def param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
    """`module.param(name, init, shape, dtype)`, with the existing parameter's shape checked against `shape` directly.

    Flax's own check, when the parameter exists (every apply), traces `init` under `jax.eval_shape` once per
    parameter: a third of the Python trace time of the ViT-B/16 gradient program (1.25 of 3.96 s), for a shape we
    already hold. Creation (init) goes through `module.param` unchanged: the same random streams, the same values.
    """
    shape = tuple(int(d) for d in shape)
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    value = module.get_variable("params", name)
    if tuple(value.shape) != shape:
        path = "/".join((*module.scope.path, name))
        raise ValueError(
            f"Parameter {path} has shape {tuple(value.shape)}, but this model expects {shape}: the parameters "
            "(a checkpoint or converted weights) were made for another model configuration; use that "
            "configuration, or convert/initialise the weights for this one."
        )
    return value


class Dense(nn.Module):
    """Flax's `nn.Dense` (same parameters `kernel` (in, out) and `bias`, init, dtype promotion and dot_general),
    reading its parameters through `param` (no initializer traced per apply)."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = param(self, "bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype; the result is cast back to `dtype`.

    Parameters `scale` and `bias` (Flax's names; HF's `weight`/`bias` in `convert.py`).
    """

    eps: float = LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), self.param_dtype).astype(jnp.float32)
        bias = param(self, "bias", nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


# Attention kernels (`attention`), all the same maths:
# - 'xla': `jax.nn.dot_product_attention`'s XLA path, on every backend;
# - 'einsum': `einsum_attention`, head-major einsums with a hand-written gradient (faster on XLA:CPU, below);
# - 'cudnn': cuDNN's fused (flash) attention, CUDA GPUs only, bfloat16/float16 compute;
# - 'auto' (the default): 'einsum' on CPU, 'xla' elsewhere (GPU and TPU measurements of 'einsum' are still to come).
ATTENTION_IMPLS = ("auto", "xla", "einsum", "cudnn")


def check_attention(attention: str) -> str:
    """The kernel `attention` names, with 'auto' resolved for JAX's default backend."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention kernel {attention!r}; known: {list(ATTENTION_IMPLS)}.")
    if attention == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "xla"
    return attention


def _keep_mask(t: int, s: int, mask, causal: bool):
    """The (B or 1, 1, T, S) bool mask of the logits to keep, or None when every one is kept."""
    keep = None if mask is None else mask.astype(bool)
    if causal:
        tril = jnp.tril(jnp.ones((t, s), bool))[None, None]
        keep = tril if keep is None else keep & tril
    return keep


@jax.custom_vjp
def _einsum_attention(q, k, v, keep):
    return _einsum_attention_fwd(q, k, v, keep)[0]


def _einsum_attention_fwd(q, k, v, keep):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if keep is not None:  # jax.nn.dot_product_attention's fill: finite, so a fully masked row is uniform, not NaN
        logits = jnp.where(keep, logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits, axis=-1)  # float32, as in jax.nn.dot_product_attention
    y = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v)
    return y, (q, k, v, keep, probs)


def _einsum_attention_bwd(res, dy):
    q, k, v, keep, probs = res
    scale = q.shape[-1] ** -0.5
    # The transposed operands of dv and dk are written out (`swapaxes`): XLA:CPU then runs both products as plain
    # batched matmuls; autodiff's (contracting over the query axis) ran about 1.5x slower.
    dv = jnp.einsum("bnst,bnth->bnsh", jnp.swapaxes(probs, 2, 3).astype(dy.dtype), dy)
    dp = jnp.einsum("bnth,bnsh->bnts", dy, v, preferred_element_type=jnp.float32)
    dlogits = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))  # the softmax's vector-Jacobian product
    if keep is not None:  # masked logits were replaced by a constant: no gradient reaches them
        dlogits = jnp.where(keep, dlogits, 0.0)
    ds = (dlogits * scale).astype(q.dtype)
    dq = jnp.einsum("bnts,bnsh->bnth", ds, k)
    dk = jnp.einsum("bnst,bnth->bnsh", jnp.swapaxes(ds, 2, 3), q)
    return dq, dk, dv, None


_einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


def einsum_attention(q, k, v, mask=None, causal: bool = False):
    """softmax(q k^T / sqrt(head_dim)) v of q (B, T, N, H) over k, v (B, S, N, H) -> (B, T, N, H).

    `mask` broadcasts to (B, N, T, S), True = attend; `causal` keeps key s <= query t. The same maths, fill value
    and float32 softmax as `jax.nn.dot_product_attention(..., implementation='xla')`, computed head-major
    ((B, N, T, H): each head's products are contiguous batched matmuls) with a hand-written gradient, because
    XLA:CPU runs batched matmuls fastest with leading batch dimensions (docs/design.md, pitfalls). The residuals are
    q, k, v and the float32 probabilities.
    """
    heads = lambda a: jnp.swapaxes(a, 1, 2)
    keep = _keep_mask(q.shape[1], k.shape[1], mask, causal)
    return heads(_einsum_attention(heads(q), heads(k), heads(v), keep))


def attend(kernel: str, q, k, v, kv_mask=None, causal: bool = False):
    """softmax(q k^T / sqrt(head_dim)) v of q (B, T, N, H) over k, v (B, S, N, H) by the named kernel
    (`ATTENTION_IMPLS`); `kv_mask` (B, S) is True on the keys to attend (a prefix of each row for 'cudnn')."""
    kernel = check_attention(kernel)
    if kernel == "cudnn":
        return cudnn_attention(q, k, v, causal, None if kv_mask is None else prefix_lengths(kv_mask))
    mask = None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, S)
    if kernel == "einsum":
        return einsum_attention(q, k, v, mask, causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def prefix_lengths(kv_mask):
    """(B, S) bool key mask that is True on a prefix of each row -> (B,) int32 lengths (cuDNN's padding form)."""
    return kv_mask.astype(jnp.int32).sum(-1)


def cudnn_attention(q, k, v, causal: bool, kv_lengths=None):
    """cuDNN's fused attention of q (B, T, N, H) over k, v (B, S, N, H); kv_lengths (B,) masks keys beyond them.

    JAX's cuDNN path (0.10-0.11) refuses odd T or S when differentiated ("Unsupported sequence length Q 193, KV
    193" on an H200: it counts its own empty placeholder bias as a bias, and biased attention needs even lengths),
    and CLIP's are odd (1 + 192 patches, 77 tokens). So an odd axis is padded by one: the extra key is cut off by
    the lengths, the extra query row is dropped. Causal attention needs no special case: a padded key comes after
    every real query.
    """
    t, s = q.shape[1], k.shape[1]
    if s % 2 and kv_lengths is None:
        kv_lengths = jnp.full((q.shape[0],), s, jnp.int32)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, a.shape[1] % 2), (0, 0), (0, 0)))
    y = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), is_causal=causal, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )
    return y[:, :t]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (the HF layout, torch MultiheadAttention's maths).

    Self-attention when `kv` is None; cross-attention otherwise (keys and values projected from `kv`'s own width,
    like torch's kdim/vdim). `kv_mask` (B, S) bool, True = attend. Scale head_dim ** -0.5, as in CLIP.
    `attention` picks the kernel (`ATTENTION_IMPLS`). With 'cudnn', `kv_mask` must be True on a prefix of each row
    (a caption's tokens up to its end-of-text token, as `CLIP.encode_text` makes it): cuDNN takes it as lengths.
    """

    width: int
    heads: int
    causal: bool = False
    in_std: float | None = None
    out_std: float | None = None
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv=None, kv_mask=None):
        """x (B, T, Dq), kv (B, S, Dkv) or None -> (B, T, width)."""
        if self.width % self.heads:
            raise ValueError(f"Attention: width={self.width} is not divisible by heads={self.heads}.")
        kv = x if kv is None else kv

        def dense(name, std):
            init = _kernel_init(std)
            return Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)

        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.width // self.heads)  # (B, T, heads, head_dim)
        q = split(dense("q_proj", self.in_std)(x))
        k = split(dense("k_proj", self.in_std)(kv))
        v = split(dense("v_proj", self.in_std)(kv))
        y = attend(self.attention, q, k, v, kv_mask, self.causal)
        return dense("out_proj", self.out_std)(y.reshape(*y.shape[:-2], self.width))


class MLP(nn.Module):
    """fc1 -> activation -> fc2, back to the input width."""

    hidden: int
    act: str = "quick_gelu"
    fc_std: float | None = None
    proj_std: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Dense(self.hidden, kernel_init=_kernel_init(self.fc_std), name="fc1", **kw)(x)
        y = activation(self.act)(y)
        return Dense(x.shape[-1], kernel_init=_kernel_init(self.proj_std), name="fc2", **kw)(y)


class Block(nn.Module):
    """Pre-LN residual block (CLIP's ResidualAttentionBlock): x + attn(ln1(x)), then x + mlp(ln2(x))."""

    width: int
    heads: int
    mlp: int  # hidden size of the MLP
    act: str = "quick_gelu"
    eps: float = LN_EPS
    causal: bool = False
    attn_std: float | None = None
    proj_std: float | None = None
    fc_std: float | None = None
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.eps, name="layer_norm1", **kw)(x)
        attn = Attention(
            self.width, self.heads, self.causal, self.attn_std, self.proj_std, self.attention, name="self_attn", **kw
        )
        x = x + attn(h)
        h = LayerNorm(self.eps, name="layer_norm2", **kw)(x)
        return x + MLP(self.mlp, self.act, self.fc_std, self.proj_std, name="mlp", **kw)(h)


# The residual stream's gradient, written to memory once per block (XLA:CPU). In an unrolled stack XLA:CPU fuses
# the chain dx_i = dx_{i+1} + f_i into every consumer of each dx_i, so each re-reads every later block's outputs
# (depth squared in time and program size); it cannot fuse across a conditional that computes, so the backward
# below sends the cotangent through a `lax.cond` on a runtime predicate whose branches multiply by a runtime 1: the
# same gradient, each dx_i written once (docs/design.md, the pitfall and the decision). It made the ViT-B/16
# batch-8 CPU step 1.5x faster; on CPU only, as a GPU conditional waits for its predicate on the host.
# UIT_JAX_GRAD_BARRIER=1 / 0 forces it on / off (read at trace time).
GRAD_BARRIER_ENV = "UIT_JAX_GRAD_BARRIER"


def grad_barrier_enabled() -> bool:
    """Whether `blocks` puts `residual_grad_barrier` before each block: $UIT_JAX_GRAD_BARRIER (1/0), else CPU only."""
    value = os.environ.get(GRAD_BARRIER_ENV, "auto").strip().lower()
    if value in ("1", "on", "true"):
        return True
    if value in ("0", "off", "false"):
        return False
    if value not in ("", "auto"):
        raise ValueError(f"{GRAD_BARRIER_ENV}={value!r}: use 1 (on), 0 (off) or auto (on for CPU only).")
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def residual_grad_barrier(x):
    """The identity; its gradient is the same cotangent, written to memory once (see the comment above)."""
    return x


def _barrier_fwd(x):
    return x, None


def _barrier_bwd(_, g):
    pred = g.reshape(-1)[0] > 0  # any runtime predicate: both branches are the identity
    one = pred.astype(g.dtype) + (~pred).astype(g.dtype)  # always exactly 1, but a runtime value XLA cannot fold
    return (jax.lax.cond(pred, lambda a: a * one, lambda a: a * one, g),)


residual_grad_barrier.defvjp(_barrier_fwd, _barrier_bwd)


# Rematerialisation policies (`remat`): which activations of a block the backward pass keeps rather than recomputes.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs, recompute the rest
}


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)} ('none' turns it off).")
    return remat


def blocks(parent: nn.Module, x, count: int, prefix: str, *, scan: bool = False, remat: str = "none", **block_kw):
    """Runs `count` Blocks (children of `parent`, called from its compact method) on x.

    The layers' parameters live stacked, one subtree named `{prefix}` without its '_' (`layers`) whose leaves carry
    a leading layer axis (`stacking.py`; checkpoints and Hugging Face state dicts hold them unrolled, `layers_0`,
    ...). They run under Flax's `nn.scan` (`jax.lax.scan`) either way:
      scan=False: unrolled, one copy of the block per layer in the program, each reading its layer's slice
        (XLA:CPU runs this fastest: docs/benchmarks.md);
      scan=True: rolled, one copy of the block in a loop, so compile time does not grow with depth.
    The same function either way, and the same parameters.
      remat: 'none' | 'full' | 'dots' (`REMAT_POLICIES`): recompute the block's activations in the backward pass
        instead of keeping them (memory for compute), per block.
    Unrolled, `residual_grad_barrier` sits before each block where `grad_barrier_enabled()` (CPU by default); rolled,
    the loop itself materialises the residual's gradient.
    """
    policy = REMAT_POLICIES[check_remat(remat)]
    if count == 0:
        return x
    # Rolled, XLA cannot merge a recomputation with the forward pass, so the CSE guard is not needed there.
    cls = Block if remat == "none" else nn.remat(Block, policy=policy, prevent_cse=not scan)
    barrier = not scan and grad_barrier_enabled()

    def body(block, h, _):
        return block(residual_grad_barrier(h) if barrier else h), None

    run = nn.scan(
        body, variable_axes={"params": 0}, split_rngs={"params": True}, length=count, unroll=1 if scan else count
    )
    x, _ = run(cls(**block_kw, name=stacking.stacked_name(prefix)), x, None)
    return x


def init_stds(width: int, layers: int) -> dict[str, float]:
    """CLIP's (and SEN's, IRRA's) init for new transformer modules: attn in, out projections, MLP fc1."""
    attn_std = width**-0.5
    return dict(attn_std=attn_std, proj_std=attn_std * (2 * max(layers, 1)) ** -0.5, fc_std=(2 * width) ** -0.5)
