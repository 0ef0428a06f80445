"""Tests for uit_jax/optim.py: torch.optim.Adam with param groups, SEN's grouping and scheduler formulas."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from uit_jax import optim
from uit_jax.models import stacking

SHAPES = {
    "classifier": {"kernel": (3, 4), "bias": (4,)},
    "decoder": {"cross_attn": {"kernel": (2, 3), "bias": (3,)}},
    "clip": {"text": {"ln": {"scale": (3,), "bias": (3,)}, "dense": {"kernel": (3, 3)}}},
}
# Rules for these unit tests (x5 new modules first, then biases x2; biases never decay) and the expectation,
# by hand. The trainer's table is the config's (configs/common.py), tested against SEN's rule below.
RULES = ((r"^(classifier|decoder|mlm)/", 5.0), (r"(^|/)bias$", 2.0))
NO_DECAY = (r"(^|/)bias$",)
EXPECTED = {
    "classifier/kernel": (5.0, True),
    "classifier/bias": (5.0, False),
    "decoder/cross_attn/kernel": (5.0, True),
    "decoder/cross_attn/bias": (5.0, False),
    "clip/text/ln/scale": (1.0, True),
    "clip/text/ln/bias": (2.0, False),
    "clip/text/dense/kernel": (1.0, True),
}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
    )


def _flat(tree):
    return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def sen_lr_factor(base, warmup_factor, w, e_total, end, epoch):
    """SEN/IRRA LRSchedulerWithWarmup (linear warm-up, cosine) at a (possibly fractional) epoch."""
    if epoch < w:
        a = epoch / w
        return base * (warmup_factor * (1 - a) + a)
    ratio = min((epoch - w) / (e_total - w), 1.0)
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * ratio))


def test_multipliers_and_mask():
    params = _params()
    mult = _flat(optim.lr_multipliers(params, RULES))
    mask = _flat(optim.decay_mask(params, NO_DECAY))
    assert {k: (mult[k], bool(mask[k])) for k in mult} == EXPECTED


def sen(name):
    """SEN's if-chain (solver/build.py) on a parameter name: (lr factor, weight decay applies)."""
    lr, wd = 1.0, True
    if "cross" in name:
        lr = 5.0
    if "bias" in name:
        lr, wd = 2.0, False
    if "classifier" in name or "mlm_head" in name:
        lr = 5.0
    return lr, wd


def test_sen_grouping_reproduced_by_explicit_rules():
    """SEN's if-chain (cross x5; bias x2, no decay; classifier/mlm_head x5) on torch-style names."""
    names = [
        "classifier/kernel",
        "classifier/bias",
        "mlm_head/fc/bias",
        "mlm_head/dense/kernel",
        "cross_attn_mlm/out_proj/kernel",
        "cross_attn_mlm/out_proj/bias",
        "cross_modal_transformer_mae/resblocks_0/mlp/c_fc/bias",
        "base_model/visual/ln_post/bias",
        "base_model/visual/ln_post/scale",
        "decoder_pred/bias",
        "decoder_pred/kernel",
    ]
    params = {n: np.zeros(1, np.float32) for n in names}  # flat dict keyed by the full path
    rules = ((r"^(classifier|mlm_head)/", 5.0), (r"(^|/)bias$", 2.0), (r"cross", 5.0))
    mult = optim.lr_multipliers(params, rules)
    mask = optim.decay_mask(params, NO_DECAY)
    for n in names:
        assert (mult[n], mask[n]) == sen(n), n


def test_first_matching_rule_wins():
    params = {"decoder": {"cross_attn": {"kernel": np.zeros(2)}}, "other": {"kernel": np.zeros(2)}}
    a = optim.lr_multipliers(params, ((r"cross", 3.0), (r"decoder", 7.0)))
    b = optim.lr_multipliers(params, ((r"decoder", 7.0), (r"cross", 3.0)))
    assert a["decoder"]["cross_attn"]["kernel"] == 3.0 and b["decoder"]["cross_attn"]["kernel"] == 7.0
    assert a["other"]["kernel"] == 1.0
    # a bias rule listed after a module rule loses to it, listed first it wins
    p = {"decoder": {"bias": np.zeros(2)}}
    assert optim.lr_multipliers(p, ((r"^decoder/", 5.0),))["decoder"]["bias"] == 5.0
    assert optim.lr_multipliers(p, ((r"(^|/)bias$", 2.0), (r"^decoder/", 5.0)))["decoder"]["bias"] == 2.0


