"""Search as a service: the HTTP API and web page over a gallery index (FastAPI on uvicorn).

    python -m uit_jax.serve --model=MODEL --index=INDEX [--host=127.0.0.1 --port=8080] [--gallery=FOLDER]

MODEL and INDEX are what `python -m uit_jax.search index` used and wrote; an index built with another model is
refused at start-up. The model and index are loaded once and the text encoder (and the exact search) compiled for
the padded query batch sizes `BATCH_SIZES`, so no request waits for a compile.

    POST /search {"queries": ["a man in a red coat", ...], "k": 10}
        -> {"results": [{"query", "tokens", "truncated", "note", "hits": [{"rank", "id", "score", "url", "thumb"}]}]}
    GET  /images/{id}[?size=thumb]   the gallery image (thumb: a JPEG THUMB_HEIGHT pixels high)
    GET  /health                     model, index size, search kind, device
    GET  /                           the web page (uit_jax/serve_static/, no external resources)
    GET  /docs, /redoc, /openapi.json   the API's documentation (served offline)

An image id is its path relative to the gallery folder (`--gallery`, default: the folder holding every indexed
file). Only ids the index lists are served, and only when the file really lies inside the gallery folder.

Queries that arrive together are encoded and searched in one call (`Batcher`): one worker thread owns the model,
and takes every request that is waiting when it is free, up to `--max_batch` sentences.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import logging
import mimetypes
import os
import socket
import sys
import threading
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("uit_jax.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_static")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # sentence counts compiled at start-up; a call pads to the next one
K_MIN = 16  # the exact search computes the top max(16, next power of two >= k): few compiled shapes
MAX_QUERIES = BATCH_SIZES[-1]
MAX_CHARS = 4000  # per sentence; the encoder reads far fewer tokens, this only bounds the tokenizer's work
MAX_BODY = 1 << 20  # bytes of a /search request
THUMB_HEIGHT = 128
DEFAULT_K = 10  # images per query when a request does not say (fewer when the gallery holds fewer)


class BadRequest(ValueError):
    """Input the client must change; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------- the service
@dataclasses.dataclass
class Prepared:
    """One request's sentences, tokenised, with what the encoder will not read."""

    texts: list[str]
    ids: np.ndarray  # (n, text_len) int32
    tokens: list[int]  # tokens per sentence before truncation (without start/end tokens)
    read: list[str]  # the text the encoder reads, where truncated ('' otherwise)
    k: int  # images per query


