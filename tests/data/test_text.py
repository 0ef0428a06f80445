"""Caption augmentations: word splitting, key-word filter, token alignment, SEN's BERT-style masking."""

import nltk
import numpy as np
import pytest
import tensorflow as tf

from uit_jax.data import synthetic
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tok_lib.load_tokenizer(tok_lib.write_bpe_tokenizer(synthetic.VOCABULARY, tmp_path_factory.mktemp("t")))


def test_split_words_treebank_style():
    assert text_lib.split_words("A man's red shirt.He wears jeans, and boots.") == [
        "A",
        "man",
        "'s",
        "red",
        "shirt",
        ".",
        "He",
        "wears",
        "jeans",
        ",",
        "and",
        "boots",
        ".",
    ]


def test_keyword_filter_keeps_nouns_adjectives_pronouns():
    words = ["She", "is", "wearing", "a", "red", "coat", "and", "her", "black", "boots", "."]
    tags = ["PRP", "VBZ", "VBG", "DT", "JJ", "NN", "CC", "PRP$", "JJ", "NNS", "."]
    assert text_lib.keyword_filter(words, tags) == ["She", "red", "coat", "her", "black", "boots"]


def test_lexicon_tagger_and_missing_words():
    tag = text_lib.lexicon_tagger(synthetic.POS_TAGS)
    assert tag(["She", "wears", "red", "boots"]) == ["PRP", "VBZ", "JJ", "NNS"]
    with pytest.raises(KeyError, match="zebra"):
        tag(["a", "zebra"])


def test_nltk_tagger_missing_data_names_the_install_command(monkeypatch):
    def not_found(*a, **k):
        raise LookupError("not here")

    monkeypatch.setattr(nltk.data, "find", not_found)
    with pytest.raises(LookupError, match="python -m nltk.downloader averaged_perceptron_tagger_eng"):
        text_lib.nltk_tagger()


def test_mask_token_is_the_id_before_start_of_text(tok):
    # SEN: <|mask|> = 49405, right before <|startoftext|> 49406 and <|endoftext|> 49407.
    assert text_lib.mask_token_id(tok) == tok_lib.sot_id(tok) - 1
    assert text_lib.mask_token_id(tok) < min(tok_lib.sot_id(tok), tok_lib.eot_id(tok))


def test_encode_captions_ids_and_content_flags(tok):
    rng = np.random.default_rng(0)
    idents = [synthetic.sample_identity(np.random.default_rng(i)) for i in range(50)]
    caps = [synthetic.make_caption(ident, rng) for ident in idents]
    caps.append(" ".join(["red coat ."] * 40))  # longer than 77 tokens: truncated, EOT last
    words = [text_lib.split_words(c) for c in caps]
    tags = [text_lib.lexicon_tagger(synthetic.POS_TAGS)(w) for w in words]
    ids, content = text_lib.encode_captions(tok, caps, words, tags, 77)
    np.testing.assert_array_equal(ids, tok_lib.tokenize(tok, caps, 77))
    # by hand: each word's tokens carry its tag's flag (every synthetic word is one token)
    for i in range(10):
        n = len(words[i])
        assert (ids[i, 1 : n + 1] > 0).all() and ids[i, n + 1] == tok_lib.eot_id(tok)
        np.testing.assert_array_equal(content[i, 1 : n + 1], [t in text_lib.CONTENT_TAGS for t in tags[i]])
        assert not content[i, 0] and not content[i, n + 1 :].any()


def test_encode_captions_real_text_quirks(tok):
    """Raw text is tokenized as written (quotes, 'cannot'), while NLTK rewrites some words."""
    cap = 'She wears a "red" coat, cannot see.'
    words = text_lib.split_words(cap)
    assert "``" in words and "can" in words and "not" in words
    tags = ["PRP", "VBZ", "DT", "``", "JJ", "''", "NN", ",", "MD", "RB", "VB", "."]
    ids, content = text_lib.encode_captions(tok, [cap], [words], [tags], 77)
    np.testing.assert_array_equal(ids, tok_lib.tokenize(tok, [cap], 77))
    pieces = tok(cap, add_special_tokens=False, return_offsets_mapping=True)
    flagged = [cap[s:e] for (s, e), c in zip(pieces["offset_mapping"], content[0, 1:]) if c]
    assert flagged == ["red", "coat"]


