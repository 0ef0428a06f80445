"""Caption-side data work: word splitting, POS tagging, the key-word filter, token alignment and MLM masking.

What depends only on the caption is done once: words and their Penn Treebank tags at build time (builders.py),
token ids of the full and the key-word-filtered caption, with a per-token "content word" flag, when a pipeline
is created (`encode_captions`; tokenizer offsets map tokens to words). Per step only two random choices
remain, done in TensorFlow by `mask_tokens`.

The reference code (SEN, datasets/bases.py) and how we differ:
  * Key-word filter: with probability 0.2 a training caption is cut to the words tagged PRP*, NN* or JJ*
    (SEN tags with NLTK per step; we tag once, in context, at build time).
  * Masking: every training caption is masked BERT-style, as a side effect of SEN's MLM helper
    (`caption_tokens.numpy()` shares memory with the tensor it returns). Each regular token is selected
    with p 0.3 if it is a noun/adjective (NN, NNS, NNP, NNPS, JJ, JJR, JJS) and 0.05 otherwise; a selected
    token becomes the mask token (80%), a uniformly random token in [1, mask_id) (10%), or stays (10%);
    its label is the original id, 0 elsewhere. If nothing is selected, token 1 is masked.
    SEN tags each BPE piece on its own (`pos_tag([piece])`); we give each piece the in-context tag of the
    word it belongs to. SEN's "at least one" rule can mask the end-of-text token of an empty (filtered)
    caption; we never touch start/end-of-text or padding, so the text tower always finds its pooling token.
  * Mask token: CLIP's vocabulary has none. SEN's tokenizer drops the last BPE merge ("jekyll</w>", id
    49405) and puts `<|mask|>` at that id, right before start-of-text (49406) and end-of-text (49407).
    We use the same id, `mask_token_id(tokenizer) = start-of-text id - 1`, for any CLIP-style tokenizer
    (including the small synthetic one, whose special tokens are also last).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from uit_jax.data import tokenizer as tok_lib

KEYWORD_PREFIXES = ("PRP", "NN", "JJ")  # kept by the key-word filter
CONTENT_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS"})  # masked at the higher rate
NLTK_TAGGER = "averaged_perceptron_tagger_eng"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])")


def split_words(caption: str) -> list[str]:
    """Words and punctuation of a caption, Treebank style ("man's" -> "man", "'s"; "shirt." -> "shirt", ".").

    Like `nltk.word_tokenize` without its Punkt sentence splitter (which needs a data download): sentences
    are cut on end punctuation with a regex, then each goes through NLTK's Treebank word tokenizer.
    """
    from nltk.tokenize import NLTKWordTokenizer

    tk = NLTKWordTokenizer()
    return [w for s in _SENTENCE_END.split(caption.strip()) if s for w in tk.tokenize(s)]


def nltk_tagger() -> Callable[[list[str]], list[str]]:
    """NLTK's averaged perceptron tagger, or an error naming the one command that installs its data."""
    import nltk

    try:
        nltk.data.find(f"taggers/{NLTK_TAGGER}/")
    except LookupError:
        raise LookupError(
            f"POS tags for the key-word filter need NLTK's '{NLTK_TAGGER}' data, which is not installed "
            f"(searched {nltk.data.path}). Install it with:\n    python -m nltk.downloader {NLTK_TAGGER}"
        ) from None
    from nltk.tag.perceptron import PerceptronTagger

    tagger = PerceptronTagger()
    return lambda words: [t for _, t in tagger.tag(list(words))]


def lexicon_tagger(tags: dict[str, str], default: str | None = None) -> Callable[[list[str]], list[str]]:
    """A tagger from a word -> tag table (lower-case keys); an unknown word gets `default`, or is an error (None)."""

    def tag(words):
        if default is None:
            missing = sorted({w for w in words if w.lower() not in tags})
            if missing:
                raise KeyError(f"words without a POS tag in the lexicon: {missing}")
        return [tags.get(w.lower(), default) for w in words]

    return tag


def file_tagger(path: str) -> Callable[[list[str]], list[str]]:
    """A tagger from a word -> tag file: one `word<TAB>tag` per line (or `word tag`), or a JSON object.

    Lookup is case-insensitive; a word the file lacks gets the tag 'X' (so the key-word filter drops it). Any
    tag set works as long as key words get Penn Treebank's PRP*, NN* or JJ* (keyword_filter), e.g. a table
    mapped from another language's tagger.
    """
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"config.data.tagger={path!r}: cannot read the word->tag file ({e}).") from None
    if text.lstrip().startswith("{"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected {{word: tag}}.") from None
    else:
        table = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path} line {n}: {line!r} is not 'word<TAB>tag'.")
            table[parts[0].strip()] = parts[1].strip()
    if not table or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError(f"{path}: expected a non-empty word -> tag table of strings.")
    return lexicon_tagger({k.lower(): v for k, v in table.items()}, default="X")


