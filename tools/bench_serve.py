"""Serving benchmark: latency (p50, p95) and requests/s of `python -m uit_jax.serve` under N concurrent clients on
loopback, with queries batched into one encoder call (the default) and without (--max_batch=1), alternately.

    python tools/bench_serve.py [--model models/synthetic] [--images 100000] [--emb EMB] [--clients 1,8,32]

`--model` is what `python -m uit_jax.serve --model` takes (default: the shipped mini CLIP at 128x64, the
architecture and the starting point of the synthetic default). The index holds `--images` embeddings at the
model's width: the real embeddings of `tools/bench_ann.py embed --model=<the same model>` when `--emb` is given,
else random unit vectors (search costs the same; the files are never read, /images is not exercised). Two servers, one
per variant, run at once as subprocesses; each client is an asyncio task with its own keep-alive HTTP/1.1
connection sending `POST /search {"queries": [one synthetic caption], "k": 10}` until `--requests` have been
answered (a fixed number, and a time limit per run). Each (clients, variant) run is repeated `--rounds` times,
the variants alternately; the table gives the medians over rounds. The client shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHIPPED = os.path.join(ROOT, "uit_jax", "assets", "clip-mini-synthetic")


def build_index(out: str, n: int, emb: str, model: str) -> str:
    from uit_jax import retrieval  # noqa: PLC0415

    r = retrieval.Retriever.load(model, image_size=(128, 64))
    if emb:
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import bench_ann  # noqa: PLC0415

        g, _ = bench_ann.load_real(emb, n)
        with open(os.path.join(emb, "meta.json")) as f:
            assert json.load(f)["fingerprint"] == r.fingerprint, "the embeddings were made with another model"
    else:
        g = np.random.default_rng(0).standard_normal((n, r.model.config.embed_dim), dtype=np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    gallery = os.path.join(out, "gallery")
    paths = [os.path.join(gallery, f"{i // 1000:03d}", f"{i:07d}.png") for i in range(n)]
    retrieval.Index(paths, g, r.fingerprint).save(os.path.join(out, "index"))
    return os.path.join(out, "index")


def captions(n: int) -> list[str]:
    from uit_jax.data import synthetic as syn  # noqa: PLC0415

    return [
        syn.make_caption(syn.sample_identity(np.random.default_rng([5, i])), np.random.default_rng([5, i, 1]))
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, max_batch: int, log_path: str):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uit_jax.serve",
        f"--model={model}",
        "--image_size=128,64",
        f"--index={index}",
        f"--port={port}",
        f"--max_batch={max_batch}",
        "--access_log=0",
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            return proc, url, json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start; see {log_path}")


async def _client(port: int, bodies: list[bytes], todo: list, latencies: list, deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo and time.perf_counter() < deadline:
            body = bodies[todo.pop() % len(bodies)]
            head = (
                f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if b" 200 " not in status:
                raise RuntimeError(f"the server answered {status!r}")
    finally:
        writer.close()


async def load(url: str, clients: int, requests: int, bodies: list[bytes], limit_s: float) -> dict:
    port = int(url.rsplit(":", 1)[1])
    todo, latencies = list(range(requests)), []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, bodies, todo, latencies, t0 + limit_s) for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "rps": len(lat) / wall,
    }


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SHIPPED, help="exported folder, workdir or CLIP folder (default: mini CLIP)")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--emb", default="", help="a `tools/bench_ann.py embed` folder (default: random vectors)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=300, help="requests per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit_s", type=float, default=120, help="time limit of one run")
    p.add_argument("--variants", default="batched,unbatched")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    bodies = [json.dumps({"queries": [c], "k": 10}).encode() for c in captions(500)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        index = build_index(d, a.images, a.emb, a.model)
        variants = {"batched": 64, "unbatched": 1}
        servers = {}
        try:
            for v in a.variants.split(","):
                servers[v] = start_server(a.model, index, variants[v], os.path.join(d, f"{v}.log"))
            h = servers[next(iter(servers))][2]
            print(
                f"{h['index_size']:,} images x {h['embedding_dim']}, {h['search']} search, {h['device']}, "
                f"{os.cpu_count()} CPUs (client and servers share them), load average {os.getloadavg()[0]:.1f}"
            )
            for _, url, _ in servers.values():  # one short warm-up run each (connections, caches)
                asyncio.run(load(url, 8, 50, bodies, a.limit_s))
            runs = {}
            for rnd in range(a.rounds):
                for c in (int(x) for x in a.clients.split(",")):
                    for v, (_, url, _) in servers.items():
                        before = health(url)
                        r = asyncio.run(load(url, c, a.requests, bodies, a.limit_s))
                        after = health(url)
                        calls = after["encoder_calls"] - before["encoder_calls"]
                        r["requests_per_call"] = (after["requests_answered"] - before["requests_answered"]) / max(
                            calls, 1
                        )
                        r["load_1min"] = os.getloadavg()[0]
                        runs.setdefault((c, v), []).append(r)
                        print(
                            f"  round {rnd}: {c} clients, {v}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms,"
                            f" {r['rps']:.1f} req/s, {r['requests_per_call']:.1f} requests per encoder call, load"
                            f" {r['load_1min']:.1f}",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print("| clients | batching | p50 latency | p95 latency | requests/s | requests per encoder call |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (c, v), rs in runs.items():
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        rows.append({"clients": c, "variant": v, **med, "rounds": rs})
        print(
            f"| {c} | {'on' if v == 'batched' else 'off (--max_batch=1)'} | {med['p50_ms']:.1f} ms | "
            f"{med['p95_ms']:.1f} ms | {med['rps']:.1f} | {med['requests_per_call']:.1f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
