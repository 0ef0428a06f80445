"""Pre-trains the small CLIP that the synthetic default fine-tunes, and saves it in Hugging Face format.

CLIP itself is pre-trained contrastively on web image/alt-text pairs, then UIT fine-tunes it on pedestrian data.
The embedded default mirrors that: this tool trains the `mini` CLIP with CLIP's own objective (symmetric InfoNCE,
learnable temperature) on a synthetic corpus that shares nothing with the default dataset but the attribute
vocabulary: its identities come from another seed, its images are the harder `street` scenes placed on a square
canvas (CLIP is pre-trained on square images, so fine-tuning at 128x64 resizes the position embeddings exactly as
it does for OpenAI's weights), and its captions are generic alt-text-style lists of some of the attributes
("a woman, long brown hair, a red coat, black boots") instead of the annotator-style sentences of the dataset.

`--mlm W` adds IRRA's masked-word objective (caption words hidden, predicted by a head whose masked tokens
cross-attend to the image's tokens; the head is not saved). The shipped model is stage 1 (ITC) continued by eight
stages with `--mlm 1`, each on new identities (the commands below; docs/results.md has the figures).

The result is written as a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer files), which
`uit_jax.models.convert.load` and transformers' `CLIPModel.from_pretrained` both read, plus `pretrain.json`
(command, seed, corpus, curve) and, with --eval_data_root, the zero-shot figures on the synthetic test split.

    python experiments/pretrain_clip.py --out /tmp/stage1 --ids 40000 --steps 3000 --warmup 100
    python experiments/pretrain_clip.py --out /tmp/stage2 --init /tmp/stage1 --corpus_seed 2 \
        --ids 10000 --steps 1000 --lr 3e-4 --warmup 30 --mlm 1
    python experiments/pretrain_clip.py --out /tmp/stage3 --init /tmp/stage2 --corpus_seed 3 ...   # the same flags
    python experiments/pretrain_clip.py --out /tmp/stage4 --init /tmp/stage3 --corpus_seed 4 ...   # and 5-8 likewise
    python experiments/pretrain_clip.py --out uit_jax/assets/clip-mini-synthetic --init /tmp/stage8 --corpus_seed 9 \
        --ids 10000 --steps 1000 --lr 3e-4 --warmup 30 --mlm 1 \
        --eval_data_root ~/uit_data/synthetic_pedes/t1000_v300_e300_i4_128x64_s0_crop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uit_jax import losses, metrics  # noqa: E402
from uit_jax.data import augment  # noqa: E402
from uit_jax.data import synthetic as synth  # noqa: E402
from uit_jax.data import text as text_lib  # noqa: E402
from uit_jax.data import tokenizer as tok_lib  # noqa: E402
from uit_jax.models import clip as clip_lib  # noqa: E402
from uit_jax.models import convert  # noqa: E402
from uit_jax.models import uit as uit_lib  # noqa: E402
from uit_jax.retrieval import Retriever  # noqa: E402


# --------------------------------------------------------------------------------------------- the corpus
# What each part of a generic caption names (the subject always names the gender).
def generic_caption(ident: synth.Identity, rng: np.random.Generator, name_prob: float = 0.7) -> str:
    """An alt-text-style caption: the subject, then a random subset of the attributes in random order.

    Words are drawn from the same synonym lists as the dataset's annotators use ("a lady", "a jumper"): web
    alt-text, on which CLIP is trained, uses all of them, and a word the pre-training never saw starts fine-tuning
    from a random embedding.
    """
    plural = synth.PLURAL_NOUNS
    syn = lambda k: str(rng.choice(synth.NOUN_SYNONYMS[k]))
    parts = [
        f"{ident.hair} {ident.hair_color} hair",
        f"{ident.upper_color} {ident.pattern if ident.pattern != 'plain' else ''} {syn(ident.upper)}".replace(
            "  ", " "
        ),
        f"{ident.lower_color} {syn(ident.lower)}",
        f"{ident.shoe_color} {syn(ident.shoes)}",
    ]
    if ident.bag != "none":
        parts.append(f"{ident.bag_color} {syn(ident.bag)}")
    if ident.headwear != "none":
        parts.append(f"{ident.head_color} {syn(ident.headwear)}")
    picked = [k for k in range(len(parts)) if rng.uniform() < name_prob] or [int(rng.integers(len(parts)))]
    keep = [parts[k] for k in picked]
    keep = [keep[i] for i in rng.permutation(len(keep))]
    keep = [p if p.split()[-1] in plural or p.endswith("hair") else f"{synth.article(p)} {p}" for p in keep]
    who = syn(ident.gender)
    return f"{synth.article(who)} {who}, " + ", ".join(keep)


def square_view(ident: synth.Identity, rng: np.random.Generator, size: int) -> np.ndarray:
    """A `street` render (128x64) on a square street canvas, at a random horizontal place; uint8 (size, size, 3)."""
    h, w = synth.CANON_H, synth.CANON_W
    person = synth.render_image(ident, rng, h, w, scene="street")
    canvas = np.empty((h, h, 3), np.uint8)
    horizon = int(rng.integers(70, 100))  # sky/buildings above, ground below, in the render's own colours
    canvas[:horizon] = person[:4].reshape(-1, 3).mean(0).astype(np.uint8)
    canvas[horizon:] = person[-4:].reshape(-1, 3).mean(0).astype(np.uint8)
    x = int(rng.integers(0, h - w + 1))
    canvas[:, x : x + w] = person
    if size != h:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR))
    return canvas


def make_corpus(
    num_ids: int, views: int, captions: int, size: int, seed: int, tokenizer, text_len: int, name_prob: float = 0.7
):
    """(images uint8 (N, S, S, 3), ids (N, captions, L) int32): `views` images per identity of seed `seed`; image n
    shows identity n // views."""
    images = np.empty((num_ids * views, size, size, 3), np.uint8)  # filled in place: 40,000 ids x 2 views is 3.9 GB
    texts = np.empty((num_ids * views, captions, text_len), np.int32)
    for i in range(num_ids):
        ident = corpus_identity(seed, i)
        rng = np.random.default_rng([seed, i, 1])
        for v in range(views):
            images[i * views + v] = square_view(ident, rng, size)
            caps = [generic_caption(ident, rng, name_prob) for _ in range(captions)]
            texts[i * views + v] = tok_lib.tokenize(tokenizer, caps, text_len)
    return images, texts


