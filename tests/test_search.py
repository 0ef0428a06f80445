"""Search with a trained model: the self-describing workdir, export, Retriever, Index, the search CLI, evaluation
reports, IRRA/SEN import and the zero-shot baseline."""

import html.parser
import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.test_convert import _to_openai
from tests.test_train import tiny_config
from uit_jax import build as build_lib
from uit_jax import checkpoint as ckpt_lib
from uit_jax import evaluate as eval_lib
from uit_jax import export, metrics, report, retrieval, rundir, search, sharding
from uit_jax import state as state_lib
from uit_jax.data import images as images_lib
from uit_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def _eval_path_embeddings(config, wd):
    """The gallery embeddings as --mode=eval computes them (the Evaluator's batches and jitted encoders)."""
    setup = build_lib.build(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    rng = jax.random.key(config.seed)
    abstract, *_ = state_lib.train_state_spec(config, setup.model, mesh, rng, setup.info.num_train_pairs)
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    params = ckpt.restore(ckpt.best()[0], abstract).state["params"]
    ckpt.close()
    ev = eval_lib.Evaluator.from_config(config, setup.model, setup.tokenizer, mesh, "test")
    with jax.set_mesh(mesh):
        z, _ = eval_lib.embed(ev.encode_images, params, ev.gallery, "images", mesh)
    return z, ev.data.gallery_paths


def test_workdir_describes_itself(run):
    config, wd, _ = run
    stored = json.loads((wd / rundir.CONFIG_FILE).read_text())
    assert stored == rundir.config_to_dict(config)
    model = json.loads((wd / rundir.MODEL_FILE).read_text())
    assert model["image_size"] == [24, 16] and model["clip"]["vision_width"] == 48
    assert (wd / rundir.TOKENIZER_DIR / "tokenizer.json").exists()


def test_resume_with_a_changed_config(run, tmp_path, caplog):
    config, wd, _ = run
    shape = tiny_config(tmp_path)
    shape.data.image_size = (32, 16)
    with pytest.raises(rundir.ConfigChangedError, match=r"data.image_size: \[24, 16\] -> \[32, 16\]"):
        rundir.check_resume(str(wd), shape)
    off = rundir.config_to_dict(config)
    off["loss"]["restoration"] = 0.0  # the decoder's parameters would vanish
    with pytest.raises(rundir.ConfigChangedError, match="loss.restoration"):
        rundir.check_resume(str(wd), off)
    mild = rundir.config_to_dict(config)
    mild["optim"]["lr"] = 0.5
    mild["loss"]["restoration"] = 3.0  # still on: same parameters
    assert rundir.check_resume(str(wd), mild) == mild
    assert "optim.lr" in caplog.text and "loss.restoration" in caplog.text


def test_export_round_trip_and_the_eval_path_give_the_same_embeddings(run, tmp_path):
    config, wd, root = run
    info = export.export_workdir(str(wd), str(tmp_path / "model"))
    assert info["step"] == 4
    assert sorted(os.listdir(tmp_path / "model")) == sorted(
        ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "uit_model.json"]
    )
    z_eval, rel = _eval_path_embeddings(config, wd)
    imgs = next((root / "raw").glob("*/imgs"))  # the generated set's folder, in the CUHK-PEDES layout
    files = [str(imgs / p) for p in rel]
    assert Image.open(files[0]).size == (16, 32)  # raw 32x16, the model sees 24x16: a real resize
    from_folder = retrieval.Retriever.load(str(tmp_path / "model"))
    from_workdir = retrieval.Retriever.load(str(wd))
    assert from_folder.fingerprint == from_workdir.fingerprint
    z1 = from_folder.encode_images(files, batch_size=5)  # a padded last batch too
    z2 = from_workdir.encode_images([Image.open(f) for f in files])  # PIL images
    z3 = from_folder.encode_images([np.asarray(Image.open(f).convert("RGB")) for f in files])  # uint8 arrays
    np.testing.assert_array_equal(z2, z3)  # same pixels, same batch shape: bitwise
    assert np.abs(z1 - z2).max() < 1e-5  # another batch shape compiles another kernel: float32 rounding only
    assert np.abs(z1 - z_eval).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(z1, axis=1), 1.0, rtol=1e-5)
    t = from_folder.encode_text(["a man in a red coat", "a woman"])
    assert t.shape == (2, 24) and np.allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    # The lower-level entries (pixels already at the model's size, token ids) are what encode_images/_text use.
    sized = images_lib.load_batch(files, from_folder.image_size)[0]
    np.testing.assert_array_equal(from_folder.encode_pixels(sized), z3)
    ids = tok_lib.tokenize(from_folder.tokenizer, ["a man in a red coat", "a woman"], from_folder.text_len)
    np.testing.assert_array_equal(from_folder.encode_token_ids(ids), t)
    with pytest.raises(ValueError, match=r"uint8 pixels of shape \(N, 24, 16, 3\).*got uint8 \(1, 32, 16, 3\)"):
        from_folder.encode_pixels(np.zeros((1, 32, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="token ids of shape"):
        from_folder.encode_token_ids(ids[:, :5])
    with pytest.raises(FileNotFoundError, match="not an exported uit_jax model folder"):
        export.load_model(str(tmp_path))


def _folder(tmp_path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        size = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
        img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        ext = ("png", "jpg", "webp")[i % 3]
        p = d / ("sub" if i % 2 else "") / f"img{i:02d}.{ext}"
        img.save(p)
        paths.append(str(p))
    (d / "notes.txt").write_text("not an image")
    return d, sorted(paths)


def test_index_search_resume_and_bad_files(run, tmp_path):
    _, wd, _ = run
    r = retrieval.Retriever.load(str(wd))
    folder, paths = _folder(tmp_path)
    calls = []
    index = r.index_folder(str(folder), batch_size=4, progress=lambda d, t, s: calls.append((d, t)))
    assert sorted(index.paths) == paths and calls[-1] == (12, 12)
    planted = paths[7]
    hits = index.search(r.encode_images([planted]), k=3)
    assert hits[0][0][0] == planted and abs(hits[0][0][1] - 1.0) < 1e-5
    # Saved and loaded; a rerun after new files arrive embeds only those.
    index.save(str(tmp_path / "idx"))
    Image.fromarray(np.zeros((20, 10, 3), np.uint8)).save(folder / "new.png")
    calls.clear()
    again = r.index_folder(
        str(folder), index=retrieval.Index.load(str(tmp_path / "idx")), progress=lambda *a: calls.append(a)
    )
    assert len(again) == 13 and calls[-1][:2] == (1, 1)
    # Bad files: every one named, nothing indexed; or left out on request.
    (folder / "truncated.jpg").write_bytes((folder / "img00.png").read_bytes()[:40])
    (folder / "sub" / "text.png").write_text("hello")
    with pytest.raises(images_lib.UnreadableImageError) as e:
        r.index_folder(str(folder))
    assert "truncated.jpg" in str(e.value) and "text.png" in str(e.value) and len(e.value.bad) == 2
    skipped = r.index_folder(str(folder), skip_bad=True)
    assert len(skipped) == 13 and sorted(os.path.basename(p) for p in skipped.skipped) == ["text.png", "truncated.jpg"]
    other = retrieval.Index.empty(24, "another-model")
    with pytest.raises(ValueError, match="another model"):
        r.index_folder(str(folder), index=other)


def test_top_k_is_exact_across_blocks_and_devices():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1003, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    assert len(jax.local_devices()) == 8  # the gallery is sharded across the simulated devices
    scores, idx = retrieval.top_k(q, g, 10, block=256)
    want = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, want, 1), rtol=1e-5, atol=1e-6)
    assert retrieval.top_k(q, g[:3], 10)[1].shape == (7, 3)
    # Full float32 scores on accelerators too (GPUs default to TF32 for float32 matmuls; a CPU ignores the flag).
    best = np.zeros((7, 3), np.float32), np.zeros((7, 3), np.int32)
    jaxpr = str(jax.make_jaxpr(retrieval._merge_block)(q, g[:4], *best, 0, 4))
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr
    placed = retrieval.DeviceGallery(g, block=100)  # placed once, queried twice: same answer
    np.testing.assert_array_equal(retrieval.top_k(q, placed, 10)[1], want)
    np.testing.assert_array_equal(retrieval.top_k(q[:2], placed, 10)[1], want[:2])


class _Imgs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_search_cli_index_query_and_report(run, tmp_path, capsys):
    _, wd, _ = run
    folder, paths = _folder(tmp_path, n=6)
    search.main(["index", f"--model={wd}", f"--images={folder}", f"--out={tmp_path / 'ix'}"])
    assert json.loads((tmp_path / "ix.json").read_text())["paths"] == paths
    page = tmp_path / "r.html"
    hits = search.main(
        ["query", f"--model={wd}", f"--index={tmp_path / 'ix'}", "--k=4", f"--html={page}", "a red coat", "a man"]
    )
    out = capsys.readouterr().out
    assert len(hits) == 2 and all(len(h) == 4 for h in hits) and "a red coat" in out and hits[0][0][0] in out
    p = _Imgs()
    p.feed(page.read_text())
    assert len(p.srcs) == 8 and all(s.startswith("data:image/jpeg;base64,") for s in p.srcs)
    with pytest.raises(SystemExit):
        search.main(["query", f"--model={wd}", f"--index={tmp_path / 'nothing'}", "x"])


def test_eval_rankings_agree_with_the_metrics(run):
    config, wd, _ = run
    rows = [json.loads(x) for x in (wd / "eval" / "test_rankings.jsonl").read_text().splitlines()]
    results = json.loads((wd / "results.json").read_text())["test_at_best"]
    assert len(rows) == results["num_queries"]
    assert 100 * np.mean([r["first_correct_rank"] == 1 for r in rows]) == pytest.approx(results["R1"], abs=1e-6)
    assert 100 * np.mean([r["ap"] for r in rows]) == pytest.approx(results["mAP"], abs=1e-4)
    assert all(len(r["top_paths"]) == 10 and r["top_scores"] == sorted(r["top_scores"], reverse=True) for r in rows)
    p = _Imgs()
    p.feed((wd / "eval" / "test_report.html").read_text())
    # The error analysis first (each most-wrong query: its top 5 and the image it should have found), then the
    # best, median and worst queries with their top 10.
    shown = 6 * len(report.most_wrong(rows, 10)) + 10 * len(report.sample(rows, 4))
    assert len(p.srcs) == shown and all(s.startswith("data:image/jpeg") for s in p.srcs)


def test_rankings_against_a_brute_force_loop():
    rng = np.random.default_rng(1)
    sim = rng.standard_normal((9, 12)).astype(np.float32)
    q, g = rng.integers(0, 3, 9), rng.integers(0, 3, 12)
    g[:3] = [0, 1, 2]
    rows = report.rankings(sim, q, g, [f"c{i}" for i in range(9)], [f"p{j}" for j in range(12)], k=5, block=4)
    for i, row in enumerate(rows):
        order = sorted(range(12), key=lambda j: -sim[i, j])
        correct = [n + 1 for n, j in enumerate(order) if g[j] == q[i]]
        assert row["first_correct_rank"] == correct[0]
        assert row["ap"] == pytest.approx(np.mean([(m + 1) / r for m, r in enumerate(correct)]), abs=1e-6)
        assert row["top_paths"] == [f"p{j}" for j in order[:5]]
    assert 100 * np.mean([r["ap"] for r in rows]) == pytest.approx(
        metrics.retrieval_metrics(sim, q, g)["mAP"], abs=1e-3
    )


def test_irra_sen_checkpoint_import(tiny_hf_clip_dir, tmp_path, caplog):
    """A `{"model": state_dict}` file with the towers under base_model.* (OpenAI names) beside SEN's own modules
    gives the same embeddings as transformers' PyTorch CLIP on the same random weights."""
    import transformers

    from uit_jax.data import tokenizer as tk

    tok = tk.load_tokenizer(tiny_hf_clip_dir)
    # OpenAI's layout stores no head count (build_model uses width / 64): widths of 64, one head.
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, bos_token_id=tk.sot_id(tok), eos_token_id=tk.eot_id(tok), pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1, image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(1)
    ref = transformers.CLIPModel(config).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items() if "position_ids" not in k}
    towers = {f"base_model.{k}": torch.from_numpy(np.asarray(v)) for k, v in _to_openai(sd).items()}
    heads = {
        "classifier.weight": torch.zeros(5, 24),
        "classifier.bias": torch.zeros(5),
        "mlm_head.fc.weight": torch.zeros(3),
    }
    torch.save({"model": {**towers, **heads}, "epoch": 3}, tmp_path / "best.pth")
    r = retrieval.Retriever.load(str(tmp_path / "best.pth"), image_size=(32, 32), tokenizer=tiny_hf_clip_dir)
    assert "classifier (2 tensors)" in caplog.text and "mlm_head (1 tensors)" in caplog.text
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    texts = ["a man in a red coat", "she is wearing black boots and a hat", "a bag"]
    with torch.no_grad():
        pix = torch.from_numpy(images_lib.normalize(imgs)).permute(0, 3, 1, 2)
        zi = ref.get_image_features(pixel_values=pix)
        zi = getattr(zi, "pooler_output", zi)  # a tensor in older transformers
        zi = (zi / zi.norm(dim=-1, keepdim=True)).numpy()
        ids = torch.from_numpy(tok_lib.tokenize(r.tokenizer, texts, r.text_len)).long()
        zt = ref.get_text_features(input_ids=ids)
        zt = getattr(zt, "pooler_output", zt)
        zt = (zt / zt.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(r.encode_images(list(imgs)) - zi).max() < 1e-5
    assert np.abs(r.encode_text(texts) - zt).max() < 1e-5


def test_zero_shot_eval_without_a_checkpoint(run, tiny_hf_clip_dir, tmp_path):
    config, _, root = run
    c = tiny_config(root)
    c.model_init = tiny_hf_clip_dir
    c.data.image_size = (32, 16)
    c.model.stride = 0
    c.data.text_len = 77
    out = eval_lib.evaluate_run(c, str(tmp_path / "zs"))
    assert out["step"] == 0 and set(out["results"]) == {"val @ zero-shot", "test @ zero-shot"}
    assert (tmp_path / "zs" / "eval" / "test_rankings.jsonl").exists()
    assert not (tmp_path / "zs" / "checkpoints").exists()
