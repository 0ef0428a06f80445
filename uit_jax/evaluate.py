"""The Evaluator: retrieval on one split, text-to-image and image-to-text, from its data to its report.

An Evaluator is built from config for a split (`Evaluator.from_config`) and owns that split's data (read once), its
padded gallery and query batches, the jitted encoders, the metrics, the per-query rankings and the HTML report. The
training loop (periodic validation), the final test and `--mode=eval` (`evaluate_run`) all use it.

Batches come padded to whole batches with a `mask` of real rows (every process runs the same number of steps);
embeddings are gathered to every host, padding rows are dropped, and `metrics.retrieval_metrics` ranks, in blocks of
queries, the split's images for every caption (text-to-image: `R1` ... `mINP`) and its captions for every image
(image-to-text, positives by person id: `i2t_R1` ... `i2t_mINP`). Importable without TensorFlow (the dataset is read
only in `from_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from absl import logging

from uit_jax import checkpoint as ckpt_lib
from uit_jax import config as config_lib
from uit_jax import metrics as metrics_lib
from uit_jax import report as report_lib
from uit_jax import rundir, sharding, steps
from uit_jax import state as state_lib
from uit_jax.data import eval_input

METRICS = ("R1", "R5", "R10", "mAP", "mINP")  # text-to-image
I2T_METRICS = tuple(f"i2t_{k}" for k in METRICS)  # image-to-text: each image ranks every caption of the split


def embed(fn: Callable, params, batches: Iterable[dict], key: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Runs `fn(params, batch[key])` over padded batches; returns (embeddings, pids) of the real rows, in order."""
    zs, pids = [], []
    for batch in batches:
        local = {key: batch[key], "pid": batch["pid"], "mask": batch["mask"]}
        g = sharding.host_batch_to_global(local, mesh)
        z = fn(params, g[key])
        z, pid, mask = (sharding.gather_to_host(x) for x in (z, g["pid"], g["mask"]))
        mask = mask.astype(bool)
        zs.append(np.asarray(z, np.float32)[mask])
        pids.append(np.asarray(pid)[mask])
    if not zs:
        raise ValueError(f"The evaluation split produced no {key} batches: is it empty?")
    return np.concatenate(zs), np.concatenate(pids)


def jit_encoders(encode_images, encode_texts, mesh):
    """Jits both encoders with a batch-sharded input; the params' placement is the caller's."""
    bs = sharding.batch_sharding(mesh)
    return (
        jax.jit(encode_images, in_shardings=(None, bs), out_shardings=bs),
        jax.jit(encode_texts, in_shardings=(None, bs), out_shardings=bs),
    )


@dataclasses.dataclass
class Evaluation:
    """One evaluation of a split: the metrics, and the (Q, G) cosine similarity with the query and gallery pids."""

    metrics: dict
    similarity: np.ndarray
    query_pids: np.ndarray
    gallery_pids: np.ndarray


