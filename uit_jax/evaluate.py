"""The Evaluator: text-to-image retrieval on one split, from its data to its report.

An Evaluator is built from config for a split (`Evaluator.from_config`) and owns that split's data (read once), its
padded gallery and query batches, the jitted encoders, the metrics, the per-query rankings and the HTML report. The
training loop (periodic validation), the final test and `--mode=eval` (`evaluate_run`) all use it.

Batches come padded to whole batches with a `mask` of real rows (every process runs the same number of steps);
embeddings are gathered to every host, padding rows are dropped, and `metrics.retrieval_metrics` ranks the gallery
for each caption in blocks of queries. Importable without TensorFlow (the dataset is read only in `from_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable

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

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


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
    """Text-to-image retrieval on one split: every caption queries the split's gallery (every image once)."""

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
        """Embeds the gallery and the queries with `params` and ranks the gallery for every caption."""
        t0 = time.time()
        z_img, g_pid = embed(self.encode_images, params, self.gallery, "images", self.mesh)
        z_txt, q_pid = embed(self.encode_texts, params, self.queries, "text", self.mesh)
        sim = z_txt @ z_img.T  # (Q, G) cosine similarity: both sides are unit-norm.
        out = {k: float(v) for k, v in metrics_lib.retrieval_metrics(sim, q_pid, g_pid).items()}
        out.update(num_queries=int(len(q_pid)), num_gallery=int(len(g_pid)), seconds=time.time() - t0)
        logging.info("Evaluated %d queries against %d images in %.1fs", len(q_pid), len(g_pid), out["seconds"])
        return Evaluation(metrics=out, similarity=sim, query_pids=q_pid, gallery_pids=g_pid)

    def __call__(self, params) -> dict:
        """The metrics of `params` on this split: R1, R5, R10, mAP, mINP, num_queries, num_gallery, seconds."""
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


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text results table: one row per (split, checkpoint) name."""
    name_w = max([len("split")] + [len(n) for n in rows])
    lines = [f"{'split':<{name_w}}  " + "  ".join(f"{c:>6}" for c in METRICS)]
    for name, m in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{m[c]:6.2f}" for c in METRICS))
    return "\n".join(lines)


def evaluate_run(config, workdir: str, step: int | None = None, which: str = "best") -> dict:
    """`--mode=eval`: restores a checkpoint (best by validation, latest, or `step`) and evaluates val and test.

    With no checkpoint in the workdir and `model_init` set, evaluates those weights as they are (the zero-shot
    baseline: what fine-tuning buys). Writes the table to WORKDIR/eval_step<N>.json (eval_zero_shot.json) and the
    per-query rankings and an HTML report per split under WORKDIR/eval.
    """
    from uit_jax import build as build_lib  # noqa: PLC0415 - the dataset (TensorFlow) only for this mode

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
        with open(os.path.join(workdir, name), "w") as f:
            json.dump({"step": step, "results": rows}, f, indent=2)
    return {"step": step, "results": rows, "table": table}