def test_masking_rates_over_many_draws():
    mask_id, L, n = 1000, 40, 4000
    ids = np.zeros(L, np.int32)
    ids[0], ids[31] = 1002, 1001  # start / end of text (ids above the mask id)
    ids[1:31] = np.arange(10, 40)  # 30 regular tokens
    content = np.zeros(L, bool)
    content[1:16] = True  # 15 nouns/adjectives, 15 others
    fn = tf.function(lambda s: text_lib.mask_tokens(tf.constant(ids), tf.constant(content), s, mask_id=mask_id))
    masked, labels = zip(*[fn(tf.constant([7, i], tf.int64)) for i in range(n)])
    masked, labels = np.stack(masked), np.stack(labels)
    chosen = labels > 0
    # specials and padding untouched, never chosen
    np.testing.assert_array_equal(masked[:, [0, 31]], np.broadcast_to(ids[[0, 31]], (n, 2)))
    assert not chosen[:, [0, *range(31, L)]].any()
    np.testing.assert_array_equal(masked[:, 32:], 0)
    # labels are the original ids where chosen
    np.testing.assert_array_equal(np.where(chosen, labels, 0), np.where(chosen, ids, 0))
    # rates: 30% of content tokens, 5% of others (position 1 also gets the at-least-one fallback)
    p_content = chosen[:, 2:16].mean()
    p_other = chosen[:, 16:31].mean()
    assert abs(p_content - 0.3) < 0.01, p_content
    assert abs(p_other - 0.05) < 0.005, p_other
    # 80% mask id, 10% random in [1, mask_id), 10% kept
    new = masked[chosen]
    orig = np.broadcast_to(ids, masked.shape)[chosen]
    is_mask = new == mask_id
    kept = new == orig
    assert abs(is_mask.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.015  # (a random draw hits the original id with prob ~1e-3)
    rand = new[~is_mask & ~kept]
    assert rand.min() >= 1 and rand.max() < mask_id
    assert chosen.any(axis=1).all()  # at least one target per caption


def test_masking_fallback_masks_first_word_only_if_regular():
    # one regular token with rate 0 -> nothing chosen -> the first word is masked
    ids = tf.constant([1002, 55, 1001, 0], tf.int32)
    content = tf.constant([False, False, False, False])
    m, lab = text_lib.mask_tokens(ids, content, tf.constant([0, 1], tf.int64), mask_id=1000, other_rate=0.0)
    assert m.numpy().tolist() == [1002, 1000, 1001, 0] and lab.numpy().tolist() == [0, 55, 0, 0]
    # an empty caption (filtered to nothing): SOT EOT only; EOT is never masked (SEN would mask it)
    ids = tf.constant([1002, 1001, 0, 0], tf.int32)
    m, lab = text_lib.mask_tokens(ids, content, tf.constant([0, 1], tf.int64), mask_id=1000)
    assert m.numpy().tolist() == [1002, 1001, 0, 0] and not lab.numpy().any()


def test_mask_id_of_generated_tokenizer_is_no_word(tmp_path):
    tok = tok_lib.load_tokenizer(tok_lib.write_bpe_tokenizer(["young", "red", "coat"], tmp_path / "tok"))
    mask = text_lib.mask_token_id(tok)
    ids = tok_lib.tokenize(tok, ["a young man in a red coat"], max_len=16)[0]
    assert mask not in ids
    assert tok.convert_ids_to_tokens(mask) == "<|mask|>"


def test_file_tagger_tsv_and_json(tmp_path):
    tsv = tmp_path / "tags.tsv"
    tsv.write_text("# word -> tag\nMann\tNN\nrote\tJJ\nträgt VBZ\n", encoding="utf-8")
    tag = text_lib.make_tagger(str(tsv))
    assert tag(["Ein", "mann", "trägt", "rote"]) == ["X", "NN", "VBZ", "JJ"]  # unknown words: X, case-insensitive
    assert text_lib.keyword_filter(["Ein", "mann", "trägt", "rote"], tag(["Ein", "mann", "trägt", "rote"])) == [
        "mann",
        "rote",
    ]
    js = tmp_path / "tags.json"
    js.write_text('{"coat": "NN", "red": "JJ"}')
    assert text_lib.make_tagger(str(js))(["red", "coat", "on"]) == ["JJ", "NN", "X"]
    assert text_lib.make_tagger("") is None  # the dataset's own default
    bad = tmp_path / "bad.tsv"
    bad.write_text("coat\tNN\nred JJ extra\n")
    with pytest.raises(ValueError, match=r"bad.tsv line 2: 'red JJ extra' is not 'word<TAB>tag'"):
        text_lib.make_tagger(str(bad))
