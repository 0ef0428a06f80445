"""The ceiling of the synthetic set: an oracle that ranks by the true attributes a caption names.

The synthetic captions are partial (annotators leave clauses out), so some captions fit several identities and no
model can rank the right one first every time. This oracle reads the attributes each test caption names (gender,
hair, each garment's colour and pattern, shoes, bag, headwear), scores every gallery image by how many of them its
identity has, and breaks ties at random; its R1/mAP/mINP (mean over a few tie-breaking draws) are the best any model
can expect from the words alone.

    python tools/caption_oracle.py --data_root ~/uit_data/synthetic_pedes/<set folder> [--split test]

`--fields upper_color,pattern,...` ranks by those attributes only: which attributes a given R1 needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uit_jax import metrics  # noqa: E402
from uit_jax.data import synthetic as synth  # noqa: E402

_GENDER = {
    w: g for g, syns in (("man", synth.NOUN_SYNONYMS["man"]), ("woman", synth.NOUN_SYNONYMS["woman"])) for w in syns
}
_GENDER.update(he="man", she="woman", his="man", her="woman")
# garment noun (first word of a synonym) -> (slot, canonical value); 'bag' alone is the shoulder bag
_NOUNS = {}
for slot, values in (("upper", synth.UPPER), ("lower", synth.LOWER), ("shoes", synth.SHOES), ("bag", synth.BAGS),
                     ("headwear", synth.HEADWEAR)):  # fmt: skip
    for v in values:
        for syn in synth.NOUN_SYNONYMS.get(v, []):
            _NOUNS[syn.split()[-1]] = (slot, v)
_COLOR_SLOT = {"upper": "upper_color", "lower": "lower_color", "shoes": "shoe_color", "bag": "bag_color",
               "headwear": "head_color"}  # fmt: skip


def caption_attributes(caption: str) -> dict[str, str]:
    """The Identity fields a generated caption states, e.g. {'gender': 'woman', 'upper': 'coat', ...}."""
    words = synth.caption_words(caption)
    out = {}
    for i, w in enumerate(words):
        if w in _GENDER and "gender" not in out:
            out["gender"] = _GENDER[w]
        if w == "hair" and i >= 2:
            out["hair"], out["hair_color"] = words[i - 2], words[i - 1]
        if w in _NOUNS and not (w == "bag" and i + 1 < len(words) and words[i + 1] != "."):
            slot, value = _NOUNS[w]
            if w == "bag" and i >= 1 and words[i - 1] == "shoulder":
                i -= 1  # 'shoulder bag': the adjectives precede 'shoulder'
            elif w == "bag" and words[i - 1] not in synth.COLORS:
                continue  # 'over her shoulder' / other uses without a colour
            out[slot] = value
            prev = words[i - 1]
            if prev in synth.PATTERNS:  # a colour alone says nothing sure about the pattern (30% omit it)
                out["pattern"], prev = prev, words[i - 2]
            if prev in synth.COLORS:
                out[_COLOR_SLOT[slot]] = prev
    return out


FIELDS = ("gender", "hair", "hair_color", "upper", "upper_color", "pattern", "lower", "lower_color", "shoes",
          "shoe_color", "bag", "bag_color", "headwear", "head_color")  # fmt: skip


def oracle_metrics(
    annos: list[dict], identities: dict[int, synth.Identity], draws: int = 5, fields=FIELDS
) -> dict[str, float]:
    """Metrics of ranking by the number of named attributes (among `fields`) each gallery identity has."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"Unknown attribute field(s) {unknown}; known: {', '.join(FIELDS)}.")
    gallery = annos  # one gallery image per annotation entry, as the dataset's test split
    g_pid = np.array([a["id"] for a in gallery])
    g_attr = [identities[p] for p in g_pid]
    queries = [(c, a["id"]) for a in annos for c in a["captions"]]
    q_pid = np.array([p for _, p in queries])
    score = np.zeros((len(queries), len(gallery)), np.float32)
    for qi, (cap, _) in enumerate(queries):
        for field, value in caption_attributes(cap).items():
            if field not in fields:
                continue
            score[qi] += np.array([getattr(ident, field) == value for ident in g_attr], np.float32)
    rng = np.random.default_rng(0)
    runs = [metrics.retrieval_metrics(score + rng.uniform(0, 1e-3, score.shape), q_pid, g_pid) for _ in range(draws)]
    return {k: round(float(np.mean([r[k] for r in runs])), 2) for k in runs[0]}


def read_split(data_root: str, split: str) -> tuple[dict[int, synth.Identity], list[dict]]:
    """(identity by annotation id, the split's annotation entries) of a generated synthetic set folder."""
    root = os.path.expanduser(data_root)
    spec = synth.read_spec(root)
    if spec is None:
        raise SystemExit(f"{root} holds no {synth.SPEC_FILE}: not a synthetic set written by uit_jax.")
    identities = {i + 1: ident for i, ident in enumerate(synth.identities(spec))}
    with open(os.path.join(root, "reid_raw.json")) as f:
        return identities, [x for x in json.load(f) if x["split"] == split]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_root", required=True, help="a generated synthetic set (holds synthetic_spec.json)")
    p.add_argument("--split", default="test")
    p.add_argument("--fields", default=",".join(FIELDS), help="rank by these attributes only (comma-separated)")
    a = p.parse_args(argv)
    identities, annos = read_split(a.data_root, a.split)
    fields = [f for f in a.fields.split(",") if f]
    try:
        out = oracle_metrics(annos, identities, fields=fields)
    except ValueError as e:
        raise SystemExit(f"--fields: {e}") from None
    print(f"oracle on {a.split} ({len(annos)} images), by {', '.join(fields)}:", out)
    return out


if __name__ == "__main__":
    main()
