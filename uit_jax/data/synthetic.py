"""The synthetic pedestrian set: procedurally drawn people with captions, written in an official dataset layout.

It is the offline default dataset and the project's proxy benchmark, so it is a real retrieval problem:
each identity is a bundle of attributes that both the words and the pixels carry (gender and hair, upper
garment type / colour / pattern, lower garment and colour, shoes, bag, headwear). Images of one identity
differ in pose (stride), placement, scale, background, lighting and occluders (how much: `render_image`'s
`scene`); each image has two captions drawn from varied templates, synonyms and clause orders, some of them
partial, as human annotators write.
Colour words matter: the restoration objective recovers colour from a grayscale image using the caption.

Output (the official CUHK-PEDES layout by default, so the real reader is exercised; `--layout icfg|rstp` writes
ICFG-PEDES's ICFG-PEDES.json or RSTPReid's data_captions.json instead, for cross-domain tests):
    OUT/imgs/synth/<id>_<k>.png
    OUT/reid_raw.json   [{"split", "captions", "file_path", "processed_tokens", "id"}, ...]
    OUT/synthetic_spec.json   the generation parameters (to detect a stale folder)
    OUT/pos_tags.tsv   the lexicon's tags, a word->tag file for `data.tagger` (no NLTK data needed)

Everything is a pure function of the seed: identity `i` draws from `default_rng([seed, i])`.
The generator knows every word it can write, so `VOCABULARY` and `POS_TAGS` (Penn Treebank tags, as NLTK's
tagger would give in these sentences) need no NLTK data.

CLI: python -m uit_jax.data.synthetic --out DIR [--train-ids 1000 --val-ids 300 --test-ids 300
     --images-per-id 4 --height 128 --width 64 --seed 0 --scene crop --layout cuhk]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------
# Attributes: what an identity is.
# ---------------------------------------------------------------------------------------------------------
COLORS = {
    "red": (200, 30, 35),
    "blue": (35, 70, 190),
    "green": (40, 150, 60),
    "yellow": (235, 210, 40),
    "black": (25, 25, 28),
    "white": (240, 240, 236),
    "gray": (128, 128, 128),
    "purple": (120, 50, 160),
    "orange": (240, 130, 30),
    "pink": (240, 140, 180),
    "brown": (110, 70, 35),
}
HAIR_COLORS = {
    "black": (20, 18, 18),
    "brown": (95, 60, 30),
    "blonde": (220, 190, 110),
    "gray": (150, 150, 150),
}
SKIN = [(230, 190, 160), (200, 150, 115), (150, 100, 70), (95, 65, 45)]
UPPER = ["t-shirt", "shirt", "jacket", "coat", "sweater"]
PATTERNS = ["plain", "striped", "plaid"]
LOWER = ["pants", "jeans", "shorts", "skirt"]
SHOES = ["sneakers", "boots", "sandals"]
SHOE_COLORS = ["white", "black", "brown", "gray"]
BAGS = ["none", "backpack", "handbag", "shoulder bag"]
HEADWEAR = ["none", "cap", "hat", "beanie"]


@dataclasses.dataclass(frozen=True)
class Identity:
    """One person: every field is both drawn and describable."""

    gender: str  # man | woman
    hair: str  # short | long
    hair_color: str
    skin: int
    upper: str
    upper_color: str
    pattern: str
    lower: str
    lower_color: str
    shoes: str
    shoe_color: str
    bag: str
    bag_color: str
    headwear: str
    head_color: str

    def key(self) -> tuple:
        return dataclasses.astuple(self)


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draws one identity's attributes."""
    gender = str(rng.choice(["man", "woman"]))
    hair = str(rng.choice(["short", "long"], p=[0.8, 0.2] if gender == "man" else [0.25, 0.75]))
    lower_opts = LOWER if gender == "woman" else LOWER[:3]
    colors = list(COLORS)
    upper_color = str(rng.choice(colors))
    lower_color = str(rng.choice([c for c in colors if c != upper_color]))  # keep the two garments apart
    bag = str(rng.choice(BAGS, p=[0.3, 0.3, 0.2, 0.2]))
    headwear = str(rng.choice(HEADWEAR, p=[0.55, 0.2, 0.15, 0.1]))
    return Identity(
        gender=gender,
        hair=hair,
        hair_color=str(rng.choice(list(HAIR_COLORS))),
        skin=int(rng.integers(len(SKIN))),
        upper=str(rng.choice(UPPER)),
        upper_color=upper_color,
        pattern=str(rng.choice(PATTERNS, p=[0.6, 0.2, 0.2])),
        lower=str(rng.choice(lower_opts)),
        lower_color=lower_color,
        shoes=str(rng.choice(SHOES)),
        shoe_color=str(rng.choice(SHOE_COLORS)),
        bag=bag,
        bag_color=str(rng.choice(colors)),
        headwear=headwear,
        head_color=str(rng.choice(colors)),
    )