def _run_against_torch(grad_clip, dtype):
    base, wd, spe, epochs, warm = 1e-2, 0.05, 2, 5, 1
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), _params(1))
    schedule = optim.make_schedule(
        base_lr=base, steps_per_epoch=spe, epochs=epochs, warmup_epochs=warm, warmup_factor=0.1
    )
    tx = optim.make_optimizer(
        params,
        schedule=schedule,
        eps=1e-3,
        weight_decay=wd,
        grad_clip=grad_clip,
        lr_rules=RULES,
        no_decay_rules=NO_DECAY,
    )

    flat = {k: np.asarray(v) for k, v in _flat(params).items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in flat.items()}
    groups = [
        {"params": [tparams[k]], "lr": base * EXPECTED[k][0], "weight_decay": wd if EXPECTED[k][1] else 0.0}
        for k in flat
    ]
    topt = torch.optim.Adam(groups, lr=base, betas=(0.9, 0.999), eps=1e-3)
    factors = [EXPECTED[k][0] for k in flat]

    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for step in range(7):
        grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)

        lr_now = sen_lr_factor(base, 0.1, warm, epochs, 0.0, step / spe)  # torch's scheduler sets group lrs
        for g, f in zip(topt.param_groups, factors):
            g["lr"] = lr_now * f
        gflat = _flat(grads)
        for k, t in tparams.items():
            t.grad = torch.tensor(np.asarray(gflat[k]))
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), grad_clip)
        topt.step()
    got = {k: np.asarray(v) for k, v in _flat(params).items()}
    # the comparison can fail: every tensor moved by far more than the tolerance
    assert min(np.abs(got[k] - flat[k]).max() for k in flat) > 1e-3
    return got, {k: t.detach().numpy() for k, t in tparams.items()}


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_matches_torch_adam_param_groups_float64(grad_clip):
    with jax.enable_x64(True):
        got, ref = _run_against_torch(grad_clip, jnp.float64)
    for k in ref:
        assert got[k].dtype == np.float64
        # the schedule is evaluated in float32 (relative 6e-8), hence not 1e-12
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-7, err_msg=k)


def test_matches_torch_adam_param_groups_float32():
    got, ref = _run_against_torch(None, jnp.float32)
    for k in ref:
        # optax forms Adam's bias corrections (1 - 0.999^t) in float32 (relative error ~1e-5 at t=1), torch
        # in Python floats: a few 1e-6 apart after 7 steps at lr up to 5e-2.
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=5e-6, err_msg=k)


def test_coupled_decay_differs_from_adamw():
    params = {"w": jnp.ones((4,))}
    grads = {"w": jnp.full((4,), 0.01)}
    tx = optim.make_optimizer(params, schedule=0.1, weight_decay=1.0, lr_rules=(), eps=1e-8)
    ours, _ = tx.update(grads, tx.init(params), params)
    adamw = optax.adamw(0.1, weight_decay=1.0, eps=1e-8)
    theirs, _ = adamw.update(grads, adamw.init(params), params)
    # coupled: Adam normalises (g + wd p) -> step ~ -lr; AdamW: -lr * (1 + wd) = -0.2
    np.testing.assert_allclose(np.asarray(ours["w"]), -0.1, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(theirs["w"]), -0.2, rtol=1e-4)


