"""Default data configs for each dataset; the configs/*.py files start from these and override fields."""

from __future__ import annotations

import os

# The one registry of datasets: config name -> the official folder name under $UIT_DATA_ROOT. The tfds builders
# (uit_jax/data/builders.py) register against it; the trainer checks config.data.name against it.
DATASETS = {"synthetic": "synthetic_pedes", "cuhk": "CUHK-PEDES", "icfg": "ICFG-PEDES", "rstp": "RSTPReid"}


def data_root() -> str:
    """$UIT_DATA_ROOT, read when a config is built (not at import), defaulting to ~/uit_data."""
    return os.environ.get("UIT_DATA_ROOT") or os.path.join(os.path.expanduser("~"), "uit_data")


def data_config(name: str):
    """The data config group for `name`, one of DATASETS (an ml_collections.ConfigDict)."""
    import ml_collections  # noqa: PLC0415 - here, so that the registry imports on accelerator images without it

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    c = ml_collections.ConfigDict()
    # Which dataset: one of DATASETS; picks its tfds builder.
    c.name = name
    # The official folder (imgs/ + annotation json). Synthetic: the parent of the generated sets, each written to
    # manual_dir/<sizes and seed> (prepare.synthetic_dir). Default $UIT_DATA_ROOT/<folder>, UIT_DATA_ROOT defaulting
    # to ~/uit_data.
    c.manual_dir = os.path.join(data_root(), DATASETS[name])
    # Where tfds keeps the built dataset; None = tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    c.data_dir = ml_collections.config_dict.placeholder(str)
    # (height, width) every image is resized to. Real sets: the reference's 384x128.
    c.image_size = (384, 128)
    # Caption length in tokens, start/end-of-text included (CLIP's 77).
    c.text_len = 77
    # Training sampler: 'identity' = the reference's RandomIdnumSampler (per epoch each identity is split into
    # chunks of 1..pairs_per_id pairs; each round draws global_batch // pairs_per_id distinct identities and takes
    # one chunk of each; data/samplers.py); 'random' = a fresh permutation of all pairs each epoch.
    c.sampler = "identity"
    # Largest number of image-caption pairs of one identity that are kept together ('identity').
    c.pairs_per_id = 2
    # Random horizontal flip (p 0.5).
    c.flip = True
    # Zero padding before the random crop back to image_size (the reference's Pad(10) + RandomCrop); 0 = off.
    c.crop_pad = 10
    # Probability of random erasing (area 0.02-0.4 of the image, aspect 0.3-3.3); 0 = off.
    c.erasing_prob = 0.5
    # Erased pixels: 'mean' = the CLIP mean pixel; 'reference' = torchvision's value=mean written into the
    # normalised tensor as IRRA/SEN do (see uit_jax/data/augment.py).
    c.erasing_fill = "mean"
    # Probability that a training caption is cut to its nouns, adjectives, pronouns (SEN's key-word filter).
    c.keyword_prob = 0.2
    # The POS tagger behind the key-word filter, used once when the dataset is built: '' = the dataset's own
    # (NLTK's perceptron tagger for the real sets, the generator's lexicon for the synthetic one), 'nltk', or a
    # word->tag file ('word<TAB>tag' lines or a JSON object; uit_jax/data/text.file_tagger), e.g. for another
    # language. A dataset already built keeps its tags: delete its tfds folder to re-tag.
    c.tagger = ""
    # SEN's BERT-style masking of every training caption (30% of nouns/adjectives, 5% of other tokens;
    # 80% mask id, 10% random, 10% kept). SEN does it through a side effect; on here to reproduce its numbers.
    c.mlm_masking = True
    # Also emit mlm_text / mlm_labels (labels 0 = not a target) for an MLM head.
    c.mlm_outputs = False
    # The data order and augmentations follow config.seed (there is no shuffle buffer: the samplers draw
    # whole-epoch permutations in memory, an exact shuffle).
    # The split that selects the model (validation, never test), and the split reported at the end.
    c.val_split = "val"
    c.test_split = "test"
    if name == "synthetic":
        c.image_size = (128, 64)  # small for CPU runs; the set is rendered at this size
        s = ml_collections.ConfigDict()
        s.train_ids = 1000  # identities per split; a few hundred in val/test keep R1 stable to ~2 points
        s.val_ids = 300
        s.test_ids = 300
        s.images_per_id = 4  # each with two captions
        s.height = 128  # native render size
        s.width = 64
        s.seed = 0  # generation seed (everything in the set is a function of it)
        # 'crop': detector-style crops (person centred, low-saturation street, mild lighting), learnable from
        # scratch in minutes; 'street': the person anywhere in a colourful street, much harder.
        s.scene = "crop"
        c.synthetic = s
    return c
