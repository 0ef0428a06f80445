"""Approximate search (uit_jax/ann.py): each FAISS kind against exact search, the Index that holds one (search,
save, load, stale files), `search index --ann`, and the serving path with an approximate index."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from uit_jax import ann as ann_lib
from uit_jax import retrieval, search

MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uit_jax", "assets")
MINI = os.path.join(MINI, "clip-mini-synthetic")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small indexes: FAISS' OpenMP threads only contend with the other test worker (and spin while they wait)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n=6000, d=32, centres=60, seed=0):
    """Unit vectors around a few centres, like embeddings of a gallery of people (not uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = c[rng.integers(0, centres, 50)] + 0.35 * rng.standard_normal((50, d)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _recall(found, truth):
    return np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)])


@pytest.mark.parametrize(
    "kind, options, want",
    [("hnsw", {"ef_search": 64}, 0.97), ("ivf", {"nprobe": 16}, 0.97), ("ivfpq", {"nprobe": 16, "pq": 8}, 0.5)],
)
def test_each_kind_finds_the_exact_neighbours(kind, options, want):
    x, q = _clustered()
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    ann = ann_lib.AnnIndex.build(x, kind, **options)
    scores, idx = ann.search(q, 10)
    assert idx.shape == (50, 10) and idx.dtype == np.int64 and len(ann) == len(x)
    assert _recall(idx, truth) >= want, _recall(idx, truth)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    if kind != "ivfpq":  # exact vectors: the scores are the cosines
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, idx, 1), atol=1e-5)
    assert kind in ann.describe()


def test_hnsw_returns_k_beyond_ef_search_and_ivf_options_are_checked():
    x, q = _clustered(n=2000)
    ann = ann_lib.AnnIndex.build(x, "hnsw", ef_search=16)
    assert (ann.search(q[:2], 100)[1] >= 0).all()  # k > efSearch: efSearch is raised for the call
    assert ann.options["ef_search"] == 16
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['nprobe'\] for a hnsw index"):
        ann_lib.AnnIndex.build(x, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="nlist=5000 inverted lists need at least as many images"):
        ann_lib.AnnIndex.build(x, "ivf", nlist=5000)
    with pytest.raises(ValueError, match="pq=5 must divide the embedding width 32"):
        ann_lib.AnnIndex.build(x, "ivfpq", pq=5)
    with pytest.raises(ValueError, match="choose one of hnsw, ivf, ivfpq"):
        ann_lib.AnnIndex.build(x, "lsh")
    with pytest.raises(ValueError, match=r"takes search options \['nprobe'\]"):
        ann_lib.AnnIndex.build(x, "ivf").set_search(ef_search=3)
    assert ann_lib.default_nlist(1_000_000) == 4096 and ann_lib.default_nlist(1000) == 25


def test_auto_keeps_exact_search_below_a_million():
    assert ann_lib.resolve_kind("auto", ann_lib.AUTO_MIN - 1) is None
    assert ann_lib.resolve_kind("auto", ann_lib.AUTO_MIN) == ann_lib.AUTO_KIND
    assert ann_lib.resolve_kind("none", 10**9) is None and ann_lib.resolve_kind("ivf", 5) == "ivf"
    with pytest.raises(ValueError, match="--ann must be auto, none"):
        ann_lib.resolve_kind("fast", 5)