class Evaluator:
    """Retrieval on one split: every caption queries the split's images (each once), and every image the captions."""

    def __init__(self, split: str, data, gallery, queries, encoders, mesh, *, every_steps: int = 0):
        self.split, self.data, self.gallery, self.queries, self.mesh = split, data, gallery, queries, mesh
        self.encode_images, self.encode_texts = encoders
        self.every_steps = every_steps  # cadence in the training loop; 0: only when asked

    @classmethod
    def from_config(cls, config, model, tokenizer, mesh, split: str, *, encoders=None, every_steps: int = 0):
        """The Evaluator of `split` of `config.data` for `model` (whose encoders are jitted here unless given)."""
        from uit_jax.data import prepare  # noqa: PLC0415 - TensorFlow, only where a dataset is read

        data = prepare.load_split(config.data, split)
        gallery, queries = eval_input.make_batches(
            config.data,
            tokenizer,
            data,
            batch_size=config.eval.batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        encoders = encoders or jit_encoders(*steps.make_encode_fns(model), mesh)
        return cls(split, data, gallery, queries, encoders, mesh, every_steps=every_steps)

    def due(self, step: int, last_step: int) -> bool:
        """Whether the training loop evaluates at `step`: every `every_steps`, and at the last step."""
        return bool(self.every_steps) and (step % self.every_steps == 0 or step == last_step)

    def run(self, params) -> Evaluation:
        """Embeds the gallery and the queries with `params`; ranks the images for every caption, the captions for
        every image."""
        t0 = time.time()
        z_img, g_pid = embed(self.encode_images, params, self.gallery, "images", self.mesh)
        z_txt, q_pid = embed(self.encode_texts, params, self.queries, "text", self.mesh)
        sim = z_txt @ z_img.T  # (Q, G) cosine similarity: both sides are unit-norm.
        out = {k: float(v) for k, v in metrics_lib.retrieval_metrics(sim, q_pid, g_pid).items()}
        out.update({f"i2t_{k}": float(v) for k, v in metrics_lib.retrieval_metrics(sim.T, g_pid, q_pid).items()})
        out.update(num_queries=int(len(q_pid)), num_gallery=int(len(g_pid)), seconds=time.time() - t0)
        logging.info("Evaluated %d queries against %d images in %.1fs", len(q_pid), len(g_pid), out["seconds"])
        return Evaluation(metrics=out, similarity=sim, query_pids=q_pid, gallery_pids=g_pid)

    def __call__(self, params) -> dict:
        """The metrics of `params` on this split: R1 ... mINP, i2t_R1 ... i2t_mINP, num_queries, num_gallery,
        seconds."""
        return self.run(params).metrics

    def rankings(self, ev: Evaluation) -> list[dict]:
        """Per query: caption, pid, top-10 gallery paths / pids / scores, first correct rank, AP (`report`)."""
        return report_lib.rankings(
            ev.similarity, ev.query_pids, ev.gallery_pids, self.data.caption, self.data.gallery_paths
        )

    def image(self, path: str):
        """The encoded gallery image at `path` (for reports)."""
        if not hasattr(self, "_by_path"):
            first = self.data.gallery_rows
            self._by_path = dict(zip(self.data.gallery_paths, self.data.images[self.data.image_id[first]], strict=True))
        return self._by_path[path]

    def write_report(self, ranked: list[dict], out_dir: str, title: str) -> tuple[str, str]:
        """OUT_DIR/<split>_rankings.jsonl and OUT_DIR/<split>_report.html (process 0 only writes)."""
        return report_lib.write_split_report(out_dir, self.split, ranked, self.image, title=title)

    def grid(self, ranked: list[dict]) -> np.ndarray:
        """A few ranked queries as one uint8 picture (TensorBoard)."""
        return report_lib.grid_image(report_lib.sample(ranked, 2), self.image)


TABLE_COLUMNS = (*METRICS, "i2t_R1", "i2t_R5", "i2t_R10", "i2t_mAP")


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text results table, one row per (split, checkpoint) name: text-to-image R1 ... mINP, then
    image-to-text R1 ... mAP (left out when no row has them)."""
    cols = [c for c in TABLE_COLUMNS if c in METRICS or any(c in m for m in rows.values())]
    name_w = max([len("split")] + [len(n) for n in rows])
    width = lambda c: max(6, len(c))
    lines = [f"{'split':<{name_w}}  " + "  ".join(f"{c:>{width(c)}}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{m.get(c, float('nan')):{width(c)}.2f}" for c in cols))
    return "\n".join(lines)


def evaluate_run(config, workdir: str, step: int | None = None, which: str = "best") -> dict:
    """`--mode=eval`: restores a checkpoint (best by validation, latest, or `step`) and evaluates val and test.

    With no checkpoint in the workdir and `model_init` set, evaluates those weights as they are (the zero-shot
    baseline: what fine-tuning buys). Writes the table to WORKDIR/eval_step<N>.json (eval_zero_shot.json) and the
    per-query rankings and an HTML report per split under WORKDIR/eval. With `config.eval.dataset` set, evaluates
    cross-domain instead (`evaluate_transfer`) on that dataset's test split.
    """
    from uit_jax import build as build_lib  # noqa: PLC0415 - the dataset (TensorFlow) only for this mode

    if config.eval.get("dataset", ""):
        return evaluate_transfer(
            workdir,
            config.eval.dataset,
            manual_dir=config.eval.get("manual_dir", ""),
            data_dir=config.eval.get("data_dir", None),
            tagger=config.eval.get("tagger", ""),
            step=step if step is not None else which,
            batch_size=config.eval.batch_size,
            dtype=config.model.dtype,
        )

    workdir = os.path.abspath(workdir)
    ck_dir = os.path.join(workdir, "checkpoints")
    has_ckpt = os.path.isdir(ck_dir) and any(name.isdigit() for name in os.listdir(ck_dir))
    if not has_ckpt and (step is not None or not config.model_init):
        # Before anything is built or created (an Orbax manager would create the folder).
        raise FileNotFoundError(
            f"No checkpoint under {ck_dir}; train first (--mode=train) or fix --workdir"
            + ("" if config.model_init else ", or set --config.model_init to evaluate pre-trained weights zero-shot")
            + "."
        )
    if has_ckpt and jax.process_index() == 0:
        rundir.check_resume(workdir, config)
    mesh = sharding.make_mesh(dict(config.mesh))
    config_lib.validate(config, mesh.size)
    setup = build_lib.build(config)
    if has_ckpt:
        ckpt = ckpt_lib.Checkpointer(ck_dir, async_save=False)
        if step is None:
            best = ckpt.best() if which == "best" else None
            step = best[0] if best is not None else ckpt.latest_step()
        abstract, *_ = state_lib.train_state_spec(
            config, setup.model, mesh, jax.random.key(config.seed), setup.info.num_train_pairs
        )
        params = ckpt.restore(step, abstract).state["params"]
        ckpt.close()
        label = f"step {step}"
    else:
        logging.info("No checkpoint in %s: evaluating %s zero-shot (no fine-tuning).", workdir, config.model_init)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put({"clip": setup.init_clip_params}, replicated)
        label, step = "zero-shot", 0
    encoders = jit_encoders(*steps.make_encode_fns(setup.model), mesh)
    rows = {}
    with jax.set_mesh(mesh):
        for split in (config.data.val_split, config.data.test_split):
            evaluator = Evaluator.from_config(config, setup.model, setup.tokenizer, mesh, split, encoders=encoders)
            ev = evaluator.run(params)
            rows[f"{split} @ {label}"] = ev.metrics
            if jax.process_index() == 0:
                out = evaluator.write_report(
                    evaluator.rankings(ev), os.path.join(workdir, "eval"), f"{config.data.name} {split} @ {label}"
                )
                logging.info("Rankings and report of %s: %s", split, ", ".join(out))
    table = format_table(rows)
    if jax.process_index() == 0:
        print("\n" + table + "\n", flush=True)
        name = f"eval_step{step}.json" if has_ckpt else "eval_zero_shot.json"
        _write_json(os.path.join(workdir, name), {"step": step, "results": rows})
    return {"step": step, "results": rows, "table": table}


@dataclasses.dataclass
class Towers:
    """A trained model's CLIP towers, as evaluation needs them: a UIT module with the towers only, its params
    ({"clip": ...}), the tokenizer, the preprocessing, and a label naming the checkpoint."""

    model: Any
    params: dict
    tokenizer: Any
    image_size: tuple[int, int]
    label: str


def load_towers(source: str, step: str | int = "best", dtype: str = "auto") -> Towers:
    """The towers of a training workdir (checkpoint `step`: best by validation R1, latest or a number) or of an
    exported model folder (`python -m uit_jax.export`); read-only, whatever mesh trained it."""
    from uit_jax import export  # noqa: PLC0415
    from uit_jax.data import tokenizer as tok_lib  # noqa: PLC0415
    from uit_jax.models import clip as clip_lib  # noqa: PLC0415
    from uit_jax.models import uit as uit_lib  # noqa: PLC0415

    source = os.path.abspath(source)
    if export.is_model_folder(source):
        e = export.load_model(source)
        clip_config, clip_params, tokenizer, image_size = e.model.config, e.params, e.tokenizer, e.image_size
        label = f"exported (step {e.info.get('step', '?')})"
    elif os.path.isfile(os.path.join(source, rundir.MODEL_FILE)):
        desc = rundir.read_model(source)
        restored = ckpt_lib.read_state(os.path.join(source, "checkpoints"), step)
        clip_params = restored.state["params"]["clip"]
        clip_config = clip_lib.CLIPConfig(**desc["clip"])
        tokenizer = tok_lib.load_tokenizer(os.path.join(source, rundir.TOKENIZER_DIR))
        image_size, label = tuple(desc["image_size"]), f"step {restored.step}"
    else:
        raise FileNotFoundError(
            f"{source} is neither a training workdir (with {rundir.MODEL_FILE} and checkpoints/) nor an exported "
            f"model folder ({export.MODEL_FILE}, {export.WEIGHTS_FILE}): pass one of those as --workdir."
        )
    model = uit_lib.UIT(
        clip_config=clip_config,
        num_classes=1,
        use_id=False,
        use_restoration=False,
        dtype=state_lib.compute_dtype(dtype),
    )
    return Towers(model, {"clip": clip_params}, tokenizer, tuple(int(x) for x in image_size), label)


def target_config(dataset: str, towers: Towers, *, manual_dir: str = "", data_dir=None, tagger: str = "",
                  batch_size: int = 256):  # fmt: skip
    """The config an Evaluator needs for `dataset`'s own folder, builder, split and id rules, with the trained
    model's image size and caption length."""
    import ml_collections  # noqa: PLC0415

    from uit_jax.data import defaults  # noqa: PLC0415

    if dataset not in defaults.DATASETS:
        raise ValueError(
            f"--eval_dataset / config.eval.dataset {dataset!r} is not a known dataset; use one of "
            f"{sorted(defaults.DATASETS)}."
        )
    data = defaults.data_config(dataset)
    if manual_dir:
        data.manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    data.data_dir = data_dir or None
    data.tagger = tagger or ""
    data.image_size = towers.image_size
    data.text_len = towers.model.clip_config.text_len
    return ml_collections.ConfigDict(dict(data=data, eval=dict(batch_size=batch_size)))


def evaluate_transfer(
    source: str,
    dataset: str,
    *,
    manual_dir: str = "",
    data_dir=None,
    tagger: str = "",
    split: str = "test",
    step: str | int = "best",
    batch_size: int = 256,
    out_dir: str | None = None,
    dtype: str = "auto",
) -> dict:
    """Cross-domain evaluation: a trained run (workdir or exported model) on `dataset`'s `split` without
    retraining, with the model's tokenizer, image size and preprocessing and the target's own split and id rules.

    Fails before any dataset work on a wrong source or dataset name, and before writing anything on a missing or
    wrongly laid-out folder. Writes OUT_DIR (default SOURCE/eval) / transfer_<dataset>_<split>.json, and the
    per-query rankings and HTML report as <dataset>_<split>_rankings.jsonl / _report.html."""
    from uit_jax.data import defaults, prepare  # noqa: PLC0415 - the dataset (TensorFlow) only here

    if dataset not in defaults.DATASETS:  # before anything is read
        target_config(dataset, None)
    towers = load_towers(source, step, dtype)
    mesh = sharding.make_mesh({"data": -1})
    batch_size = -(-batch_size // mesh.size) * mesh.size
    config = target_config(
        dataset, towers, manual_dir=manual_dir, data_dir=data_dir, tagger=tagger, batch_size=batch_size
    )
    prepare.check_ready(config.data)
    info = prepare.prepare(config.data)
    if split not in info.splits:
        raise ValueError(f"{dataset} has no split {split!r}; it has {sorted(info.splits)}.")
    params = jax.device_put(towers.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):
        evaluator = Evaluator.from_config(config, towers.model, towers.tokenizer, mesh, split)
        ev = evaluator.run(params)
    row = f"{dataset} {split} @ {towers.label}"
    out = {"source": os.path.abspath(source), "dataset": dataset, "split": split, "checkpoint": towers.label}
    out.update(results={row: ev.metrics}, table=format_table({row: ev.metrics}))
    if jax.process_index() == 0:
        out_dir = os.path.abspath(out_dir or os.path.join(source, "eval"))
        ranked = evaluator.rankings(ev)
        out["rank_buckets"] = report_lib.rank_buckets(ranked)
        title = f"{towers.label} of {os.path.basename(os.path.abspath(source))} on {dataset} {split}"
        out["report"] = list(report_lib.write_split_report(out_dir, f"{dataset}_{split}", ranked, evaluator.image,
                                                           title=title))  # fmt: skip
        _write_json(os.path.join(out_dir, f"transfer_{dataset}_{split}.json"), out)
        print("\n" + out["table"] + "\n", flush=True)
    return out


def _write_json(path: str, obj) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
