"""What a model's embeddings know about each attribute of the synthetic set, and which attributes its mistakes get
wrong.

    python tools/attribute_probe.py --data_root ~/uit_data/synthetic_pedes/<set> (--workdir RUN | --model DIR)
        [--split test] [--step best]

For every attribute (gender, hair, each garment's type and colour, pattern, shoes, bag, headwear) a linear probe
(ridge regression on one-hot labels) is fitted on the unit-norm embeddings of half the identities and scored on the
other half: image embeddings for every image, text embeddings for the captions that name the attribute. Accuracy
near the majority rate means the embedding does not carry the attribute. Then, for every query whose top-1 image
shows another person, the attributes its caption names that the top-1 person does not have are counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import caption_oracle  # noqa: E402
from uit_jax import retrieval  # noqa: E402
from uit_jax.data import synthetic as synth  # noqa: E402

FIELDS = [f for f in synth.Identity.__dataclass_fields__ if f != "skin"]


def probe(z: np.ndarray, labels: list, pids: np.ndarray, ridge: float = 1e-2) -> tuple[float, float]:
    """(held-out accuracy, majority rate): a ridge probe trained on the first half of the identities."""
    keys = sorted(set(labels))
    y = np.array([[lab == k for k in keys] for lab in labels], np.float64)
    ids = np.unique(pids)
    train = np.isin(pids, ids[: len(ids) // 2])
    x = np.c_[z, np.ones(len(z))]
    w = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ y[train])
    acc = float(((x[~train] @ w).argmax(1) == y[~train].argmax(1)).mean())
    return acc, float(y[~train].mean(0).max())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_root", required=True, help="a generated synthetic set (holds synthetic_spec.json)")
    p.add_argument("--workdir", default="", help="a training run (its checkpoint --step)")
    p.add_argument("--model", default="", help="or an exported folder / HF CLIP folder (then --image_size)")
    p.add_argument("--image_size", default="128,64")
    p.add_argument("--step", default="best")
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    root = os.path.expanduser(a.data_root)
    idents, annos = caption_oracle.read_split(root, a.split)
    size = tuple(int(s) for s in a.image_size.split(","))
    r = retrieval.Retriever.load(a.workdir or a.model, image_size=size, step=a.step)
    z_img = r.encode_images([os.path.join(root, "imgs", x["file_path"]) for x in annos])
    caps = [(c, x["id"]) for x in annos for c in x["captions"]]
    z_txt = r.encode_text([c for c, _ in caps])
    g_pid, q_pid = np.array([x["id"] for x in annos]), np.array([p for _, p in caps])
    named = [caption_oracle.caption_attributes(c) for c, _ in caps]
    top = (z_txt @ z_img.T).argmax(1)
    wrong = g_pid[top] != q_pid
    out = {"R1": round(100 * float(1 - wrong.mean()), 2), "probes": {}, "top1_wrong_attribute_rate": {}}
    print(f"{a.split}: R1 {out['R1']}; linear probes (held-out identities): accuracy / majority rate")
    print(f"{'attribute':12s} {'image':>12s} {'text':>12s}   top-1 mistakes that contradict it")
    n_named, n_bad = collections.Counter(), collections.Counter()
    for i in np.flatnonzero(wrong):
        for f, v in named[i].items():
            n_bad[f] += getattr(idents[g_pid[top[i]]], f) != v
    for i in range(len(caps)):
        for f in named[i]:
            n_named[f] += 1
    for f in FIELDS:
        ai, mi = probe(z_img, [getattr(idents[p], f) for p in g_pid], g_pid)
        sel = [i for i in range(len(caps)) if f in named[i]]
        at, mt = probe(z_txt[sel], [getattr(idents[q_pid[i]], f) for i in sel], q_pid[sel]) if sel else (0.0, 0.0)
        rate = n_bad[f] / max(n_named[f], 1)
        out["probes"][f] = {"image": ai, "image_majority": mi, "text": at, "text_majority": mt}
        out["top1_wrong_attribute_rate"][f] = rate
        print(f"{f:12s} {ai:6.3f}/{mi:.2f} {at:6.3f}/{mt:.2f}   {rate:.3f} of the captions naming it")
    return out


if __name__ == "__main__":
    main()
