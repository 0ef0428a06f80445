"""Tests for uit_jax.data.tokenizer: generated BPE vocabularies, fixed-length layout, truncation, errors."""

import json
import os
import random
import shutil

import numpy as np
import pytest

from uit_jax.data import tokenizer as tk

WORDS = [
    "a",
    "man",
    "woman",
    "wearing",
    "red",
    "shirt",
    "blue",
    "jeans",
    "black",
    "backpack",
    "t-shirt",
    "carrying",
    "long",
    "hair",
    "shoes",
    "white",
    "he",
    "she",
    "is",
    "and",
    "with",
    "his",
    "her",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tk.write_bpe_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tk.load_tokenizer(tok_dir)


def _reference_bpe(symbols, ranks):
    """Textbook BPE encoding: repeatedly merge the adjacent pair with the lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_files_layout_and_every_word_is_one_token(tok_dir):
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8"))
    lines = open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    # OpenAI layout: 256 byte symbols, their </w> forms, merges, then mask and the two special tokens.
    assert len(vocab) == 512 + len(merges) + 3
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    # The masking augmentation's id (the one before start-of-text) is a dedicated token, never a word.
    assert vocab["<|mask|>"] == len(vocab) - 3
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    ranks = {m: i for i, m in enumerate(merges)}
    for w in ["man", "wearing", "backpack", "carrying"]:
        assert _reference_bpe([*w[:-1], w[-1] + "</w>"], ranks) == [w + "</w>"]
        assert w + "</w>" in vocab


def test_round_trip_and_layout(tok):
    text = "A man wearing red t-shirt and long hair, carrying a black backpack"
    ids = tk.tokenize(tok, [text, "she"], max_len=77)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    sot, eot = tk.sot_id(tok), tk.eot_id(tok)
    row = ids[0]
    n = int(np.argmax(row == eot))
    assert row[0] == sot and np.all(row[n + 1 :] == 0)
    pieces = tok.convert_ids_to_tokens(row[1:n].tolist())
    # Known words are single tokens; punctuation is split off like CLIP does.
    assert pieces == [
        "a</w>",
        "man</w>",
        "wearing</w>",
        "red</w>",
        "t</w>",
        "-</w>",
        "shirt</w>",
        "and</w>",
        "long</w>",
        "hair</w>",
        ",</w>",
        "carrying</w>",
        "a</w>",
        "black</w>",
        "backpack</w>",
    ]
    assert tok.decode(row[1:n].tolist()).replace(" ", "") == text.lower().replace(" ", "")
    assert ids[1, :3].tolist() == [sot, tok.convert_tokens_to_ids("she</w>"), eot]


def test_truncation_keeps_eot_last(tok):
    ids = tk.tokenize(tok, ["man " * 100, "man " * 76, "man " * 75], max_len=77)
    eot = tk.eot_id(tok)
    man = tok.convert_tokens_to_ids("man</w>")
    for r in ids[:2]:
        assert r[-1] == eot and np.all(r[1:-1] == man)
    assert ids[2, 75] == man and ids[2, 76] == eot and np.sum(ids[2] == man) == 75  # exact fit
    short = tk.tokenize(tok, ["man " * 10], max_len=8)
    assert short.shape == (1, 8) and short[0, -1] == eot and np.sum(short == eot) == 1


def test_unknown_words_tokenize_into_byte_pieces(tok):
    ids = tk.tokenize(tok, ["zebra café"], max_len=16)[0]
    n = int(np.argmax(ids == tk.eot_id(tok)))
    toks = tok.convert_ids_to_tokens(ids[1:n].tolist())
    assert tok.unk_token_id not in ids[1:n]
    assert "".join(toks).replace("</w>", "") == "zebracafÃ©"  # byte-level: é is two byte symbols
    assert toks[4] == "a</w>" and toks[-1].endswith("</w>")


def test_deterministic_and_order_independent(tmp_path):
    shuffled = WORDS[:]
    random.Random(0).shuffle(shuffled)
    a = tk.write_bpe_tokenizer(WORDS, tmp_path / "a")
    b = tk.write_bpe_tokenizer(shuffled + WORDS[:3], tmp_path / "b")
    for name in ["vocab.json", "merges.txt"]:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()


def test_vocab_and_merges_alone_load_the_same_tokenizer(tok_dir, tok, tmp_path):
    for name in ["vocab.json", "merges.txt"]:
        shutil.copy(os.path.join(tok_dir, name), tmp_path / name)
    tok2 = tk.load_tokenizer(str(tmp_path))
    texts = ["A woman with blue jeans and white shoes", "unseen words 42!"]
    np.testing.assert_array_equal(tk.tokenize(tok2, texts), tk.tokenize(tok, texts))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.load_tokenizer(str(tmp_path))
    with pytest.raises(OSError, match="HF_HOME"):
        tk.load_tokenizer("no-such-org/no-such-clip-model")
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(OSError, match="not CLIP's"):
        tk.load_tokenizer(str(tmp_path))
    with pytest.raises(TypeError):
        tk.tokenize(None, "a string")
