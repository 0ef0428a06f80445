"""Image augmentations of the training pipeline: per-row random parameters, batched pixel work (TensorFlow).

They follow the reference transform (IRRA/SEN `build_transforms(aug=True)`): Resize((H, W)) on a PIL image,
RandomHorizontalFlip(0.5), Pad(10), RandomCrop((H, W)), ToTensor, Normalize(CLIP mean, std),
RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=mean).

Split for speed on few CPU cores: per row, `decode_resize` (to uint8, as PIL's resize gives) and
`draw_params` (a handful of scalars from a stateless seed); per batch, `flip_pad_crop` (two gathers on
uint8) and `normalize_erase` (one float pass). Parameters depend only on the row's seed, so a row's
augmentation depends only on (run seed, row position in the stream), whatever the batching.

On erasing's fill value: torchvision writes `value=mean` into the already normalised tensor, so the
reference's patch is pixel mean + mean * std (a light gray), not the mean colour. `fill='mean'` (our
default) fills with the CLIP mean pixel (0 after normalisation), which is the reference's evident intent;
`fill='reference'` reproduces torchvision's value exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

from uit_jax.models import layers

CLIP_MEAN, CLIP_STD = layers.CLIP_MEAN, layers.CLIP_STD
ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)


def decode_resize(encoded, image_size) -> tf.Tensor:
    """Encoded JPEG/PNG -> uint8 (H, W, 3), bilinear; antialiased only when shrinking, like PIL's resize."""
    img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(img)
    shrink = (shape[0] > image_size[0]) | (shape[1] > image_size[1])
    x = tf.cast(img, tf.float32)
    # Antialiasing costs ~3x; it changes nothing when enlarging, which is the common case for these sets.
    x = tf.cond(
        shrink,
        lambda: tf.image.resize(x, image_size, antialias=True),
        lambda: tf.image.resize(x, image_size, antialias=False),
    )
    img = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    img.set_shape((*image_size, 3))
    return img


def draw_params(seed, image_size, *, flip: bool, pad: int, erasing_prob: float) -> dict[str, tf.Tensor]:
    """One row's random parameters from a stateless seed (int (2,)).

    flip: bool; offset: int32 (2,) crop offset in the padded image, uniform in [0, 2 * pad];
    erase: int32 (4,) = (top, left, h, w) of the erased box, h = w = 0 when nothing is erased.
    """
    s = tf.random.experimental.stateless_split(seed, 3)
    out = {
        "flip": (tf.random.stateless_uniform([], s[0]) < 0.5) if flip else tf.constant(False),
        "offset": tf.random.stateless_uniform([2], s[1], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        if pad > 0
        else tf.zeros([2], tf.int32),
        "erase": erasing_box(s[2], *image_size, prob=erasing_prob),
    }
    return out


def erasing_box(
    seed, height: int, width: int, prob: float = 0.5, scale=ERASE_SCALE, ratio=ERASE_RATIO, attempts: int = 10
) -> tf.Tensor:
    """torchvision RandomErasing's box, int32 (top, left, h, w): up to 10 tries for a box that fits inside;
    h = w = 0 when not applied (probability 1 - prob) or when no try fits."""
    s = tf.random.experimental.stateless_split(seed, 5)
    apply = tf.random.stateless_uniform([], s[0]) < prob
    area = height * width * tf.random.stateless_uniform([attempts], s[1], scale[0], scale[1])
    r = tf.exp(tf.random.stateless_uniform([attempts], s[2], math.log(ratio[0]), math.log(ratio[1])))
    hs = tf.cast(tf.round(tf.sqrt(area * r)), tf.int32)
    ws = tf.cast(tf.round(tf.sqrt(area / r)), tf.int32)
    fits = (hs < height) & (ws < width)
    k = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first try that fits
    apply = apply & tf.reduce_any(fits)
    h, w = hs[k], ws[k]
    u = tf.random.stateless_uniform([2], s[3])
    # top uniform in [0, H - h], left in [0, W - w], inclusive, as torchvision
    top = tf.minimum(tf.cast(u[0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
    left = tf.minimum(tf.cast(u[1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
    return tf.where(apply, tf.stack([top, left, h, w]), tf.zeros([4], tf.int32))


def flip_pad_crop(images, flip, offset, pad: int):
    """Batched RandomHorizontalFlip then Pad(pad) (zeros) then crop at `offset` back to (H, W).

    images uint8 (B, H, W, 3); flip bool (B,); offset int32 (B, 2). Output pixel (y, x) is the flipped
    image's pixel (y + oy - pad, x + ox - pad), or 0 outside it.
    """
    h, w = images.shape[1], images.shape[2]
    rows = tf.range(h)[None, :] + offset[:, :1] - pad  # (B, H)
    cols = tf.range(w)[None, :] + offset[:, 1:] - pad  # (B, W)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    cols = tf.where(flip[:, None], w - 1 - cols, cols)
    out = tf.gather(images, tf.clip_by_value(rows, 0, h - 1), axis=1, batch_dims=1)
    out = tf.gather(out, tf.clip_by_value(cols, 0, w - 1), axis=2, batch_dims=1)
    return out * tf.cast(valid, images.dtype)[..., None]


def normalize(images):
    """uint8 or [0, 1] float images -> (x - CLIP mean) / CLIP std, float32."""
    x = tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else images
    return (x - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def normalize_erase(images, erase, fill: str = "mean"):
    """Batched Normalize then RandomErasing of the boxes erase int32 (B, 4) = (top, left, h, w)."""
    if fill == "mean":
        value = tf.zeros([3])  # the mean pixel, normalised
    elif fill == "reference":
        value = tf.constant(CLIP_MEAN)  # torchvision's value=mean in normalised space
    else:
        raise ValueError(f"erasing_fill must be 'mean' or 'reference', got {fill!r}")
    x = normalize(images)
    h, w = images.shape[1], images.shape[2]
    y = tf.range(h)[None, :]
    c = tf.range(w)[None, :]
    top, left, eh, ew = erase[:, :1], erase[:, 1:2], erase[:, 2:3], erase[:, 3:]
    inside = ((y >= top) & (y < top + eh))[:, :, None] & ((c >= left) & (c < left + ew))[:, None, :]
    return tf.where(inside[..., None], value, x)