def test_an_index_with_an_approximate_index_saves_loads_and_searches(tmp_path):
    x, q = _clustered(n=3000)
    index = retrieval.Index([f"/g/{i}.png" for i in range(len(x))], x, "model-fp")
    exact = index.search(q, 5)
    index.build_ann("hnsw", ef_search=128)
    approx = index.search(q, 5)
    assert np.mean([a[0][0] == e[0][0] for a, e in zip(approx, exact, strict=True)]) >= 0.95
    assert index.search(q, 5, exact=True) == exact
    index.save(str(tmp_path / "ix"))
    assert json.loads((tmp_path / "ix.json").read_text())["ann"]["kind"] == "hnsw"
    loaded = retrieval.Index.load(str(tmp_path / "ix"))
    assert loaded.ann is not None and loaded.ann.options["ef_search"] == 128
    assert loaded.search(q, 5) == approx
    scores, rows = loaded.top_k(q, 5)
    assert rows.shape == (50, 5) and [index.paths[j] for j in rows[0]] == [p for p, _ in approx[0]]
    # Adding images drops the approximate index (it no longer covers the gallery); saving then removes the file.
    loaded.add(["/g/new.png"], x[:1])
    assert loaded.ann is None
    loaded.save(str(tmp_path / "ix"))
    assert not (tmp_path / "ix.faiss").exists() and "ann" not in json.loads((tmp_path / "ix.json").read_text())
    # A .faiss that does not match the embeddings (an interrupted write) is refused.
    index.save(str(tmp_path / "bad"))
    small = retrieval.Index(index.paths[:10], x[:10], "model-fp")
    small.build_ann("hnsw")
    small.ann.save(str(tmp_path / "bad.faiss"))
    with pytest.raises(ValueError, match="holds 10 rows for 3000 embeddings"):
        retrieval.Index.load(str(tmp_path / "bad"))
    os.remove(tmp_path / "bad.faiss")
    with pytest.raises(FileNotFoundError, match="bad.faiss is missing"):
        retrieval.Index.load(str(tmp_path / "bad"))


def test_search_cli_builds_and_uses_an_approximate_index(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    common = [f"--model={MINI}", "--image_size=128,64"]
    out = str(tmp_path / "ix")
    for bad, message in [
        (["--ann=fast"], "--ann must be auto, none"),
        (["--ann_options=m=8"], "needs an approximate index"),
        (["--ann=hnsw", "--ann_options=nprobe=8"], "for hnsw takes"),
        (["--ann=hnsw", "--ann_options=m"], "key=integer pairs"),
    ]:
        with pytest.raises(SystemExit):
            search.main(["index", *common, f"--images={folder}", f"--out={out}", *bad])
        assert message in capsys.readouterr().err
        assert not os.path.exists(out + ".json")  # refused before anything was embedded
    search.main(["index", *common, f"--images={folder}", f"--out={out}", "--ann=hnsw", "--ann_options=m=8"])
    assert "hnsw (ef_construction=64, ef_search=256, m=8)" in capsys.readouterr().out
    index = retrieval.Index.load(out)
    assert index.ann.kind == "hnsw" and len(index.ann) == 40
    # Resumed with the default (auto): the kind is kept; no new files, so it is not rebuilt.
    search.main(["index", *common, f"--images={folder}", f"--out={out}"])
    assert retrieval.Index.load(out).ann.options["m"] == 8
    hits = search.main(["query", *common, f"--index={out}", "--k=3", f"--html={tmp_path / 'r.html'}", "a man"])
    r = retrieval.Retriever.load(MINI, image_size=(128, 64))
    assert hits == index.search(r.encode_text(["a man"]), 3)
    assert [p for p, _ in hits[0]] == [p for p, _ in index.search(r.encode_text(["a man"]), 3, exact=True)[0]]
    assert "approximate: hnsw" in (tmp_path / "r.html").read_text()
    search.main(["index", *common, f"--images={folder}", f"--out={out}", "--ann=none"])
    assert retrieval.Index.load(out).ann is None and not os.path.exists(out + ".faiss")


def test_the_service_serves_an_approximate_index(tmp_path):
    from uit_jax import serve

    r = retrieval.Retriever.load(MINI, image_size=(128, 64))
    x, _ = _clustered(n=500, d=r.model.config.embed_dim)
    index = retrieval.Index([str(tmp_path / f"{i}.png") for i in range(len(x))], x, r.fingerprint)
    index.build_ann("ivf", nlist=8, nprobe=8)  # every list probed: exact
    service = serve.Service(r, index)
    try:
        ids = service.prepare(["a man in a red coat", "a woman"], 7).ids
        scores, rows = service._run(ids, 7)
        want_s, want_i = index.top_k(r.encode_text(["a man in a red coat", "a woman"]), 7, exact=True)
        np.testing.assert_array_equal(rows, want_i)
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
        assert service.health()["search"].startswith("ivf (nlist=8, nprobe=8)")
    finally:
        service.close()