def corpus_identity(seed: int, i: int) -> synth.Identity:
    return synth.sample_identity(np.random.default_rng([seed, i]))


# --------------------------------------------------------------------------------------------- training
def maskable_ids(tokenizer) -> np.ndarray:
    """(V,) bool: the tokens `mlm_mask` may hide: every word of a caption but the articles; never the comma,
    padding, start/end-of-text or the mask token itself."""
    words = tokenizer(["a an ,"], add_special_tokens=False)["input_ids"][0]
    out = np.zeros(len(tokenizer), bool)
    out[1 : text_lib.mask_token_id(tokenizer)] = True
    out[words] = False
    return out


def mlm_mask(ids: np.ndarray, rng: np.random.Generator, rate: float, maskable: np.ndarray, mask_id: int):
    """(masked ids, labels) for the masked-word objective: each maskable token of `ids` (B, L) is replaced by
    `mask_id` with probability `rate` and becomes a target (labels 0 elsewhere); a caption that drew none gets one,
    at a random maskable position. In a generic caption most words are attribute values ("a lady, long [MASK]
    hair, black boots"), so predicting them from the image makes the image tower read hair and shoe colours that a
    contrastive batch rarely needs."""
    can = maskable[ids]
    chosen = can & (rng.uniform(size=ids.shape) < rate)
    for i in np.flatnonzero(~chosen.any(1) & can.any(1)):
        chosen[i, rng.choice(np.flatnonzero(can[i]))] = True
    return np.where(chosen, mask_id, ids).astype(np.int32), np.where(chosen, ids, 0).astype(np.int32)