def test_schedule_values():
    base, spe, epochs, warm = 2e-5, 10, 60, 5
    s = optim.make_schedule(base_lr=base, steps_per_epoch=spe, epochs=epochs, warmup_epochs=warm)
    np.testing.assert_allclose(float(s(0)), 0.1 * base, rtol=1e-6)  # warm-up start
    np.testing.assert_allclose(float(s(warm * spe // 2)), base * (0.1 + 0.9 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(float(s(warm * spe)), base, rtol=1e-6)  # end of warm-up
    mid = (warm + (epochs - warm) / 2) * spe
    np.testing.assert_allclose(float(s(mid)), base / 2, rtol=1e-5)  # cosine midpoint
    assert float(s(epochs * spe)) == pytest.approx(0.0, abs=1e-12)  # end
    assert float(s(10 * epochs * spe)) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    for step in (3, 57, 123, 444, 599):
        ref = sen_lr_factor(base, 0.1, warm, epochs, 0.0, step / spe)
        np.testing.assert_allclose(float(s(step)), ref, rtol=1e-5, atol=1e-6 * base)


def test_schedule_equals_sen_at_each_epoch_start_with_an_end_factor():
    base, spe, epochs, warm = 1e-3, 4, 12, 3
    s = optim.make_schedule(base_lr=base, steps_per_epoch=spe, epochs=epochs, warmup_epochs=warm, end_lr_factor=0.1)
    for e in range(epochs):  # SEN steps its scheduler once per epoch: its value for epoch e
        ref = sen_lr_factor(base, 0.1, warm, epochs, 0.1 * base, e)
        np.testing.assert_allclose(float(s(e * spe)), ref, rtol=1e-5, err_msg=f"epoch {e}")
    np.testing.assert_allclose(float(s(epochs * spe)), 0.1 * base, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        optim.make_schedule(base_lr=1.0, steps_per_epoch=1, epochs=2, warmup_epochs=3)


def test_describe_groups_and_config_kwargs():
    params = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.asarray, _params()))
    table = optim.describe_groups(params, weight_decay=4e-5, lr_rules=RULES, no_decay_rules=NO_DECAY)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "tensors", "params", "lr", "factor", "weight", "decay"]
    rows = {tuple(re.split(r"\s{2,}", line.strip())) for line in lines[2:]}
    assert ("(^|/)bias$", "1", "3", "2", "0") in rows  # clip/text/ln/bias
    assert ("default", "2", "12", "1", "4e-05") in rows  # ln scale + dense kernel
    assert ("^(classifier|decoder|mlm)/", "2", "18", "5", "4e-05") in rows
    assert ("^(classifier|decoder|mlm)/", "2", "7", "5", "0") in rows

    cfg = {"b1": 0.8, "lr_rules": [["x", 2.0]], "grad_clip": 0.0, "lr": 1.0, "no_decay_rules": ["bias"]}
    kw = optim.config_kwargs(cfg)
    assert kw == {"b1": 0.8, "lr_rules": (("x", 2.0),), "grad_clip": None, "no_decay_rules": ("bias",)}
    with pytest.raises(ValueError, match="lr_rules"):
        optim.lr_multipliers(params, (("(", 2.0),))


def test_config_groups_for_vit_b16_follow_sen():
    """The config's one table, on the real ViT-B/16 UIT (with the MLM head), gives every parameter SEN's group.

    SEN (solver/build.py): lr x5 if the name contains 'cross'; then x2 and no weight decay if it contains 'bias';
    then x5 if it contains 'classifier' or 'mlm_head'. Applied by substring to the reference's name of each of our
    parameters (the decoder's and the MLM head's names differ: models/decoder.py lists the correspondence).
    """
    from configs import cuhk
    from uit_jax.models import clip, uit

    config = cuhk.get_config()
    model = uit.UIT(
        clip_config=clip.config_from_preset("vit-b16", image_size=(384, 128)), num_classes=11003, use_mlm=True
    )
    images, ids = jnp.zeros((1, 384, 128, 3)), jnp.zeros((1, 77), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids, rng=jax.random.key(1), mlm_text=ids))
    stacked = params["params"]
    params = stacking.unstack(stacked)  # by layer, as SEN names its parameters
    kw = optim.config_kwargs(config.optim)
    print("\n" + optim.describe_groups(stacked, **kw))  # pytest -s shows the groups
    decoder = dict(ln_img="norm_1", ln_txt="norm_2", embed="decoder_embed", ln_q="norm_4", ln_cross="norm_6")
    decoder.update(cross_attn="cross_attn_Text", ln_post="norm_7", pred="decoder_pred")

    def reference_name(name):
        top, first, rest = (name.split("/", 2) + ["", ""])[:3]
        layer = re.fullmatch(r"cross_layers_(\d+)", first)
        if top == "decoder":
            first = f"cross_modal_transformer_mae/resblocks_{layer[1]}" if layer else decoder.get(first, first)
            return f"{first}/{rest}"
        if top == "mlm_head":  # IRRA: only dense/ln/fc sit under mlm_head; the rest are top-level modules
            if first in ("dense", "ln", "fc"):
                return name
            return f"cross_modal_transformer/resblocks_{layer[1]}/{rest}" if layer else f"{first}/{rest}"
        return name.replace("clip/", "base_model/", 1)

    mult = _flat(optim.lr_multipliers(params, kw["lr_rules"]))
    mask = _flat(optim.decay_mask(params, kw["no_decay_rules"]))
    assert len(mult) > 400
    # The model's own (stacked) tree gets each layer's groups: the rules never name a layer.
    by_group = _flat(optim.lr_multipliers(stacked, kw["lr_rules"]))
    decays = _flat(optim.decay_mask(stacked, kw["no_decay_rules"]))
    for name in mult:
        group = re.sub(r"\b(layers|cross_layers)_\d+\b", r"\1", name)
        assert (by_group[group], decays[group]) == (mult[name], mask[name]), name
    for name in mult:
        assert (mult[name], mask[name]) == sen(reference_name(name)), (name, reference_name(name))
    # every group SEN has is present: the new modules x5 (with decay), biases x2 without, the CLIP towers x1
    assert {(mult[n], mask[n]) for n in mult} == {(5.0, True), (5.0, False), (2.0, False), (1.0, True)}
    assert mult["decoder/cross_attn/q_proj/kernel"] == 5.0 and mult["decoder/embed/kernel"] == 1.0
