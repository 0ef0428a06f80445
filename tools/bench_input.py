"""Training input throughput: pairs/s of the tf.data train pipeline on the synthetic set at 384x128.

    python tools/bench_input.py [--batch 64] [--steps 60] [--warmup 5] [--height 384 --width 128]
        [--manual_dir DIR --data_dir DIR]

Builds (once) the default synthetic set, then times `make_train_iterator` with every augmentation on
(flip, pad+crop, erasing, key-word filter, MLM masking). Images are rendered at 128x64 and resized to the
requested size, as real CUHK-PEDES images (about 80 px wide) are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--manual_dir", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--train_ids", type=int, default=0, help="identities in the synthetic train split (0: default)")
    a = p.parse_args(argv)

    from uit_jax.data import defaults, prepare, train_input
    from uit_jax.data import tokenizer as tok_lib

    cfg = defaults.data_config("synthetic")
    if a.manual_dir:
        cfg.manual_dir = a.manual_dir
    cfg.data_dir = a.data_dir
    cfg.image_size = (a.height, a.width)
    if a.train_ids:
        cfg.synthetic.train_ids = a.train_ids
    t0 = time.time()
    info = prepare.prepare(cfg)
    tok = tok_lib.load_tokenizer(info.tokenizer_dir)
    data = prepare.load_split(cfg, "train")
    it = train_input.make_train_iterator(cfg, tok, global_batch=a.batch, seed=0, data=data)
    print(f"setup (prepare + load + tokenize): {time.time() - t0:.1f}s; {info.num_train_pairs} train pairs")
    for _ in range(a.warmup):
        next(it)
    t0, c0 = time.time(), time.process_time()
    for _ in range(a.steps):
        b = next(it)
    dt, cpu = time.time() - t0, time.process_time() - c0
    n = a.steps * a.batch
    # CPU seconds per pair (all threads) tell what the pipeline costs when other jobs share the machine.
    print(
        f"images {b['images'].shape} text {b['text'].shape}: {n / dt:.0f} pairs/s wall "
        f"({a.steps} batches of {a.batch} in {dt:.1f}s); {1e3 * cpu / n:.2f} CPU-ms per pair, i.e. "
        f"{n / cpu * os.cpu_count():.0f} pairs/s if all {os.cpu_count()} CPUs were ours; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    it.close()
    return dict(pairs_per_s=n / dt, cpu_ms_per_pair=1e3 * cpu / n, shape=list(b["images"].shape))


if __name__ == "__main__":
    main()
