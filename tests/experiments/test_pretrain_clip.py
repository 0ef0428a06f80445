"""The project's pre-trained mini CLIP: written by experiments/pretrain_clip.py in Hugging Face format, read by
`clip.load` and by transformers' `CLIPModel.from_pretrained` with the same embeddings; the shipped copy loads."""

import json
import os

import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers

from experiments import pretrain_clip
from tests import numerics
from tests.models import random_clip_params
from uit_jax.data import synthetic as synth
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tk
from uit_jax.models import clip, convert, uit

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "uit_jax", "assets")
SHIPPED = os.path.join(SHIPPED, "clip-mini-synthetic")


def _embed_both(folder, size, captions):
    """(ours, transformers') unit-norm image and text embeddings of the folder's model at its square size."""
    model, params = convert.load(folder, image_size=(size, size))
    tok = tk.load_tokenizer(folder)
    ids = tk.tokenize(tok, captions, model.config.text_len)
    images = np.random.default_rng(0).standard_normal((3, size, size, 3)).astype(np.float32)
    z_img = np.asarray(model.apply({"params": params}, images, method=model.encode_image)["embed"])
    z_txt = np.asarray(model.apply({"params": params}, ids, method=model.encode_text)["embed"])
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        r_img = hf.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
        r_txt = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
    r_img = getattr(r_img, "pooler_output", r_img).numpy()
    r_txt = getattr(r_txt, "pooler_output", r_txt).numpy()
    return (z_img, z_txt), (r_img, r_txt)


def _assert_parity(ours, theirs):
    for a, b in zip(ours, theirs):
        # float32, different libraries: 2 * gamma_256 of the output's scale (tests/numerics.py)
        assert np.abs(a - b).max() <= numerics.reduction_rtol(256) * np.abs(b).max(), np.abs(a - b).max()


def test_hf_state_dict_round_trip_is_exact():
    config = clip.config_from_preset("tiny", eot_token_id=98)
    params = jax.device_get(random_clip_params(clip.CLIP(config), jax.random.key(0)))
    back = convert.from_hf_state_dict(convert.to_hf_state_dict(params), config)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    with pytest.raises(ValueError, match="square"):
        convert.hf_config_dict(clip.config_from_preset("tiny", image_size=(32, 16), eot_token_id=98), bos_token_id=0)
    with pytest.raises(ValueError, match="eot_token_id"):
        convert.hf_config_dict(clip.config_from_preset("tiny"), bos_token_id=0)


def test_generic_captions_and_square_views():
    ident = synth.sample_identity(np.random.default_rng([1, 0]))
    rng = np.random.default_rng(0)
    caps = [pretrain_clip.generic_caption(ident, rng) for _ in range(40)]
    subjects = {c.split(",")[0].split()[-1] for c in caps}
    # the subject and garments in the annotators' words too (synonyms), so no dataset word is unseen
    assert subjects == set(synth.NOUN_SYNONYMS[ident.gender]) and len(set(caps)) > 20
    assert all(c.startswith(("a ", "an ")) for c in caps)
    vocab = set(synth.VOCABULARY)
    assert all(w in vocab for c in caps for w in synth.caption_words(c)), "the tokenizer only knows VOCABULARY"
    assert any(ident.upper_color in c for c in caps)
    parts = [c.count(",") for c in caps]  # one comma after the subject, then one between named attributes
    every = [pretrain_clip.generic_caption(ident, rng, name_prob=1.0) for _ in range(10)]
    assert min(c.count(",") for c in every) == max(parts) > min(parts)  # --name_prob 1: every attribute, always
    assert all(f"{ident.hair_color} hair" in c and ident.lower_color in c for c in every)
    with pytest.raises(SystemExit, match="--name_prob 1.5 is not a probability"):
        pretrain_clip.main(["--out", "unused", "--name_prob", "1.5"])  # refused before any work
    with pytest.raises(SystemExit, match="--mlm_rate 0.0 in"):
        pretrain_clip.main(["--out", "unused", "--mlm", "1", "--mlm_rate", "0"])
    with pytest.raises(SystemExit, match=f"--corpus_seed {pretrain_clip.UNSEEN_SEED} is the memorisation check's"):
        pretrain_clip.main(["--out", "unused", "--corpus_seed", str(pretrain_clip.UNSEEN_SEED)])
    view = pretrain_clip.square_view(ident, rng, 64)
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8