class Service:
    """The loaded model and index, the gallery folder and the batcher: everything the routes call."""

    def __init__(self, retriever, index, *, gallery: str | None = None, max_batch: int = MAX_QUERIES, name=""):
        if not len(index):
            raise ValueError("The index holds no images: build it with `python -m uit_jax.search index`.")
        if not 1 <= max_batch <= MAX_QUERIES:
            raise ValueError(
                f"--max_batch={max_batch}: give 1 (no batching) to {MAX_QUERIES} (the largest compiled batch)."
            )
        if index.model != retriever.fingerprint:
            raise ValueError(
                f"The index was built with another model or preprocessing (index: {index.model}; --model gives "
                f"{retriever.fingerprint}): serve it with the model that built it, or rebuild the index with "
                "`python -m uit_jax.search index --model=... --images=... --out=...`."
            )
        self.retriever, self.index, self.name = retriever, index, name or retriever.name
        self.gallery = os.path.abspath(gallery or _common_folder(index.paths))
        self._real_gallery = os.path.realpath(self.gallery)  # what a served file must lie in, links resolved
        self.ids, self.rows = [], {}
        outside = 0
        for row, p in enumerate(index.paths):
            rel = os.path.relpath(os.path.abspath(p), self.gallery)
            if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
                outside += 1
                rel = f"#{row}"  # searchable, never served
            rel = rel.replace(os.sep, "/")
            self.ids.append(rel)
            self.rows[rel] = row
        if outside:
            log.warning(
                "%d indexed file(s) lie outside the gallery folder %s: they are found, not served",
                outside,
                self.gallery,
            )
        self.max_tokens = retriever.text_len - 2  # start and end tokens take two positions
        self.batcher = Batcher(self._run, max_batch)
        self._thumb = functools.lru_cache(maxsize=4096)(self._make_thumb)

    # ------------------------------------------------------------------ queries
    def prepare(self, queries, k) -> Prepared:
        """Checks a request (raising BadRequest with what to change) and tokenises it."""
        n = len(self.index)
        k = min(DEFAULT_K, n) if k is None else k
        if not isinstance(queries, list) or not queries:
            raise BadRequest(
                '"queries" must be a non-empty list of sentences, e.g. {"queries": ["a man in a red coat"], "k": 10}.'
            )
        if len(queries) > MAX_QUERIES:
            raise BadRequest(f'"queries" has {len(queries)} sentences; send at most {MAX_QUERIES} per request.')
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise BadRequest(f"queries[{i}] is not a string ({type(q).__name__}): send sentences as strings.")
            if not q.strip():
                raise BadRequest(f"queries[{i}] is empty: describe the person, e.g. 'a woman in a red coat'.")
            if len(q) > MAX_CHARS:
                raise BadRequest(
                    f"queries[{i}] is {len(q)} characters long; send at most {MAX_CHARS} (the text encoder reads "
                    f"only its first {self.max_tokens} tokens)."
                )
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(f'"k" must be a whole number of images, got {k!r}.')
        if k <= 0:
            raise BadRequest(f'"k" must be at least 1 (the number of images per query), got {k}.')
        if k > n:
            raise BadRequest(f'"k" is {k}, more than the gallery holds ({n} images): ask for at most {n}.')
        from uit_jax.data import tokenizer as tok_lib  # noqa: PLC0415

        texts = [q.strip() for q in queries]
        tok = self.retriever.tokenizer
        ids = tok_lib.tokenize(tok, texts, self.retriever.text_len)
        pieces = tok(texts, add_special_tokens=False)["input_ids"]
        counts = [len(p) for p in pieces]
        read = [tok.decode(p[: self.max_tokens]) if len(p) > self.max_tokens else "" for p in pieces]
        return Prepared(texts, ids, counts, read, k)

    async def search(self, queries, k: int | None = None) -> dict:
        """Answers a /search request (BadRequest for bad input); k None: DEFAULT_K, or the gallery's size."""
        t0 = time.perf_counter()
        p = self.prepare(queries, k)
        k = p.k
        scores, idx = await asyncio.wrap_future(self.batcher.submit(p.ids, k))
        results = []
        for i, text in enumerate(p.texts):
            hits = [
                {
                    "rank": r + 1,
                    "id": self.ids[j],
                    "score": round(float(s), 6),
                    "url": self.image_url(j),
                    "thumb": self.image_url(j) + "?size=thumb",
                }
                for r, (s, j) in enumerate(zip(scores[i], idx[i], strict=True))
                if j >= 0  # an approximate index may find fewer than k
            ]
            truncated = p.tokens[i] > self.max_tokens
            note = (
                f"This query is {p.tokens[i]} tokens long; the text encoder reads the first {self.max_tokens}, so "
                f"the rest was ignored. It read: '{p.read[i]}'. Shorten the description to be sure every word counts."
                if truncated
                else None
            )
            results.append({"query": text, "tokens": p.tokens[i], "truncated": truncated, "note": note, "hits": hits})
        took = 1000 * (time.perf_counter() - t0)
        return {
            "k": k,
            "index_size": len(self.index),
            "search": self.search_kind(),
            "took_ms": took,
            "results": results,
        }

    def _run(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes (n, L) token ids and searches them, padded to a compiled batch size (worker thread)."""
        n = len(ids)
        size = next((b for b in BATCH_SIZES if b >= n), -(-n // BATCH_SIZES[-1]) * BATCH_SIZES[-1])
        if size > n:
            ids = np.concatenate([ids, np.repeat(ids[:1], size - n, 0)])
        z = self.retriever.encode_token_ids(ids, batch_size=min(size, BATCH_SIZES[-1]))
        kk = k if self.index.ann is not None else min(len(self.index), max(K_MIN, 1 << (k - 1).bit_length()))
        scores, idx = self.index.top_k(z, kk)
        return scores[:n, :k], idx[:n, :k]

    def warm_up(self) -> float:
        """Compiles the text encoder and the search for every padded batch size; returns the seconds it took."""
        t0 = time.perf_counter()
        ids = np.asarray(self.prepare(["a person"], 1).ids)
        for b in BATCH_SIZES:
            self._run(np.repeat(ids, b, 0), min(10, len(self.index)))
        return time.perf_counter() - t0

    def search_kind(self) -> str:
        ann = self.index.ann
        return "exact" if ann is None else ann.describe()

    def health(self) -> dict:
        import jax  # noqa: PLC0415

        d = jax.local_devices()
        return {
            "status": "ok",
            "model": self.name,
            "model_fingerprint": self.retriever.fingerprint,
            "index_size": len(self.index),
            "embedding_dim": int(self.index.embeddings.shape[1]),
            "search": self.search_kind(),
            "gallery": self.gallery,
            "device": f"{len(d)} x {d[0].platform}"
            + (f" ({kind})" if (kind := d[0].device_kind) != d[0].platform else ""),
            "text_tokens": self.max_tokens,
            "batch_sizes": list(BATCH_SIZES),
            "max_batch": self.batcher.max_batch,
            "encoder_calls": self.batcher.calls,  # with requests_answered: how much batching happened
            "requests_answered": self.batcher.requests,
        }

    # ------------------------------------------------------------------ images
    def image_url(self, row: int) -> str:
        from urllib.parse import quote  # noqa: PLC0415

        return "/images/" + quote(self.ids[row])

    def image_file(self, image_id: str) -> str:
        """The file of an id, refusing anything the index does not list or that resolves outside the gallery."""
        row = self.rows.get(image_id)
        if row is None or image_id.startswith("#"):
            raise BadRequest(
                f"No image {image_id!r} in this index: use the 'id' (or 'url') of a /search hit, a path relative to "
                "the gallery folder.",
                404,
            )
        real = os.path.realpath(self.index.paths[row])
        if os.path.commonpath([real, self._real_gallery]) != self._real_gallery:  # a symlink leading out of the gallery
            raise BadRequest(f"Image {image_id!r} resolves outside the gallery folder; it is not served.", 404)
        if not os.path.isfile(real):
            raise BadRequest(f"Image {image_id!r} is in the index but its file is gone: rebuild the index.", 404)
        return real

    def thumbnail(self, image_id: str) -> bytes:
        path = self.image_file(image_id)
        return self._thumb(path, os.stat(path).st_mtime_ns)

    @staticmethod
    def _make_thumb(path: str, _mtime: int) -> bytes:
        from uit_jax import report  # noqa: PLC0415

        buf = io.BytesIO()
        report.thumbnail(path, THUMB_HEIGHT).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def close(self) -> None:
        self.batcher.close()


def _common_folder(paths) -> str:
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    return os.path.commonpath(sorted(folders))


# ----------------------------------------------------------------------------------------------- batching
@dataclasses.dataclass
class _Job:
    ids: np.ndarray
    k: int
    future: concurrent.futures.Future


class Batcher:
    """Runs `fn(ids, k) -> (scores, idx)` on one worker thread, for the requests waiting when it is free together:
    a request that arrives while a batch is being encoded waits for it, then goes with every other one that came
    meanwhile (up to `max_batch` sentences), so an idle server adds no delay and a busy one makes fewer calls."""

    def __init__(self, fn, max_batch: int = MAX_QUERIES):
        self.fn, self.max_batch = fn, max(1, int(max_batch))
        self._pending: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.calls = self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="uit-jax-batcher", daemon=True)
        self._thread.start()

    def submit(self, ids: np.ndarray, k: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(_Job(np.asarray(ids), int(k), fut))
            self._cv.notify()
        return fut

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return None
            jobs, n = [], 0
            while self._pending and (not jobs or n + len(self._pending[0].ids) <= self.max_batch):
                jobs.append(self._pending.popleft())
                n += len(jobs[-1].ids)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                scores, idx = self.fn(np.concatenate([j.ids for j in jobs]), max(j.k for j in jobs))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request; the worker keeps serving
                for j in jobs:
                    j.future.set_exception(e)
                continue
            self.calls += 1
            self.requests += len(jobs)
            start = 0
            for j in jobs:
                n = len(j.ids)
                j.future.set_result((scores[start : start + n, : j.k], idx[start : start + n, : j.k]))
                start += n

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------------------------- the app
class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[str] = Field(
        description=f"1 to {MAX_QUERIES} descriptions of a person", examples=[["a woman in a red coat"]]
    )
    k: int | None = Field(
        None, description=f"images per query, 1 to the gallery's size (default {DEFAULT_K}, or the gallery's size)"
    )


class Hit(BaseModel):
    rank: int
    id: str = Field(description="the image's path relative to the gallery folder")
    score: float = Field(description="cosine similarity of the query and the image")
    url: str
    thumb: str


class QueryResult(BaseModel):
    query: str
    tokens: int = Field(description="the sentence's length in tokens")
    truncated: bool = Field(description="longer than the text encoder reads: the tail was ignored")
    note: str | None
    hits: list[Hit]


class SearchResponse(BaseModel):
    k: int
    index_size: int
    search: str
    took_ms: float
    results: list[QueryResult]


def create_app(service: Service):
    """The FastAPI application over a Service."""
    from fastapi import Query  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: PLC0415
    from fastapi.staticfiles import StaticFiles  # noqa: PLC0415
    from fastapi_offline import FastAPIOffline  # noqa: PLC0415

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI / ReDoc from the app, not from a CDN.
    app = FastAPIOffline(
        title="uit_jax search",
        description="Text-to-image person retrieval over a gallery index. The web page is at /.",
        version="1",
    )

    app.add_middleware(_BodyLimit, limit=MAX_BODY)

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        return JSONResponse({"detail": _explain(errors), "errors": _plain(errors)}, 400 if _is_json(errors) else 422)

    @app.post("/search", response_model=SearchResponse, summary="Rank the gallery for each query")
    async def search(body: SearchRequest):
        return await service.search(body.queries, body.k)

    @app.get("/images/{image_id:path}", summary="A gallery image, or its thumbnail")
    def image(image_id: str, size: str = Query("full", pattern="^(full|thumb)$", description="full or thumb")):
        headers = {"Cache-Control": "public, max-age=3600"}
        if size == "thumb":
            return Response(service.thumbnail(image_id), media_type="image/jpeg", headers=headers)
        path = service.image_file(image_id)
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0], headers=headers)

    @app.get("/health", summary="Model, index size, search kind and device")
    def health():
        return service.health()

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _too_large(what: str) -> str:
    return (
        f"The request body {what}; send at most {MAX_BODY} bytes (at most {MAX_QUERIES} queries of at most "
        f"{MAX_CHARS} characters)."
    )


class _BodyLimit:
    """ASGI middleware refusing request bodies past `limit` bytes with a 413: at once when Content-Length says so,
    else as soon as the streamed (chunked) bytes pass it, so no body is held whole in memory. (FastAPI's own
    `max_body_size` answers a bare 'Content Too Large', which does not say what to change.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse  # noqa: PLC0415
        from starlette.exceptions import HTTPException  # noqa: PLC0415

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            return await JSONResponse({"detail": _too_large(f"is {int(size)} bytes")}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised inside the route's body read: FastAPI answers it as this 413
                raise HTTPException(413, _too_large(f"is over {self.limit} bytes"))
            return message

        return await self.app(scope, counted, send)


def _is_json(errors) -> bool:
    return any(e.get("type") == "json_invalid" for e in errors)


def _explain(errors) -> str:
    """Pydantic's errors as one sentence that says what to change."""
    out = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        kind = e.get("type", "")
        if kind == "json_invalid":
            out.append(
                f"The body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))}): send "
                '{"queries": ["a man in a red coat"], "k": 10}.'
            )
        elif kind == "missing":
            out.append(f'"{field}" is missing: send {{"queries": ["a man in a red coat"], "k": 10}}.')
        elif kind == "extra_forbidden":
            out.append(f'Unknown field "{field}": the fields are "queries" and "k".')
        elif kind == "list_type" and loc == ["queries"]:
            out.append('"queries" must be a list of sentences; wrap a single sentence in a list: ["..."].')
        elif kind == "model_attributes_type":
            out.append('The body must be a JSON object: {"queries": ["a man in a red coat"], "k": 10}.')
        else:
            out.append(f'"{field}": {e.get("msg")} (got {e.get("input")!r}).')
    return " ".join(out)


def _plain(errors) -> list:
    return json.loads(json.dumps([{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in errors], default=str))


# ----------------------------------------------------------------------------------------------- running
class Server:
    """uvicorn serving `app` on a socket bound now (port 0: a free one), in a background thread.

    with serve.Server(app) as s:
        requests.post(s.url + "/search", ...)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs):
        import uvicorn  # noqa: PLC0415

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        config = uvicorn.Config(app, log_level=uvicorn_kwargs.pop("log_level", "warning"), **uvicorn_kwargs)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def load(
    model: str, index_path: str, *, gallery=None, max_batch=MAX_QUERIES, image_size=None, step="best", tokenizer=""
) -> Service:
    """Loads the model and index and compiles the encoder: a Service ready to answer."""
    from uit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
    from uit_jax import retrieval  # noqa: PLC0415

    t0 = time.perf_counter()
    r = retrieval.Retriever.load(model, image_size=image_size, step=ckpt_lib.parse_step(step), tokenizer=tokenizer)
    t1 = time.perf_counter()
    index = retrieval.Index.load(index_path)
    t2 = time.perf_counter()
    service = Service(r, index, gallery=gallery, max_batch=max_batch, name=model)
    compiled = service.warm_up()
    log.info(
        "model %s loaded in %.1f s; index %s (%d images, %s) in %.1f s; encoder and search compiled for batch "
        "sizes %s in %.1f s",
        model,
        t1 - t0,
        index_path,
        len(index),
        service.search_kind(),
        t2 - t1,
        BATCH_SIZES,
        compiled,
    )
    return service


def parse(argv=None):
    from uit_jax import search  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m uit_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported folder, workdir, best.pth or HF CLIP id/folder")
    p.add_argument("--index", required=True, help="index path written by `python -m uit_jax.search index`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--gallery", default=None, help="the folder images are served from (default: the common folder)")
    p.add_argument("--max_batch", type=int, default=MAX_QUERIES, help="sentences per encoder call (1: no batching)")
    p.add_argument("--image_size", type=search._size, default=None, help="H,W for CLIP weights (default 384,128)")
    p.add_argument("--step", default="best", help="for a workdir: best, latest or a step number")
    p.add_argument("--tokenizer", default="", help="tokenizer id/folder when the model has none (.pth files)")
    p.add_argument("--access_log", type=int, default=1, help="1: log each request (uvicorn's access log)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    if not log.handlers:  # our own handler: absl (imported with the model code) takes over the root logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    from uit_jax import compile_cache  # noqa: PLC0415
    from uit_jax.data import images as images_lib  # noqa: PLC0415

    compile_cache.enable()  # a restart loads the encoder's compiled programs instead of compiling them again
    try:
        service = load(
            a.model,
            a.index,
            gallery=a.gallery,
            max_batch=a.max_batch,
            image_size=a.image_size,
            step=a.step,
            tokenizer=a.tokenizer,
        )
    except (FileNotFoundError, ValueError, images_lib.UnreadableImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    import uvicorn  # noqa: PLC0415

    app = create_app(service)
    host = a.host if ":" not in a.host else f"[{a.host}]"
    log.info("serving %d images on http://%s:%d/ (API docs: /docs)", len(service.index), host, a.port)
    with contextlib.closing(service):
        uvicorn.run(app, host=a.host, port=a.port, access_log=bool(a.access_log), log_level="info")


if __name__ == "__main__":
    main()