def make_step(model, tx, head=None, mlm_weight: float = 0.0):
    """The jitted update. Without `head`, `params` are the CLIP's and the loss is ITC. With an
    MLM head (`uit_jax.models.uit.MLMHead`), `params` is {"clip", "mlm"} and the loss adds `mlm_weight` x the
    masked-word cross-entropy: the masked caption's tokens cross-attend to the image's tokens (IRRA's objective)."""

    def loss_fn(params, images, ids, mlm_ids, mlm_labels):
        clip_params = params["clip"] if head is not None else params
        img = model.apply({"params": clip_params}, images, method=model.encode_image)
        z_txt = model.apply({"params": clip_params}, ids, method=model.encode_text)["embed"]
        scale = jnp.exp(jnp.clip(clip_params["logit_scale"], 0.0, np.log(100.0)))  # CLIP clips at 100
        itc = losses.itc(img["embed"], z_txt, scale)
        if head is None:
            return itc, dict(itc=itc)
        masked = model.apply({"params": clip_params}, mlm_ids, method=model.encode_text)["tokens"]
        logits = head.apply({"params": params["mlm"]}, masked, img["tokens"])
        mlm = losses.mlm(logits, mlm_labels)
        hit = (jnp.argmax(logits, -1) == mlm_labels) & (mlm_labels > 0)
        acc = jnp.sum(hit) / jnp.maximum(jnp.sum(mlm_labels > 0), 1)
        return itc + mlm_weight * mlm, dict(itc=itc, mlm=mlm, mlm_acc=acc)

    @jax.jit
    def step(params, opt_state, images, ids, mlm_ids=None, mlm_labels=None):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, ids, mlm_ids, mlm_labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    return step


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flips, then CLIP normalisation; float32 (B, S, S, 3)."""
    flip = rng.uniform(size=len(images)) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return ((images.astype(np.float32) / 255.0 - np.float32(augment.CLIP_MEAN)) / np.float32(augment.CLIP_STD)).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------- zero-shot eval
def _retriever(model, params, tokenizer, size) -> Retriever:
    """The search API's encoders for a freshly trained or loaded model (CLIP's pixel normalisation)."""
    return Retriever(model, params, tokenizer, image_size=size, mean=augment.CLIP_MEAN, std=augment.CLIP_STD)


def _rounded(out: dict) -> dict:
    return {k: round(float(v), 2) for k, v in out.items()}


def zero_shot(model_dir: str, data_root: str, split: str = "test", image_size=(128, 64)) -> dict:
    """R1/R5/R10/mAP/mINP of the saved model on `split` of a synthetic set folder (CUHK-PEDES layout)."""
    with open(os.path.join(data_root, "reid_raw.json")) as f:
        annos = [a for a in json.load(f) if a["split"] == split]
    model, params = convert.load(model_dir, image_size=image_size)
    tokenizer = tok_lib.load_tokenizer(model_dir)
    images = np.stack(
        [np.asarray(Image.open(os.path.join(data_root, "imgs", a["file_path"])).convert("RGB")) for a in annos]
    )
    captions = [c for a in annos for c in a["captions"]]
    q_pid = np.array([a["id"] for a in annos for _ in a["captions"]])
    r = _retriever(model, params, tokenizer, image_size)
    z_img, z_txt = r.encode_pixels(images, batch_size=256), r.encode_text(captions)
    return _rounded(metrics.retrieval_metrics(z_txt @ z_img.T, q_pid, np.array([a["id"] for a in annos])))


# Identities no pre-training corpus uses: the stages use corpus seeds 1, 2, 3, ... (the dataset draws its own, seed 0).
# It was 7 until stage 7 trained on seed 7; `corpus_gap` refuses a model any of whose stages used it.
UNSEEN_SEED = 1000


def _stage_seeds(record: dict) -> list:
    """The corpus seeds of a pretrain.json record and of every stage it continued (nested `init_record`s)."""
    seeds = []
    while record:
        seeds.append(record["args"]["corpus_seed"])
        record = record.get("init_record")
    return seeds


def corpus_gap(model_dir: str, ids: int) -> dict:
    """Memorisation check: retrieval on the first `ids` identities of the model's own corpus (its pretrain.json's
    corpus seed and shapes: the very images and captions it trained on) against as many identities it never saw
    (seed UNSEEN_SEED); every view of each, its first caption.

    A model that memorises its corpus scores much higher on the seen ones: the first shipped model (6,000
    identities) scored R1 41.6 seen against 26.1 unseen at 600 identities."""
    with open(os.path.join(model_dir, "pretrain.json")) as f:
        record = json.load(f)
    args = record["args"]
    if UNSEEN_SEED in _stage_seeds(record):
        raise SystemExit(
            f"{model_dir}/pretrain.json: a stage of this model trained on corpus seed {UNSEEN_SEED}, the seed the "
            "memorisation check uses as unseen; change UNSEEN_SEED in experiments/pretrain_clip.py to a seed no stage "
            "used."
        )
    model, params = convert.load(model_dir, image_size=(args["size"], args["size"]))
    tokenizer = tok_lib.load_tokenizer(model_dir)
    r = _retriever(model, params, tokenizer, (args["size"], args["size"]))
    out = {}
    for name, s in (("seen", args["corpus_seed"]), ("unseen", UNSEEN_SEED)):
        images, texts = make_corpus(
            ids, args["views"], args["captions"], args["size"], s, tokenizer, args["text_len"],
            args.get("name_prob", 0.7),
        )  # fmt: skip
        z_img, z_txt = r.encode_pixels(images, batch_size=256), r.encode_token_ids(texts[:, 0])
        pid = np.arange(len(images)) // args["views"]
        out[name] = dict(_rounded(metrics.retrieval_metrics(z_txt @ z_img.T, pid, pid)), seed=s, ids=ids)
    return out


# --------------------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (Hugging Face CLIP layout)")
    p.add_argument("--preset", default="mini", help="CLIP size (uit_jax.models.clip.PRESETS)")
    p.add_argument(
        "--size",
        type=int,
        default=128,
        help="square pre-training image size (128: the person at its fine-tuning scale)",
    )
    p.add_argument("--text_len", type=int, default=56, help="text positions (the synthetic default's data.text_len)")
    p.add_argument(
        "--ids", type=int, default=40000,
        help="identities in the corpus (6,000 were memorised; 40,000 x 2 views: 3.9 GB)",
    )  # fmt: skip
    p.add_argument("--views", type=int, default=2, help="images per identity")
    p.add_argument("--captions", type=int, default=2, help="generic captions per image (one drawn per step)")
    p.add_argument("--corpus_seed", type=int, default=1, help="identity seed (the default dataset uses 0)")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    p.add_argument(
        "--name_prob", type=float, default=0.7, help="chance that a caption names each attribute (the shipped: 0.7)"
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument(
        "--mlm", type=float, default=0.0,
        help="weight of a masked-word objective (IRRA's MLM: masked caption words predicted from the image); 0: off",
    )  # fmt: skip
    p.add_argument("--mlm_rate", type=float, default=0.3, help="chance that --mlm hides each word (not articles)")
    p.add_argument("--mlm_layers", type=int, default=2, help="transformer layers of the MLM head (dropped at save)")
    p.add_argument("--init", default="", help="start from this Hugging Face CLIP folder instead of a random init")
    p.add_argument("--eval_data_root", default="", help="a synthetic set folder: report zero-shot test figures")
    p.add_argument(
        "--gap_ids", type=int, default=0,
        help="also report retrieval on this many identities of the corpus against as many unseen ones (memorisation)",
    )  # fmt: skip
    p.add_argument("--eval_only", action="store_true", help="only add the evaluations to OUT/pretrain.json")
    return p.parse_args(argv)


def _initial_params(a, model):
    """The CLIP's parameters: loaded from --init (its position grid resized to the square size), or a random init
    with CLIP's initial temperature 0.07."""
    if a.init:
        _, params = convert.load(a.init, image_size=(a.size, a.size))
        return jax.tree.map(jnp.asarray, params)
    dummy = (jnp.zeros((1, a.size, a.size, 3)), jnp.zeros((1, a.text_len), jnp.int32))
    params = jax.jit(model.init)(jax.random.key(a.seed), *dummy)["params"]
    return dict(params, logit_scale=jnp.asarray(np.log(1 / 0.07), jnp.float32))


