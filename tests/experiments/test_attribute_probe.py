"""experiments/attribute_probe.py: linear probes find what is planted and nothing else; the supervised capacity
check learns the upper garment's colour; the tool runs on a trained workdir."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def test_attribute_probe(run, capsys):
    from experiments import attribute_probe

    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 8))
    pids = np.repeat(np.arange(100), 4)
    planted = ["a" if v > 0 else "b" for v in z[:, 0]]  # linearly decodable
    assert attribute_probe.probe(z, planted, pids)[0] > 0.85  # least-squares classification of a sign: ~0.94
    noise = list(rng.choice(["a", "b", "c"], 400))
    acc, majority = attribute_probe.probe(z, noise, pids)
    assert acc < majority + 0.15  # nothing to find: about the majority rate
    _, wd, root = run
    out = attribute_probe.main([f"--data_root={next((root / 'raw').glob('t*'))}", f"--workdir={wd}"])
    assert set(out["probes"]) == set(attribute_probe.FIELDS) and 0 <= out["R1"] <= 100
    assert "upper_color" in capsys.readouterr().out


def test_attribute_probe_supervised(run, tiny_hf_clip_dir):
    """The capacity check trains the image tower's attribute heads: on the images it trained on, the upper garment's
    colour (a large solid block) is read far better than by the untrained heads."""
    from experiments import attribute_probe

    _, _, root = run
    data_root = str(next((root / "raw").glob("t*")))
    kw = dict(batch=16, lr=3e-3)
    before = attribute_probe.supervised(tiny_hf_clip_dir, data_root, "train", (32, 16), 0, **kw)
    after = attribute_probe.supervised(tiny_hf_clip_dir, data_root, "train", (32, 16), 40, **kw)
    assert set(after) == set(attribute_probe.FIELDS)
    assert after["upper_color"] >= 0.75 and after["upper_color"] > before["upper_color"] + 0.3, (before, after)
    fresh = attribute_probe.supervised(tiny_hf_clip_dir, data_root, "train", (32, 16), 2, stride=4, random_init=True)
    assert set(fresh) == set(attribute_probe.FIELDS) and all(0 <= v <= 1 for v in fresh.values())
    fit = attribute_probe.pixel_baseline(data_root, "train", size=(16, 8), ridge=1e-6)  # 385 pixels, 32 images
    assert fit == {f: 1.0 for f in attribute_probe.FIELDS}  # interpolates its own training images
    with pytest.raises(SystemExit, match="--supervised needs --model"):
        attribute_probe.main([f"--data_root={data_root}", "--workdir=x", "--supervised=5"])
