"""evaluate.py: the Evaluator on the mesh, through padding and masks, with fake encoders whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uit_jax import evaluate, sharding

IDS = 6


def _batches(values, pids, batch, make):
    """Padded batches as the pipeline yields them: padding rows have mask False, pid -1 and value 0."""
    n = -(-len(values) // batch) * batch
    v = np.zeros(n, np.int32)
    p = np.full(n, -1, np.int32)
    v[: len(values)], p[: len(values)] = values, pids
    mask = np.arange(n) < len(values)
    return [dict(make(v[i : i + batch]), pid=p[i : i + batch], mask=mask[i : i + batch]) for i in range(0, n, batch)]


def test_fake_id_encoder_scores_100_through_padding_and_mask():
    mesh = sharding.make_mesh({"data": -1})  # 8 simulated devices: batches split 8 ways, then gathered
    rng = np.random.default_rng(0)
    g_pid = np.concatenate([np.arange(IDS), rng.integers(0, IDS, 7)])  # 13 images: every id, some twice
    q_pid = rng.integers(0, IDS, 21)  # 21 captions
    # Encoders that read the identity off the input: images carry it in pixel (0, 0, 0), captions in token 0.
    # Padding rows (value 0) would encode as identity 0 and tie with its real images if the mask were ignored.
    gallery = _batches(g_pid, g_pid, 8, lambda v: {"images": np.broadcast_to(v[:, None, None, None], (8, 4, 2, 3))})
    queries = _batches(q_pid, q_pid, 8, lambda v: {"text": np.repeat(v[:, None], 5, 1)})
    enc_img = lambda params, x: jax.nn.one_hot(x[:, 0, 0, 0].astype(jnp.int32), IDS)
    enc_txt = lambda params, ids: jax.nn.one_hot(ids[:, 0], IDS)
    ev = evaluate.Evaluator("val", None, gallery, queries, evaluate.jit_encoders(enc_img, enc_txt, mesh), mesh)
    with jax.set_mesh(mesh):
        res = ev(None)
    assert res["num_gallery"] == 13 and res["num_queries"] == 21
    assert {k: res[k] for k in ("R1", "R5", "R10", "mAP", "mINP")} == dict.fromkeys(
        ("R1", "R5", "R10", "mAP", "mINP"), 100.0
    )
    # Image-to-text on the same embeddings: every image ranks the captions of its person first.
    assert {k: res[k] for k in evaluate.I2T_METRICS} == dict.fromkeys(evaluate.I2T_METRICS, 100.0)
    # A wrong encoder scores below 100: the check can fail.
    shifted = lambda params, ids: jax.nn.one_hot((ids[:, 0] + 1) % IDS, IDS)
    ev = evaluate.Evaluator("val", None, gallery, queries, evaluate.jit_encoders(enc_img, shifted, mesh), mesh)
    with jax.set_mesh(mesh):
        bad = ev(None)
    assert bad["R1"] < 50.0 and bad["i2t_R1"] < 50.0


def test_empty_split_is_an_error():
    mesh = sharding.make_mesh({"data": -1})
    enc = evaluate.jit_encoders(lambda p, x: x, lambda p, x: x, mesh)
    with pytest.raises(ValueError, match="no images batches"):
        evaluate.Evaluator("val", None, [], [], enc, mesh)(None)


def test_format_table():
    row = {"R1": 50.0, "R5": 75.5, "R10": 80.0, "mAP": 40.25, "mINP": 30.0}
    table = evaluate.format_table({"test @ step 4": row})
    assert table.splitlines()[1].split() == ["test", "@", "step", "4", "50.00", "75.50", "80.00", "40.25", "30.00"]
    both = dict(row, i2t_R1=60.0, i2t_R5=70.0, i2t_R10=90.0, i2t_mAP=45.5, i2t_mINP=1.0)
    head, line = evaluate.format_table({"test": both}).splitlines()
    assert head.split() == ["split", "R1", "R5", "R10", "mAP", "mINP", "i2t_R1", "i2t_R5", "i2t_R10", "i2t_mAP"]
    assert line.split()[-4:] == ["60.00", "70.00", "90.00", "45.50"]


def test_cadence_every_n_steps_and_at_the_end():
    ev = evaluate.Evaluator("val", None, [], [], (None, None), None, every_steps=3)
    assert [s for s in range(1, 11) if ev.due(s, 10)] == [3, 6, 9, 10]
    assert not evaluate.Evaluator("val", None, [], [], (None, None), None).due(10, 10)  # 0: only when asked