def _mlm_head(a, config):
    """IRRA's MLM head (`uit_lib.MLMHead`) for --mlm, and its initial parameters."""
    head = uit_lib.MLMHead(
        vocab_size=config.vocab_size, width=config.embed_dim, heads=max(1, config.embed_dim // 64), layers=a.mlm_layers
    )
    n_tok = 1 + config.grid[0] * config.grid[1]
    dummy = (jnp.zeros((1, a.text_len, config.embed_dim)), jnp.zeros((1, n_tok, config.embed_dim)))
    return head, jax.jit(head.init)(jax.random.key(a.seed + 1), *dummy)["params"]


def _log_row(a, step: int, clip_params, parts: dict, t_train: float) -> dict:
    """Prints one progress line and returns the curve's row (`loss` is the ITC; `mlm`, `mlm_acc` with --mlm)."""
    rate = step * a.batch / (time.time() - t_train)
    scale = float(jnp.exp(clip_params["logit_scale"]))
    row = dict(step=step, loss=round(float(parts["itc"]), 4), logit_scale=round(scale, 2))
    row.update({k: round(float(v), 4) for k, v in parts.items() if k != "itc"})
    losses_text = " ".join(f"{k} {float(v):.3f}" for k, v in parts.items())
    print(f"step {step}/{a.steps} {losses_text} logit scale {scale:.1f} ({rate:.0f} pairs/s)")
    return row


def _write_record(a, argv, n_images: int, curve: list, t0: float) -> dict:
    """OUT/pretrain.json: the command, arguments, corpus, time and curve (and --init's own record)."""
    record = dict(
        command="python experiments/pretrain_clip.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        args=vars(a),
        corpus=dict(
            images=n_images, identities=a.ids, scene="street on a square canvas", captions="generic, with synonyms"
        ),
        minutes=round((time.time() - t0) / 60, 1),
        curve=curve,
    )
    if a.init:  # a continued model records the stage it started from, so its whole recipe can be rebuilt
        parent = os.path.join(a.init, "pretrain.json")
        record["init_record"] = None
        if os.path.isfile(parent):
            with open(parent) as f:
                record["init_record"] = json.load(f)
    with open(os.path.join(a.out, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"saved {a.out} in {record['minutes']} min")
    return record


def main(argv=None) -> dict:
    a = parse(argv)
    if a.eval_only:
        return add_evaluations(a.out, a.eval_data_root, a.gap_ids)
    if a.corpus_seed == UNSEEN_SEED:
        raise SystemExit(
            f"--corpus_seed {UNSEEN_SEED} is the memorisation check's unseen seed (--gap_ids): pick another seed."
        )
    if not 0.0 <= a.name_prob <= 1.0:
        raise SystemExit(f"--name_prob {a.name_prob} is not a probability: give a value in [0, 1] (the shipped: 0.7).")
    if a.mlm < 0 or not 0.0 < a.mlm_rate <= 1.0:
        raise SystemExit(
            f"--mlm {a.mlm} must be >= 0 and --mlm_rate {a.mlm_rate} in (0, 1] (shipped stages 2-9: --mlm 1, rate 0.3)."
        )
    t0 = time.time()
    tmp_tok = a.out.rstrip("/") + ".tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok_lib.write_bpe_tokenizer(synth.VOCABULARY, tmp_tok)
    tokenizer = tok_lib.load_tokenizer(tmp_tok)
    config = clip_lib.config_from_preset(
        a.preset, vocab_size=len(tokenizer), image_size=(a.size, a.size), text_len=a.text_len,
        eot_token_id=tok_lib.eot_id(tokenizer),
    )  # fmt: skip
    images, texts = make_corpus(a.ids, a.views, a.captions, a.size, a.corpus_seed, tokenizer, a.text_len, a.name_prob)
    print(f"corpus: {len(images)} images of {a.ids} identities, {a.size}x{a.size}, in {time.time() - t0:.0f}s")

    model = clip_lib.CLIP(config)
    params = _initial_params(a, model)
    head = None
    if a.mlm > 0:  # its parameters train beside the CLIP's and are not saved
        head, head_params = _mlm_head(a, config)
        params = dict(clip=params, mlm=head_params)
        maskable, mask_id = maskable_ids(tokenizer), text_lib.mask_token_id(tokenizer)
        mrng = np.random.default_rng([a.seed, 7])  # its own stream: the batches stay those of a run without --mlm
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, a.steps, end_value=a.lr * 0.01)
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), params
    )
    tx = optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-6, weight_decay=a.weight_decay, mask=decay_mask)
    opt_state = tx.init(params)
    step = make_step(model, tx, head, a.mlm)
    rng = np.random.default_rng(a.seed)
    curve, t_train = [], time.time()
    for i in range(a.steps):
        idx = rng.choice(len(images), a.batch, replace=False)  # any images: two views of one person may meet
        cap = rng.integers(a.captions, size=a.batch)
        ids = texts[idx, cap]
        extra = dict(zip(("mlm_ids", "mlm_labels"), mlm_mask(ids, mrng, a.mlm_rate, maskable, mask_id))) if head else {}
        params, opt_state, parts = step(params, opt_state, augment_batch(images[idx], rng), ids, **extra)
        if (i + 1) % a.log_every == 0 or i + 1 == a.steps:
            curve.append(_log_row(a, i + 1, params["clip"] if head else params, parts, t_train))
    params = params["clip"] if head else params
    os.makedirs(a.out, exist_ok=True)
    convert.save_hf_folder(a.out, jax.device_get(params), config, bos_token_id=tok_lib.sot_id(tokenizer))
    tokenizer.save_pretrained(a.out)
    shutil.rmtree(tmp_tok, ignore_errors=True)
    record = _write_record(a, argv, len(images), curve, t0)
    if a.eval_data_root or a.gap_ids:
        return add_evaluations(a.out, a.eval_data_root, a.gap_ids)
    return record


def add_evaluations(out: str, data_root: str, gap_ids: int) -> dict:
    """Evaluates the saved model zero-shot on the synthetic test split (`data_root`) and/or on its own corpus
    against unseen identities (`gap_ids`), and records the figures in OUT/pretrain.json."""
    if not data_root and not gap_ids:
        raise SystemExit("--eval_only needs --eval_data_root (a generated synthetic set folder) and/or --gap_ids N.")
    with open(os.path.join(out, "pretrain.json")) as f:
        record = json.load(f)
    if data_root:
        root = os.path.expanduser(data_root)
        record["zero_shot_test"] = dict(zero_shot(out, root), data=os.path.basename(os.path.normpath(root)))
        print("zero-shot on the synthetic test split:", record["zero_shot_test"])
    if gap_ids:
        record["corpus_gap"] = corpus_gap(out, gap_ids)
        print("own corpus (seen) against unseen identities:", record["corpus_gap"])
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