# ---------------------------------------------------------------------------------------------------------
# Drawing. Canonical frame is 128 x 64 (H x W); other sizes are resized from it.
# ---------------------------------------------------------------------------------------------------------
CANON_H, CANON_W = 128, 64


def _shade(c, f):
    return tuple(int(max(0, min(255, v * f))) for v in c)


def _pattern_fill(draw, box, color, pattern):
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=color)
    contrast = _shade(color, 0.45) if sum(color) > 300 else _shade((255, 255, 255), 0.9)
    if pattern == "striped":
        for y in range(y0 + 2, y1, 5):
            draw.line([(x0, y), (x1, y)], fill=contrast, width=2)
    elif pattern == "plaid":
        for y in range(y0 + 2, y1, 6):
            draw.line([(x0, y), (x1, y)], fill=contrast, width=1)
        for x in range(x0 + 2, x1, 6):
            draw.line([(x, y0), (x, y1)], fill=contrast, width=1)


def _draw_person(ident: Identity, stride: float) -> Image.Image:
    """The person on a transparent canonical canvas; `stride` in [0, 1] spreads the legs."""
    im = Image.new("RGBA", (CANON_W, CANON_H), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    skin = SKIN[ident.skin]
    up = COLORS[ident.upper_color]
    lo = COLORS[ident.lower_color]
    hair = HAIR_COLORS[ident.hair_color]
    half = 11 if ident.gender == "man" else 9  # narrower shoulders for women
    tx0, tx1 = 32 - half, 32 + half
    # long hair falls behind the shoulders
    if ident.hair == "long":
        d.rectangle([24, 12, 40, 36], fill=hair)
    # legs
    spread = int(round(4 * stride))
    legs = [(23 - spread, 62, 31 - spread, 112), (33 + spread, 62, 41 + spread, 112)]
    for x0, y0, x1, y1 in legs:
        d.rectangle([x0, y0, x1, y1], fill=skin)
        if ident.lower in ("pants", "jeans"):
            d.rectangle([x0, y0, x1, y1], fill=lo)
            if ident.lower == "jeans":  # seams make jeans visibly different from plain pants
                d.line([(x0 + 4, y0 + 4), (x0 + 4, y1)], fill=_shade(lo, 0.6), width=1)
        elif ident.lower == "shorts":
            d.rectangle([x0, y0, x1, 80], fill=lo)
        # shoes
        sc = COLORS[ident.shoe_color]
        if ident.shoes == "boots":
            d.rectangle([x0 - 1, 100, x1 + 1, 120], fill=sc)
        elif ident.shoes == "sandals":
            d.rectangle([x0 - 1, 116, x1 + 1, 120], fill=sc)
            d.line([(x0, 113), (x1, 113)], fill=sc, width=2)
        else:
            d.rectangle([x0 - 1, 112, x1 + 2, 120], fill=sc)
    if ident.lower == "skirt":
        d.polygon([(tx0 + 1, 60), (tx1 - 1, 60), (tx1 + 5, 88), (tx0 - 5, 88)], fill=lo)
    # arms: sleeves in the garment colour, skin below for short sleeves
    long_sleeves = ident.upper in ("jacket", "coat", "sweater", "shirt")
    for ax0, ax1 in ((tx0 - 6, tx0), (tx1, tx1 + 6)):
        d.rectangle([ax0, 25, ax1, 62], fill=skin)
        d.rectangle([ax0, 25, ax1, 60 if long_sleeves else 37], fill=up)
    # torso (coats reach the knees)
    bottom = 84 if ident.upper == "coat" else 62
    _pattern_fill(d, (tx0, 24, tx1, bottom), up, ident.pattern)
    if ident.upper in ("jacket", "coat"):  # open front
        d.line([(32, 26), (32, bottom)], fill=_shade(up, 0.5), width=2)
    if ident.upper == "shirt":  # collar
        d.polygon([(27, 24), (32, 30), (37, 24)], fill=(245, 245, 245))
    # head and hair
    d.ellipse([25, 6, 39, 22], fill=skin)
    d.chord([24, 4, 40, 20], 180, 360, fill=hair)
    # bags
    bc = COLORS[ident.bag_color]
    if ident.bag == "backpack":
        d.rectangle([tx1 + 1, 28, tx1 + 9, 56], fill=bc)
        d.line([(tx0 + 4, 24), (tx0 + 4, 50)], fill=_shade(bc, 0.7), width=2)
    elif ident.bag == "handbag":
        d.rectangle([tx1 + 2, 58, tx1 + 12, 70], fill=bc)
    elif ident.bag == "shoulder bag":
        d.line([(tx0, 25), (tx1, 58)], fill=_shade(bc, 0.8), width=2)
        d.rectangle([tx1 - 2, 52, tx1 + 8, 64], fill=bc)
    # headwear
    hc = COLORS[ident.head_color]
    if ident.headwear == "cap":
        d.chord([25, 2, 39, 16], 180, 360, fill=hc)
        d.rectangle([36, 8, 44, 10], fill=hc)
    elif ident.headwear == "hat":
        d.rectangle([21, 8, 43, 10], fill=hc)
        d.rectangle([26, 0, 38, 9], fill=hc)
    elif ident.headwear == "beanie":
        d.ellipse([24, 1, 40, 14], fill=hc)
    return im


SCENES = ("crop", "street")


def _scene_color(rng: np.random.Generator, lo: int, hi: int, saturation: float) -> tuple[int, int, int]:
    """A background colour: a gray level in [lo, hi), pulled towards a random colour by `saturation`."""
    gray = rng.integers(lo, hi)
    tint = rng.integers(lo, hi, 3)
    return tuple(int(v) for v in gray + saturation * (tint - gray))


def render_image(ident: Identity, rng: np.random.Generator, height: int, width: int, scene: str = "crop") -> np.ndarray:
    """One view of `ident`: background, pose, placement, lighting, maybe an occluder. uint8 (H, W, 3).

    scene 'crop' (the default) looks like a detector crop, as in CUHK-PEDES: the person is centred and fills
    the frame (+-3 px, scale 0.9-1), the street behind is of low saturation, lighting varies mildly and 10% of
    views have an occluder. scene 'street' is much harder: a colourful street, the person anywhere at scale
    0.82-1, strong lighting changes, 30% occluded. A small CLIP trained from scratch learns 'crop' in minutes;
    on 'street' it stays near chance for a thousand steps.
    """
    if scene not in SCENES:
        raise ValueError(f"synthetic scene {scene!r} is not one of {SCENES}.")
    street = scene == "street"
    sat = 1.0 if street else 0.15
    # Background: a two-tone street scene with a few blocks (buildings, signs).
    bg = Image.new("RGB", (CANON_W, CANON_H), _scene_color(rng, 60, 200, sat))
    d = ImageDraw.Draw(bg)
    horizon = int(rng.integers(70, 100))
    d.rectangle([0, horizon, CANON_W, CANON_H], fill=_scene_color(rng, 60, 200, sat))
    for _ in range(int(rng.integers(0, 4))):
        x, y = int(rng.integers(0, CANON_W)), int(rng.integers(0, horizon))
        d.rectangle(
            [x, y, x + int(rng.integers(4, 20)), y + int(rng.integers(4, 30))], fill=_scene_color(rng, 40, 220, sat)
        )
    person = _draw_person(ident, stride=float(rng.uniform()))
    scale = float(rng.uniform(0.82, 1.0) if street else rng.uniform(0.9, 1.0))
    pw, ph = max(1, round(CANON_W * scale)), max(1, round(CANON_H * scale))
    person = person.resize((pw, ph), Image.NEAREST)
    if street:
        ox, oy = int(rng.integers(-6, CANON_W - pw + 7)), int(rng.integers(0, CANON_H - ph + 1))
    else:
        ox = (CANON_W - pw) // 2 + int(rng.integers(-3, 4))
        oy = (CANON_H - ph) // 2 + int(rng.integers(-3, 4))
    bg.paste(person, (ox, oy), person)
    if rng.uniform() < (0.3 if street else 0.1):  # occluder: a pole or a passing object
        d = ImageDraw.Draw(bg)
        c = _scene_color(rng, 30, 220, sat)
        if rng.uniform() < 0.5:
            x = int(rng.integers(0, CANON_W - 6))
            d.rectangle([x, 0, x + int(rng.integers(3, 8)), CANON_H], fill=c)
        else:
            y = int(rng.integers(90, CANON_H - 8))
            x = int(rng.integers(-20, 40))
            d.rectangle([x, y, x + int(rng.integers(20, 40)), CANON_H], fill=c)
    if (height, width) != (CANON_H, CANON_W):
        bg = bg.resize((width, height), Image.BILINEAR)
    arr = np.asarray(bg, np.float32)
    strength = 1.0 if street else 0.4  # brightness 0.75-1.2 and a 6% tint on the street; 0.9-1.08, 2.4% in crops
    light = rng.uniform(1 - 0.25 * strength, 1 + 0.2 * strength) * (1 + rng.uniform(-0.06, 0.06, 3) * strength)
    return np.clip(arr * light + rng.normal(0, 3, arr.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Words. Every word a template can produce is in POS_TAGS. Public for the research tools (experiments/): the words
# a caption may use for each noun, the plural nouns (no article) and the article rule.
# ---------------------------------------------------------------------------------------------------------
NOUN_SYNONYMS = {
    "man": ["man", "guy", "male", "gentleman"],
    "woman": ["woman", "lady", "female", "girl"],
    "t-shirt": ["t-shirt", "tee"],
    "shirt": ["shirt", "blouse"],
    "jacket": ["jacket"],
    "coat": ["coat", "overcoat"],
    "sweater": ["sweater", "jumper"],
    "pants": ["pants", "trousers"],
    "jeans": ["jeans"],
    "shorts": ["shorts"],
    "skirt": ["skirt"],
    "sneakers": ["sneakers", "trainers"],
    "boots": ["boots"],
    "sandals": ["sandals"],
    "backpack": ["backpack", "rucksack"],
    "handbag": ["handbag", "purse"],
    "shoulder bag": ["shoulder bag", "bag"],
    "cap": ["cap"],
    "hat": ["hat"],
    "beanie": ["beanie"],
}
PLURAL_NOUNS = {"pants", "jeans", "shorts", "sneakers", "boots", "sandals", "trousers", "trainers"}
_SUBJ = {"man": ("he", "his"), "woman": ("she", "her")}

POS_TAGS: dict[str, str] = {
    # determiners, pronouns, conjunctions, prepositions
    "a": "DT",
    "an": "DT",
    "the": "DT",
    "this": "DT",
    "some": "DT",
    "no": "DT",
    "pair": "NN",
    "of": "IN",
    "he": "PRP",
    "she": "PRP",
    "his": "PRP$",
    "her": "PRP$",
    "and": "CC",
    "with": "IN",
    "on": "IN",
    "over": "IN",
    "in": "IN",
    "has": "VBZ",
    "is": "VBZ",
    "wears": "VBZ",
    "carries": "VBZ",
    "also": "RB",
    "wearing": "VBG",
    "carrying": "VBG",
    "walking": "VBG",
    "holding": "VBG",
    "seen": "VBN",
    "dressed": "VBN",
    "person": "NN",
    "pedestrian": "NN",
    "hair": "NN",
    "head": "NN",
    "shoulder": "NN",
    "back": "NN",
    "bag": "NN",
    "feet": "NNS",
    "nothing": "NN",
    "top": "NN",
    "bottom": "NN",
    "sleeves": "NNS",
    "short": "JJ",
    "long": "JJ",
    "young": "JJ",
    "dark": "JJ",
    "light": "JJ",
    "striped": "JJ",
    "plaid": "JJ",
    "plain": "JJ",
    "colored": "JJ",
    ".": ".",
    ",": ",",
}
for _syns in NOUN_SYNONYMS.values():
    for _w in _syns:
        for _part in _w.split():
            POS_TAGS.setdefault(_part, "NNS" if _part in PLURAL_NOUNS else "NN")
for _c in list(COLORS) + list(HAIR_COLORS):
    POS_TAGS[_c] = "JJ"
POS_TAGS["female"] = POS_TAGS["male"] = "NN"
VOCABULARY: list[str] = sorted(POS_TAGS)


def article(word: str) -> str:
    """'a' or 'an' before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _np_with_color(rng, color: str, noun: str, pattern: str = "plain") -> str:
    """'a red striped jacket' / 'blue jeans' / 'a pair of white sneakers'."""
    adj = color if pattern == "plain" or rng.uniform() < 0.3 else f"{color} {pattern}"
    if noun in PLURAL_NOUNS:
        return f"a pair of {adj} {noun}" if rng.uniform() < 0.3 else f"{adj} {noun}"
    return f"{article(adj)} {adj} {noun}"


def make_caption(ident: Identity, rng: np.random.Generator) -> str:
    """One annotator-style caption; some omit attributes (partial), clause order varies."""
    syn = lambda k: str(rng.choice(NOUN_SYNONYMS[k]))
    subj, poss = _SUBJ[ident.gender]
    who = syn(ident.gender)
    adj = "young " if rng.uniform() < 0.2 else ""
    hair = f"{ident.hair} {ident.hair_color} hair"
    upper = _np_with_color(rng, ident.upper_color, syn(ident.upper), ident.pattern)
    lower = _np_with_color(rng, ident.lower_color, syn(ident.lower))
    shoes = _np_with_color(rng, ident.shoe_color, syn(ident.shoes))
    clauses = []  # (kind, text) for the sentences after the opening one
    opening_kind = rng.integers(3)
    if opening_kind == 0:
        opening = f"{article(adj or who)} {adj}{who} with {hair} is wearing {upper}"
    elif opening_kind == 1:
        opening = f"the {who} has {hair} and wears {upper}"
    else:
        opening = f"this {adj}{who} is wearing {upper}"
        clauses.append(f"{subj} has {hair}")
    clauses.append(
        str(rng.choice([f"{subj} is wearing {lower}", f"{subj} also wears {lower}", f"{subj} is dressed in {lower}"]))
    )
    clauses.append(str(rng.choice([f"{subj} has {shoes} on {poss} feet", f"{subj} wears {shoes}"])))
    if ident.bag != "none":
        bag = _np_with_color(rng, ident.bag_color, syn(ident.bag))
        where = {
            "backpack": "on " + poss + " back",
            "handbag": "in " + poss + " hand",
            "shoulder bag": "over " + poss + " shoulder",
        }[ident.bag]
        clauses.append(
            str(
                rng.choice([f"{subj} is carrying {bag}", f"{subj} carries {bag} {where}"])
                if ident.bag != "handbag"
                else f"{subj} is holding {bag}"
            )
        )
    if ident.headwear != "none":
        hw = _np_with_color(rng, ident.head_color, syn(ident.headwear))
        clauses.append(f"{subj} wears {hw} on {poss} head")
    # Annotators leave things out: drop up to two of the later clauses, and shuffle the rest.
    order = rng.permutation(len(clauses))
    n_drop = int(rng.choice([0, 0, 1, 2])) if len(clauses) > 2 else 0
    kept = [clauses[i] for i in sorted(order[n_drop:])] if rng.uniform() < 0.5 else [clauses[i] for i in order[n_drop:]]
    sentences = [opening] + kept
    # Join some clauses with 'and' / commas, others as separate sentences.
    out, cur = [], sentences[0]
    for s in sentences[1:]:
        r = rng.uniform()
        if r < 0.3:
            cur = f"{cur} and {s}"
        elif r < 0.45:
            cur = f"{cur} , {s}"
        else:
            out.append(cur)
            cur = s
    out.append(cur)
    return " ".join(s[0].upper() + s[1:] + " ." for s in out).replace(" ,", ",").replace(" .", ".")


def caption_words(caption: str) -> list[str]:
    """Lower-cased words and punctuation of a generated caption (it has no other punctuation)."""
    return caption.lower().replace(",", " ,").replace(".", " .").split()


# ---------------------------------------------------------------------------------------------------------
# The folder.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """Generation parameters; the folder records them in synthetic_spec.json."""

    train_ids: int = 1000
    val_ids: int = 300
    test_ids: int = 300
    images_per_id: int = 4
    height: int = 128
    width: int = 64
    seed: int = 0
    scene: str = "crop"  # render_image's scene: 'crop' (detector-style crops) or 'street' (much harder)


SPEC_FILE = "synthetic_spec.json"


def identities(spec: Spec) -> list[Identity]:
    """Distinct identities (no two share every attribute), in order of their 1-based id."""
    seen, out = set(), []
    total = spec.train_ids + spec.val_ids + spec.test_ids
    for i in range(total):
        for attempt in range(1000):
            ident = sample_identity(np.random.default_rng([spec.seed, i, attempt]))
            if ident.key() not in seen:
                break
        else:
            raise RuntimeError(f"could not draw {total} distinct identities; lower the sizes.")
        seen.add(ident.key())
        out.append(ident)
    return out


# The official layouts the generator can write, as the readers of data/builders.py expect them: annotation file, the
# key of an entry's image path, and the splits the file holds (ICFG-PEDES has no validation split: the val
# identities become training ones there, and its reader holds out every 20th training identity itself).
LAYOUTS = {
    "cuhk": ("reid_raw.json", "file_path", ("train", "val", "test")),
    "icfg": ("ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstp": ("data_captions.json", "img_path", ("train", "val", "test")),
}
TAGS_FILE = "pos_tags.tsv"  # the lexicon as 'word<TAB>tag' lines: data.tagger for the real readers, offline


def generate(out_dir: str, spec: Spec = Spec(), verbose: bool = False, layout: str = "cuhk") -> list[dict]:
    """Renders the set into `out_dir` in an official layout (`LAYOUTS`: CUHK-PEDES by default, ICFG-PEDES or
    RSTPReid), with its POS lexicon in `TAGS_FILE`; returns the annotation list it wrote."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {sorted(LAYOUTS)}")
    ann_file, path_key, file_splits = LAYOUTS[layout]
    t0 = time.time()
    img_dir = os.path.join(out_dir, "imgs", "synth")
    os.makedirs(img_dir, exist_ok=True)
    idents = identities(spec)
    splits = ["train"] * spec.train_ids + ["val"] * spec.val_ids + ["test"] * spec.test_ids
    splits = [s if s in file_splits else "train" for s in splits]
    annos = []
    for i, (ident, split) in enumerate(zip(idents, splits)):
        pid = i + 1  # CUHK-PEDES ids start at 1
        rng = np.random.default_rng([spec.seed, pid, 7])
        for k in range(spec.images_per_id):
            rel = f"synth/{pid:05d}_{k}.png"
            Image.fromarray(render_image(ident, rng, spec.height, spec.width, spec.scene)).save(
                os.path.join(out_dir, "imgs", rel), compress_level=1
            )
            caps = [make_caption(ident, rng) for _ in range(2)]
            annos.append(
                {
                    "split": split,
                    "captions": caps,
                    path_key: rel,
                    "processed_tokens": [[w for w in caption_words(c) if w not in ",."] for c in caps],
                    "id": pid,
                }
            )
    with open(os.path.join(out_dir, ann_file), "w") as f:
        json.dump(annos, f)
    with open(os.path.join(out_dir, TAGS_FILE), "w") as f:
        f.writelines(f"{w}\t{t}\n" for w, t in sorted(POS_TAGS.items()))
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        json.dump(dataclasses.asdict(spec), f, indent=1)
    if verbose:
        print(f"wrote {len(annos)} images of {len(idents)} identities to {out_dir} in {time.time() - t0:.1f}s")
    return annos


def read_spec(out_dir: str) -> Spec | None:
    """The Spec a folder was generated with, or None if it holds no synthetic set."""
    path = os.path.join(out_dir, SPEC_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        fields = json.load(f)
    fields.setdefault("scene", "street")  # folders written before the field existed were street scenes
    return Spec(**fields)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="cuhk", help="the official layout to write")
    for f in dataclasses.fields(Spec):
        if f.name == "scene":
            p.add_argument("--scene", choices=SCENES, default=f.default)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    a = p.parse_args(argv)
    spec = Spec(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Spec)})
    generate(a.out, spec, verbose=True, layout=a.layout)


if __name__ == "__main__":
    main()