def test_pretrain_tool_writes_a_checkpoint_both_libraries_read(tmp_path):
    out = str(tmp_path / "clip")
    record = pretrain_clip.main(
        ["--out", out, "--preset", "tiny", "--size", "32", "--text_len", "24", "--ids", "6", "--views", "2",
         "--steps", "3", "--warmup", "1", "--batch", "8", "--log_every", "1"]
    )  # fmt: skip
    assert [r["step"] for r in record["curve"]] == [1, 2, 3] and np.isfinite(record["curve"][-1]["loss"])
    assert {"config.json", "model.safetensors", "pretrain.json", "tokenizer.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "pretrain.json")))["args"]["corpus_seed"] == 1
    ours, theirs = _embed_both(out, 32, ["a man, a red coat", "a woman, long black hair"])
    _assert_parity(ours, theirs)
    # The memorisation check: the first identities of the corpus are exactly those it trained on.
    gap = pretrain_clip.main(["--out", out, "--eval_only", "--gap_ids", "3"])["corpus_gap"]
    assert (gap["seen"]["seed"], gap["unseen"]["seed"], gap["seen"]["ids"]) == (1, pretrain_clip.UNSEEN_SEED, 3)
    assert all(0 <= gap[k]["R1"] <= 100 for k in ("seen", "unseen"))
    tok = tk.load_tokenizer(out)
    head, full = (pretrain_clip.make_corpus(n, 2, 2, 32, 1, tok, 24) for n in (3, 6))
    np.testing.assert_array_equal(head[0], full[0][:6])
    np.testing.assert_array_equal(head[1], full[1][:6])
    # Fine-tuning size: the position embeddings are resized from the square grid, as for OpenAI's CLIP.
    model, _ = convert.load(out, image_size=(64, 32))
    assert model.config.grid == (8, 4) and model.config.text_len == 24
    # Continued from that folder with the masked-word objective, as the later stages of the shipped model.
    more = pretrain_clip.main(
        ["--out", str(tmp_path / "more"), "--init", out, "--preset", "tiny", "--size", "32", "--text_len", "24",
         "--ids", "6", "--steps", "2", "--warmup", "1", "--batch", "4", "--log_every", "1", "--mlm", "1",
         "--mlm_layers", "1"]
    )  # fmt: skip
    assert more["args"]["init"] == out and np.isfinite(more["curve"][-1]["loss"])
    assert np.isfinite(more["curve"][-1]["mlm"]) and 0 <= more["curve"][-1]["mlm_acc"] <= 1
    # The MLM head trains beside the CLIP and is not saved: the folder holds exactly the CLIP's tensors.
    keys = lambda d: set(safetensors.numpy.load_file(os.path.join(d, "model.safetensors")))
    assert keys(tmp_path / "more") == keys(out)
    saved = json.load(open(tmp_path / "more" / "pretrain.json"))
    assert saved["init_record"]["args"]["ids"] == 6 and saved["init_record"]["curve"] == record["curve"]
    # The memorisation check refuses a model whose earlier stage trained on its "unseen" seed.
    saved["init_record"]["args"]["corpus_seed"] = pretrain_clip.UNSEEN_SEED
    with open(tmp_path / "more" / "pretrain.json", "w") as f:
        json.dump(saved, f)
    with pytest.raises(SystemExit, match=f"a stage of this model trained on corpus seed {pretrain_clip.UNSEEN_SEED}"):
        pretrain_clip.main(["--out", str(tmp_path / "more"), "--eval_only", "--gap_ids", "3"])


def test_shipped_model_loads_in_both_libraries():
    assert os.path.isfile(os.path.join(SHIPPED, "model.safetensors")), f"missing shipped weights in {SHIPPED}"
    record = json.load(open(os.path.join(SHIPPED, "pretrain.json")))
    size = record["args"]["size"]
    ours, theirs = _embed_both(SHIPPED, size, ["a woman, a red coat, black boots", "a man, short gray hair"])
    _assert_parity(ours, theirs)
    model, _ = convert.load(SHIPPED, image_size=(128, 64))  # the synthetic default's size
    assert model.config.grid == (8, 4)
    tok = tk.load_tokenizer(SHIPPED)
    assert tk.eot_id(tok) == model.config.eot_token_id and len(tok) == model.config.vocab_size


def test_synthetic_default_fine_tunes_the_shipped_model_with_the_paper_recipe():
    from configs import common, cuhk, synthetic

    c, paper = synthetic.get_config(), cuhk.get_config()
    assert os.path.samefile(c.model_init, SHIPPED)
    assert c.model.temperature == paper.model.temperature == 0.02
    assert c.loss.to_dict() == paper.loss.to_dict()  # SDM, ID, triplet from step 0, restoration x10
    assert c.optim.lr_rules == common.LR_RULES and c.optim.weight_decay == paper.optim.weight_decay
    assert (c.data.erasing_prob, c.data.mlm_masking, c.data.keyword_prob) == (0.5, True, 0.2)
    assert c.model.drop_ratio == 0.7 and c.model.decoder_layers == 4
    assert c.batch_size == paper.batch_size == 128 and c.optim.no_decay_rules == paper.optim.no_decay_rules
    scratch = synthetic.get_config("scratch")
    assert scratch.model_init == "" and scratch.model.preset == "mini" and scratch.model.temperature == 0.2
    assert (scratch.data.crop_pad, scratch.data.keyword_prob, scratch.data.flip) == (0, 0.0, True)


def test_mlm_masks_words_not_articles():
    """`mlm_mask` hides maskable words only, at the asked rate, each hidden word a target; every caption gets one."""
    tok = tk.load_tokenizer(SHIPPED)
    maskable = pretrain_clip.maskable_ids(tok)
    mask_id = text_lib.mask_token_id(tok)
    never = tok(["a an ,"], add_special_tokens=False)["input_ids"][0] + [0, mask_id, tk.sot_id(tok), tk.eot_id(tok)]
    words = tok(["lady long brown hair black boots"], add_special_tokens=False)["input_ids"][0]
    assert not maskable[never].any() and maskable[words].all()
    _, ids = pretrain_clip.make_corpus(200, 1, 2, 32, 3, tok, 56)
    ids = ids.reshape(-1, 56)
    masked, labels = pretrain_clip.mlm_mask(ids, np.random.default_rng(0), 0.3, maskable, mask_id)
    hidden = masked != ids
    np.testing.assert_array_equal(hidden, labels > 0)
    np.testing.assert_array_equal(labels[hidden], ids[hidden])
    assert (masked[hidden] == mask_id).all() and maskable[ids[hidden]].all() and hidden.any(1).all()
    n = maskable[ids].sum()  # the forced one per caption adds at most one per row
    assert abs(hidden.sum() - 0.3 * n) <= 5 * np.sqrt(n * 0.3 * 0.7) + len(ids) * 0.7**3
    every, _ = pretrain_clip.mlm_mask(ids, np.random.default_rng(1), 1.0, maskable, mask_id)
    np.testing.assert_array_equal(every == mask_id, maskable[ids])


def test_mlm_objective_reads_the_image():
    """With an MLM head the step's ITC is the plain one, and its masked-word loss depends on the image."""
    cfg = clip.config_from_preset("tiny", vocab_size=50, image_size=(32, 32), text_len=12, eot_token_id=49)
    model = clip.CLIP(cfg)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((4, 32, 32, 3)).astype(np.float32) for _ in range(2)]
    ids = rng.integers(1, 48, (4, 12)).astype(np.int32)
    ids[:, -1] = 49
    params = model.init(jax.random.key(0), images[0], ids)["params"]
    params = dict(params, logit_scale=jax.numpy.asarray(2.0))
    head = uit.MLMHead(vocab_size=50, width=cfg.embed_dim, heads=1, layers=1)
    n_tok = 1 + cfg.grid[0] * cfg.grid[1]
    head_params = head.init(jax.random.key(1), np.zeros((1, 12, cfg.embed_dim)), np.zeros((1, n_tok, cfg.embed_dim)))
    both = dict(clip=params, mlm=head_params["params"])
    mlm_ids, labels = pretrain_clip.mlm_mask(ids, rng, 0.5, np.arange(50) < 48, 48)
    tx = optax.sgd(0.0)
    plain = pretrain_clip.make_step(model, tx)(params, tx.init(params), images[0], ids)[2]
    step = pretrain_clip.make_step(model, tx, head, 0.5)
    a, b = (step(both, tx.init(both), im, ids, mlm_ids, labels)[2] for im in images)
    # the same float32 ops in two programs, fused differently: equal to some tens of ulps of the loss
    assert abs(float(a["itc"]) - float(plain["itc"])) <= 100 * numerics.F32_EPS * max(1.0, abs(float(plain["itc"])))
    assert abs(float(a["mlm"]) - float(b["mlm"])) > 1e-4  # another image, another prediction of the hidden words
