"""tools/caption_oracle.py: reads exactly the attributes a caption states, and ranks by them."""

import numpy as np
import pytest

from experiments import caption_oracle
from uit_jax.data import synthetic as synth


def test_every_attribute_read_is_true_and_most_are_read():
    named = []
    for i in range(300):
        ident = synth.sample_identity(np.random.default_rng([5, i]))
        rng = np.random.default_rng([5, i, 7])
        for _ in range(3):
            cap = synth.make_caption(ident, rng)
            got = caption_oracle.caption_attributes(cap)
            wrong = {k: v for k, v in got.items() if getattr(ident, k) != v}
            assert not wrong, (wrong, cap)
            named.append(len(got))
    assert np.mean(named) > 8  # gender, hair (2), upper garment and colour, lower (2), shoes (2), ...


def test_oracle_ranks_by_named_attributes():
    ids = {p: synth.sample_identity(np.random.default_rng([9, p])) for p in (1, 2, 3)}
    annos = [{"id": p, "captions": [f"A {ids[p].gender} in {ids[p].upper_color} {ids[p].upper}."]} for p in ids]
    assert len({(i.gender, i.upper_color, i.upper) for i in ids.values()}) == 3  # the captions separate them
    out = caption_oracle.oracle_metrics(annos, ids, draws=2)
    assert out["R1"] == 100.0 and out["mAP"] == 100.0
    # Captions that name nothing: ranking is a coin toss among the three images.
    blank = [{"id": p, "captions": ["A person."]} for p in ids]
    assert caption_oracle.oracle_metrics(blank, ids, draws=5)["R1"] < 100.0


def test_oracle_restricted_to_some_fields():
    ids = {p: synth.sample_identity(np.random.default_rng([11, p])) for p in range(1, 41)}
    annos = [{"id": p, "captions": [synth.make_caption(ids[p], np.random.default_rng([11, p, 1]))]} for p in ids]
    full = caption_oracle.oracle_metrics(annos, ids, draws=3)
    upper = caption_oracle.oracle_metrics(annos, ids, draws=3, fields=("upper_color",))
    assert caption_oracle.oracle_metrics(annos, ids, draws=3, fields=())["R1"] < upper["R1"] <= full["R1"]
    with pytest.raises(ValueError, match="Unknown attribute field"):
        caption_oracle.oracle_metrics(annos, ids, fields=("colour",))
