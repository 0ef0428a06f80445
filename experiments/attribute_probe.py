"""What a model's embeddings know about each attribute of the synthetic set, and which attributes its mistakes get
wrong.

    python tools/attribute_probe.py --data_root ~/uit_data/synthetic_pedes/<set> (--workdir RUN | --model DIR)
        [--split test] [--step best] [--supervised STEPS]

For every attribute (gender, hair, each garment's type and colour, pattern, shoes, bag, headwear) a linear probe
(ridge regression on one-hot labels) is fitted on the unit-norm embeddings of half the identities and scored on the
other half: image embeddings for every image, text embeddings for the captions that name the attribute. Accuracy
near the majority rate means the embedding does not carry the attribute. Then, for every query whose top-1 image
shows another person, the attributes its caption names that the top-1 person does not have are counted.

`--supervised STEPS` (with `--model`, a CLIP folder) asks whether the image tower *can* read each attribute: it
fine-tunes the tower with one linear head per attribute on the image embedding (cross-entropy, the sum over
attributes) on the train split's images for STEPS steps of 128, then prints each head's accuracy on the split's
images, beside a ridge regression on the raw pixels fitted on the same images (what a linear model reads). An
attribute the heads learn there but the retrieval embedding does not carry is missing for want of a training signal.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import caption_oracle  # noqa: E402
from uit_jax import retrieval  # noqa: E402
from uit_jax.data import images  # noqa: E402
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


def _images(root: str, annos: list[dict], size) -> np.ndarray:
    """The split's images, resized to `size` (H, W) and CLIP-normalised as the trainer reads them; float32."""
    return images.normalize(images.load_batch([os.path.join(root, "imgs", x["file_path"]) for x in annos], size)[0])


def supervised(
    model_dir: str,
    root: str,
    split: str,
    size,
    steps: int,
    batch: int = 128,
    lr: float = 1e-3,
    stride: int | None = None,
    random_init: bool = False,
) -> dict:
    """Accuracy per attribute on `split` after fine-tuning the image tower with attribute heads on 'train'.

    `stride`: the patch stride (overlapping patches below the patch size); `random_init`: the folder's architecture
    with fresh weights instead of its own."""
    import jax
    import jax.numpy as jnp
    import optax

    from uit_jax.models import convert

    model, params = convert.load(model_dir, image_size=size, stride=stride)
    if random_init:
        dummy = (jnp.zeros((1, *size, 3)), jnp.zeros((1, model.config.text_len), jnp.int32))
        params = jax.jit(model.init)(jax.random.key(1), *dummy)["params"]
    everyone = synth.identities(synth.read_spec(root))
    values = {f: sorted({str(getattr(v, f)) for v in everyone}) for f in FIELDS}
    n_cls = {f: len(v) for f, v in values.items()}
    data = {}
    for name in ("train", split):
        idents, annos = caption_oracle.read_split(root, name)
        labels = {
            f: np.array([v.index(str(getattr(idents[x["id"]], f))) for x in annos], np.int32) for f, v in values.items()
        }
        data[name] = (_images(root, annos, size), labels)
    width = model.config.embed_dim
    rng = jax.random.key(0)
    heads = {f: {"w": jax.random.normal(jax.random.fold_in(rng, i), (width, n)) * 0.01, "b": jnp.zeros(n)}
             for i, (f, n) in enumerate(n_cls.items())}  # fmt: skip
    state = {"clip": jax.tree.map(jnp.asarray, params), "heads": heads}
    tx = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=1e-4)
    opt = tx.init(state)

    def logits(state, x):
        z = model.apply({"params": state["clip"]}, x, method=model.encode_image)["embed"]
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        return {f: 10.0 * z @ h["w"] + h["b"] for f, h in state["heads"].items()}

    @jax.jit
    def step(state, opt, x, y):
        def loss_fn(s):
            out = logits(s, x)
            return sum(optax.softmax_cross_entropy_with_integer_labels(out[f], y[f]).mean() for f in FIELDS)

        loss, g = jax.value_and_grad(loss_fn)(state)
        upd, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, upd), opt, loss

    x_tr, y_tr = data["train"]
    batch = min(batch, len(x_tr))
    np_rng = np.random.default_rng(0)
    for i in range(steps):
        idx = np_rng.choice(len(x_tr), batch, replace=False)
        flip = np_rng.uniform(size=batch) < 0.5
        x = np.where(flip[:, None, None, None], x_tr[idx][:, :, ::-1], x_tr[idx])
        state, opt, loss = step(state, opt, x, {f: v[idx] for f, v in y_tr.items()})
        if (i + 1) % 50 == 0 or i + 1 == steps:
            print(f"supervised step {i + 1}/{steps}: loss {float(loss):.3f}")
    x_te, y_te = data[split]
    pred = jax.jit(logits)
    outs = [pred(state, x_te[i : i + 256]) for i in range(0, len(x_te), 256)]
    return {f: float((np.concatenate([o[f].argmax(-1) for o in outs]) == y_te[f]).mean()) for f in FIELDS}


def pixel_baseline(root: str, split: str, size=(64, 32), ridge: float = 100.0) -> dict:
    """Accuracy per attribute on `split` of a ridge regression on the raw pixels (standardised, at `size`),
    fitted on the train split's images: what a linear model reads without any learnt features."""
    xs, ys = {}, {}
    for name in ("train", split):
        idents, annos = caption_oracle.read_split(root, name)
        xs[name] = _images(root, annos, size).reshape(len(annos), -1).astype(np.float64)
        ys[name] = {f: np.array([str(getattr(idents[x["id"]], f)) for x in annos]) for f in FIELDS}
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-3
    x_tr, x_te = (np.c_[(xs[n] - mu) / sd, np.ones(len(xs[n]))] for n in ("train", split))
    gram = x_tr.T @ x_tr + ridge * np.eye(x_tr.shape[1])
    out = {}
    for f in FIELDS:
        keys = np.unique(ys["train"][f])
        w = np.linalg.solve(gram, x_tr.T @ (ys["train"][f][:, None] == keys[None, :]))
        out[f] = float((keys[(x_te @ w).argmax(1)] == ys[split][f]).mean())
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_root", required=True, help="a generated synthetic set (holds synthetic_spec.json)")
    p.add_argument("--workdir", default="", help="a training run (its checkpoint --step)")
    p.add_argument("--model", default="", help="or an exported folder / HF CLIP folder (then --image_size)")
    p.add_argument("--image_size", default="128,64")
    p.add_argument("--step", default="best")
    p.add_argument("--split", default="test")
    p.add_argument("--supervised", type=int, default=0, help="STEPS: also train attribute heads (see above)")
    a = p.parse_args(argv)
    if a.supervised and not a.model:
        raise SystemExit("--supervised needs --model (a CLIP folder in Hugging Face layout).")
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
    if a.supervised:
        acc = supervised(a.model, root, a.split, size, a.supervised)
        pix = pixel_baseline(root, a.split)
        out["supervised"], out["pixels"] = acc, pix
        print(
            f"accuracy on {a.split}: image tower trained on the attributes ({a.supervised} steps) / ridge on raw pixels"
        )
        for f in FIELDS:
            embedding = out["probes"][f]["image"]
            print(f"{f:12s} {acc[f]:6.3f} / {pix[f]:.3f}   (probe of the retrieval embedding: {embedding:.3f})")
    return out


if __name__ == "__main__":
    main()