def make_tagger(spec: str) -> Callable[[list[str]], list[str]] | None:
    """config.data.tagger -> a tagger: '' = the dataset's own default (None), 'nltk', or a word->tag file."""
    if not spec:
        return None
    if spec == "nltk":
        return nltk_tagger()
    return file_tagger(spec)


def keyword_filter(words: Sequence[str], tags: Sequence[str]) -> list[str]:
    """The words tagged PRP*, NN* or JJ*, in order (SEN's filter_sentence)."""
    return [w for w, t in zip(words, tags) if t.startswith(KEYWORD_PREFIXES)]


def mask_token_id(tokenizer) -> int:
    """The id SEN uses for `<|mask|>`: the one right before start-of-text (49405 for OpenAI CLIP)."""
    sot = tok_lib.sot_id(tokenizer)
    eot = tok_lib.eot_id(tokenizer)
    mask = min(sot, eot) - 1
    if mask < 2:
        raise ValueError(f"tokenizer has special ids sot={sot}, eot={eot}: no room for a mask id below them.")
    return mask


def encode_captions(
    tokenizer,
    texts: Sequence[str],
    words: Sequence[Sequence[str]],
    tags: Sequence[Sequence[str]],
    max_len: int = 77,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (N, max_len) int32 of `texts` and a per-token content-word flag (N, max_len) bool.

    Ids are exactly `tokenizer.tokenize(tokenizer, texts, max_len)` (SOT, tokens, EOT, zeros; cut with EOT
    last). A token is a content word if the word (from `words`, tagged `tags`) covering its first character
    is tagged NN*/JJ* (CONTENT_TAGS). Words are located in the text left to right; a word the splitter
    rewrote (NLTK turns '"' into '``') is not found and its characters count as not content.
    """
    sot, eot = tok_lib.sot_id(tokenizer), tok_lib.eot_id(tokenizer)
    ids = np.zeros((len(texts), max_len), np.int32)
    content = np.zeros((len(texts), max_len), bool)
    if not len(texts):
        return ids, content
    enc = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=max_len - 2,
        return_offsets_mapping=True,
    )
    for i, (text, ws, ts) in enumerate(zip(texts, words, tags)):
        char_content = np.zeros(len(text) + 1, bool)
        cursor = 0
        for w, t in zip(ws, ts):
            j = text.find(w, cursor)
            if j >= 0:
                char_content[j : j + len(w)] = t in CONTENT_TAGS
                cursor = j + len(w)
        toks = enc["input_ids"][i][: max_len - 2]
        starts = [min(s, len(text)) for s, _ in enc["offset_mapping"][i][: max_len - 2]]
        ids[i, : len(toks) + 2] = [sot, *toks, eot]
        content[i, 1 : len(toks) + 1] = char_content[starts]
    return ids, content


def mask_tokens(ids, content, seed, *, mask_id: int, content_rate: float = 0.3, other_rate: float = 0.05):
    """SEN's BERT-style masking of one caption, in TensorFlow with a stateless seed.

    ids: int32 (L,); content: bool (L,); seed: int32/int64 (2,). Returns (masked ids, labels), labels 0 where
    not a target. Regular tokens are those with 0 < id < mask_id (not padding, not SOT/EOT).
    """
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 3)
    length = tf.shape(ids)[0]
    u = tf.random.stateless_uniform([length], s[0])
    v = tf.random.stateless_uniform([length], s[1])
    rnd = tf.random.stateless_uniform([length], s[2], minval=1, maxval=mask_id, dtype=tf.int32)
    regular = (ids > 0) & (ids < mask_id)
    rate = tf.where(content, content_rate, other_rate)
    chosen = regular & (u < rate)
    # Within the chosen: 80% mask, 10% random, 10% kept (SEN rescales the same uniform; a second one is
    # equivalent in distribution).
    new = tf.where(v < 0.8, mask_id, tf.where(v < 0.9, rnd, ids))
    masked = tf.where(chosen, new, ids)
    labels = tf.where(chosen, ids, 0)
    # At least one target: position 1 (the first word), if it is a regular token.
    none = tf.logical_not(tf.reduce_any(chosen))
    first = tf.one_hot(1, length, on_value=True, off_value=False) & regular & none
    masked = tf.where(first, mask_id, masked)
    labels = tf.where(first, ids, labels)
    return masked, labels
