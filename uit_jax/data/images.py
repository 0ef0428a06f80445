"""Image loading and evaluation preprocessing in numpy/PIL (no TensorFlow): the one definition that evaluation and
search share, so an image gets the same embedding in `--mode=eval` and in `uit_jax.retrieval`.

Evaluation preprocessing, as IRRA/SEN's test transform: decode to RGB, resize to (H, W) with PIL's bilinear filter
(antialiased when shrinking; a no-op at the right size), then (x / 255 - CLIP mean) / CLIP std in float32.
Training keeps its tf.data path (`augment.decode_resize`), whose bilinear resize may round a few pixels the other way.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from uit_jax.models import layers

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class UnreadableImageError(ValueError):
    """One or more images could not be read; `.bad` lists (source, reason)."""

    def __init__(self, bad: list[tuple[str, str]]):
        self.bad = bad
        lines = "\n  ".join(f"{s}: {why}" for s, why in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(f"{len(bad)} image(s) could not be read:\n  {lines}{more}")


def describe(src) -> str:
    """A short name for an image source, for messages."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, bytes):
        return f"<{len(src)} encoded bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size[0]}x{src.size[1]} {src.mode}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    return f"<{type(src).__name__}>"


def to_rgb(src) -> np.ndarray:
    """A path, encoded bytes, a PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8
    (H, W, 3). Grey is replicated, alpha dropped (not composited), as TensorFlow's decode_image(channels=3)."""
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise ValueError(f"array images must be uint8 (0-255), got {src.dtype}; scale and cast first")
        if src.ndim == 2:
            src = src[..., None]
        if src.ndim != 3 or src.shape[-1] not in (1, 3, 4):
            raise ValueError(f"array images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {src.shape}")
        return np.ascontiguousarray(np.repeat(src, 3, -1) if src.shape[-1] == 1 else src[..., :3])
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    if isinstance(src, (str, os.PathLike, io.BytesIO)):
        with Image.open(src) as im:
            im.load()  # decodes every byte: a truncated file fails here, not later
            return _pil_rgb(im)
    if isinstance(src, Image.Image):
        return _pil_rgb(src)
    raise TypeError(f"cannot read an image from {describe(src)}: pass a path, bytes, a PIL image or a uint8 array")


def _pil_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit / float greyscale: to 8 bits first
        im = im.point(lambda v: v / 256 if im.mode != "F" else v * 255).convert("L")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        return np.asarray(im)[..., :3].copy()
    return np.asarray(im.convert("RGB"))


def resize(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3): PIL bilinear (antialiased when shrinking); unchanged at the right size."""
    h, w = int(size[0]), int(size[1])
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def normalize(batch: np.ndarray, mean=layers.CLIP_MEAN, std=layers.CLIP_STD) -> np.ndarray:
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
    return (batch.astype(np.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_batch(
    sources: Sequence, size: Sequence[int], *, pool: concurrent.futures.Executor | None = None, skip_bad: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Reads and resizes `sources` (threads: PIL releases the GIL while decoding and resizing).

    Returns (uint8 (n, H, W, 3), indices of the sources that were read). Unreadable sources raise
    UnreadableImageError listing every one of them, unless skip_bad (then they are left out).
    """

    def one(src):
        try:
            return resize(to_rgb(src), size), None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt or odd files
            return None, f"{type(e).__name__}: {e}"

    results = list(pool.map(one, sources)) if pool is not None else [one(s) for s in sources]
    bad = [(describe(s), why) for s, (_, why) in zip(sources, results, strict=True) if why is not None]
    if bad and not skip_bad:
        raise UnreadableImageError(bad)
    kept = [i for i, (img, _) in enumerate(results) if img is not None]
    h, w = int(size[0]), int(size[1])
    arr = np.stack([results[i][0] for i in kept]) if kept else np.zeros((0, h, w, 3), np.uint8)
    return arr, kept


def list_images(folder: str) -> list[str]:
    """Every image file under `folder` (recursive; jpg, jpeg, png, webp, bmp; any case), sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No such folder: {folder}")
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS))
    return out
