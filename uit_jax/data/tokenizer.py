"""CLIP byte-level BPE tokenizer: loading, fixed-length tokenization, and writing small vocabularies.

The tokenizer itself is transformers' `CLIPTokenizerFast` (the `tokenizers` backend). We add:
  * `load_tokenizer`: from a Hugging Face id or a local folder, with an offline-friendly error;
  * `tokenize`: CLIP's fixed-length layout, `[SOT] tokens [EOT] 0 0 ...`, int32. Padding uses id 0 (as
    the OpenAI tokenizer used by IRRA / SEN does), not the pad token of transformers (end-of-text);
    over-long captions are cut so that end-of-text stays the last token, because the text tower pools there;
  * `write_bpe_tokenizer`: a deterministic CLIP-style BPE vocabulary covering a word list, for the synthetic
    dataset (a small CLIP trained from scratch) and for tests, which must not touch the network.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import transformers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
MASK = "<|mask|>"  # only in vocabularies written by write_bpe_tokenizer
EOW = "</w>"  # CLIP marks the last symbol of each word with this suffix.


def load_tokenizer(name_or_dir: str) -> transformers.CLIPTokenizerFast:
    """Loads a CLIP tokenizer from a local folder (vocab.json + merges.txt or tokenizer.json) or a hub id.

    `CLIPTokenizerFast.from_pretrained` is used on purpose: in transformers 5, `CLIPTokenizer(vocab_file=...,
    merges_file=...)` silently ignores the files and builds an empty vocabulary.
    """
    name_or_dir = os.fspath(name_or_dir)
    if os.path.isdir(name_or_dir):
        files = set(os.listdir(name_or_dir))
        if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
            raise FileNotFoundError(
                f"No CLIP tokenizer files in folder {name_or_dir!r}: looked for tokenizer.json, or "
                f"vocab.json together with merges.txt; found {sorted(files)}."
            )
    hint = (
        "Without network access, point at a local folder holding tokenizer.json or vocab.json + merges.txt "
        "(e.g. one written by save_pretrained), or set HF_HOME to a cache that already holds this model."
    )
    try:
        tok = transformers.CLIPTokenizerFast.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise OSError(
            f"Could not load the CLIP tokenizer {name_or_dir!r} (no local folder of that name, and the "
            f"Hugging Face hub could not provide it: {type(e).__name__}: {e}). {hint}"
        ) from e
    # transformers 5 returns an empty two-token tokenizer, without error, for an id it cannot resolve.
    vocab = tok.get_vocab()
    missing = [t for t in (SOT, EOT, *_bytes_to_unicode().values()) if t not in vocab]
    if missing:
        raise OSError(
            f"{name_or_dir!r} did not give a CLIP BPE vocabulary ({len(vocab)} tokens; missing e.g. "
            f"{missing[:3]}): the files were not found or are not CLIP's. {hint}"
        )
    return tok


def eot_id(tokenizer) -> int:
    """Id of `<|endoftext|>`, the token the text tower pools at (first occurrence)."""
    return int(tokenizer.convert_tokens_to_ids(EOT))


def sot_id(tokenizer) -> int:
    """Id of `<|startoftext|>`."""
    return int(tokenizer.convert_tokens_to_ids(SOT))


def tokenize(tokenizer, texts: Sequence[str], max_len: int = 77) -> np.ndarray:
    """Tokenizes captions to an int32 array (N, max_len): SOT, tokens, EOT, then 0s.

    A caption longer than `max_len - 2` tokens is truncated and its last position set to EOT, like the OpenAI
    `clip.tokenize(..., truncate=True)` used by IRRA.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of captions, got a single string; wrap it in a list.")
    if max_len < 2:
        raise ValueError(f"max_len must leave room for start and end tokens, got {max_len}.")
    sot, eot = sot_id(tokenizer), eot_id(tokenizer)
    out = np.zeros((len(texts), max_len), np.int32)
    if not len(texts):
        return out
    # Special tokens are added by hand so the layout does not depend on the tokenizer's post-processor.
    pieces = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len - 2)
    pieces = pieces["input_ids"]
    for i, ids in enumerate(pieces):
        row = [sot, *ids[: max_len - 2], eot]
        out[i, : len(row)] = row
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from bytes to printable unicode characters (so BPE never sees whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE training (each distinct word counted once) until every word is a single symbol.

    Encoding a training word replays these merges in rank order, so each given word becomes one token.
    Ties are broken by the pair itself, which makes the result independent of input order.
    """
    words = [list(w) for w in sorted(set(words))]
    counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            counts[p] = counts.get(p, 0) + 1
            where.setdefault(p, set()).add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        changed = set()
        for i in sorted(where.pop(pair, ())):
            w = words[i]
            for p in zip(w, w[1:]):
                counts[p] -= 1
                changed.add(p)
            j, new = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(w[j])
                    j += 1
            words[i] = new
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + 1
                where.setdefault(p, set()).add(i)
                changed.add(p)
        counts.pop(pair, None)
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
                where.pop(p, None)
    return merges


def write_bpe_tokenizer(words: Iterable[str], out_dir) -> str:
    """Writes a small CLIP-style BPE tokenizer whose vocabulary covers `words`; returns the folder.

    Layout follows OpenAI's vocabulary: the 256 byte symbols, the same with `</w>`, one entry per merge, then
    `<|mask|>` (the masking augmentation's id), `<|startoftext|>` and `<|endoftext|>` last. Words are
    normalised and split exactly as the CLIP tokenizer
    does (lowercase, letters / digits / punctuation runs), so every piece of every word is a single token, and
    any other text still tokenizes into byte pieces. Deterministic for a given set of words.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # The stock tokenizer's normaliser and pre-tokenizer do not depend on the vocabulary.
    splitter = transformers.CLIPTokenizerFast().backend_tokenizer
    pieces = set()
    for word in words:
        text = splitter.normalizer.normalize_str(word)
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(text):
            pieces.add((*piece[:-1], piece[-1] + EOW))
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(sorted(pieces))
    # MASK sits right before start-of-text, where the data pipeline looks for the mask id (SEN uses 49405, the
    # id before start-of-text, in OpenAI's vocabulary); here it is a token no text can produce, not a word.
    tokens = base + [c + EOW for c in base] + [a + b for a, b in merges] + [MASK, SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("duplicate BPE symbols; merges are not unique")
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    # Save through transformers too, so tokenizer.json / tokenizer_config.json (used by AutoTokenizer) exist.
    tok = transformers.CLIPTokenizerFast.from_pretrained(out_dir, model_max_length=77)
    tok.save_pretrained(out_dir)
    return out_dir
