"""Image augmentations on known inputs, against numpy references written here."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from uit_jax.data import augment

RNG = np.random.default_rng(0)


def _np_flip_pad_crop(img, flip, offset, pad):
    """The torchvision order by hand: flip, zero-pad, crop at offset."""
    x = img[:, ::-1] if flip else img
    x = np.pad(x, [(pad, pad), (pad, pad), (0, 0)])
    return x[offset[0] : offset[0] + img.shape[0], offset[1] : offset[1] + img.shape[1]]


def test_flip_is_exact():
    imgs = RNG.integers(0, 256, (3, 8, 5, 3), dtype=np.uint8)
    flip = np.array([True, False, True])
    out = augment.flip_pad_crop(tf.constant(imgs), tf.constant(flip), tf.zeros([3, 2], tf.int32) + 2, pad=2)
    np.testing.assert_array_equal(out[0], imgs[0, :, ::-1])
    np.testing.assert_array_equal(out[1], imgs[1])


@pytest.mark.parametrize("pad", [0, 3, 10])
def test_pad_crop_matches_numpy_and_stays_in_bounds(pad):
    imgs = RNG.integers(1, 256, (16, 12, 7, 3), dtype=np.uint8)  # no zeros: padding is visible
    params = [
        augment.draw_params(tf.constant([1, i], tf.int64), (12, 7), flip=True, pad=pad, erasing_prob=0.0)
        for i in range(16)
    ]
    flip = np.array([bool(p["flip"]) for p in params])
    off = np.stack([p["offset"].numpy() for p in params])
    assert off.min() >= 0 and off.max() <= 2 * pad  # the crop window lies inside the padded image
    out = augment.flip_pad_crop(tf.constant(imgs), tf.constant(flip), tf.constant(off), pad).numpy()
    assert out.shape == imgs.shape
    for i in range(16):
        np.testing.assert_array_equal(out[i], _np_flip_pad_crop(imgs[i], flip[i], off[i], pad))
    if pad:
        assert 0 < flip.mean() < 1


def test_erasing_box_area_ratio_and_rate():
    h, w, n = 384, 128, 2000
    fn = tf.function(lambda s: augment.erasing_box(s, h, w, prob=0.5))
    boxes = np.stack([fn(tf.constant([3, i], tf.int64)).numpy() for i in range(n)])
    top, left, bh, bw = boxes.T
    applied = bh > 0
    assert abs(applied.mean() - 0.5) < 0.04
    a = (bh * bw)[applied] / (h * w)
    # rounding of h and w widens the torchvision range a little
    assert a.min() > 0.02 * 0.9 and a.max() < 0.4 * 1.1
    r = (bh / np.maximum(bw, 1))[applied]
    assert r.min() > 0.3 * 0.9 and r.max() < 3.3 * 1.1
    assert (top[applied] >= 0).all() and (top + bh <= h).all() and (left >= 0).all() and (left + bw <= w).all()
    assert (boxes[~applied] == 0).all()


def test_normalize_values():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = 255
    out = augment.normalize(tf.constant(img)).numpy()
    mean, std = np.array(augment.CLIP_MEAN), np.array(augment.CLIP_STD)
    np.testing.assert_allclose(out[0, 0, 0], (1 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1], -mean / std, rtol=1e-6)


@pytest.mark.parametrize("fill,value", [("mean", np.zeros(3)), ("reference", np.array(augment.CLIP_MEAN))])
def test_normalize_erase_fills_exactly_the_box(fill, value):
    imgs = RNG.integers(0, 256, (2, 10, 6, 3), dtype=np.uint8)
    erase = np.array([[2, 1, 3, 4], [0, 0, 0, 0]], np.int32)
    out = augment.normalize_erase(tf.constant(imgs), tf.constant(erase), fill).numpy()
    ref = (imgs / 255.0 - np.array(augment.CLIP_MEAN)) / np.array(augment.CLIP_STD)
    ref[0, 2:5, 1:5] = value
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # 'mean' fill is the mean pixel: back in pixel space it is the CLIP mean colour
    if fill == "mean":
        pix = out[0, 3, 2] * np.array(augment.CLIP_STD) + np.array(augment.CLIP_MEAN)
        np.testing.assert_allclose(pix, augment.CLIP_MEAN, atol=1e-6)


def test_decode_resize_matches_pil_bilinear():
    img = RNG.integers(0, 256, (32, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    for size in [(96, 32), (16, 8)]:  # enlarging, and shrinking (antialiased like PIL)
        out = augment.decode_resize(tf.constant(buf.getvalue()), size).numpy()
        ref = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BILINEAR))
        assert out.shape == (*size, 3) and out.dtype == np.uint8
        # PIL works in fixed point; allow a few levels of rounding difference, interior pixels only
        diff = np.abs(out.astype(int) - ref.astype(int))[2:-2, 2:-2]
        assert diff.max() <= 3, (size, diff.max())
