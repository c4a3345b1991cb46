"""Image loading and the SigLIP / SigLIP2 preprocessing, giving the same pixels as the
Hugging Face image processors (their PIL backend) without PyTorch.

The pipeline is the processors': RGB uint8 → PIL resize (bicubic for fixed-resolution
SigLIP, bilinear for SigLIP2 NaFlex) → ``x · (1/255)`` computed in float64 then cast to
float32 → ``(x − mean) / std`` in float32. Outputs are channels-last:

* :func:`siglip_fixed` → ``(B, size, size, 3)`` float32 NHWC.
* :func:`siglip_naflex` → ``pixel_values (B, max_patches, p·p·3)`` (each patch's pixels in
  (row, col, channel) order, patches in raster order, zero padding after the last one),
  ``pixel_attention_mask (B, max_patches)`` int32 and ``spatial_shapes (B, 2)`` int32 —
  each image resized, keeping its aspect ratio, to the largest grid of whole patches that
  has at most ``max_patches`` patches.

The generator's images (VAE inputs) are :func:`vae_pixels`: centre-cropped (editing, as
the release's ``crop2square``) or padded with gray 127 (understanding, as released) to the
target aspect ratio, bicubic-resized, ``x/255·2 − 1`` in float32 NHWC; :func:`to_uint8`
maps generated pixels back.

Images may be PIL images, or HWC arrays: uint8, or floats in [0, 1] (converted to uint8
by truncating ``x · 255``, as the processors do).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class ImageError(ValueError):
    """An image that cannot be decoded or has an unusable shape."""


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to an RGB uint8 ``(H, W, 3)`` array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _pil_rgb(im)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"Cannot decode image {path}: {e}") from e


def to_rgb_uint8(image) -> np.ndarray:
    """A PIL image or an HWC / HW array → RGB uint8 ``(H, W, 3)``; transparency is
    composited onto white (as the Hugging Face processors do)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image.Image
        return _pil_rgb(image)
    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ImageError(f"Expected an HWC image with 1, 3 or 4 channels, got an array of shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ImageError("Float images must hold values in [0, 1]; pass uint8 arrays for 0-255 data.")
        x = (x * 255).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise ImageError(f"Unsupported image dtype {x.dtype}; use uint8 or floats in [0, 1].")
    if x.shape[-1] == 4:
        from PIL import Image

        x = _pil_rgb(Image.fromarray(x))
    return x


def _pil_rgb(image) -> np.ndarray:
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


def resize(image: np.ndarray, height: int, width: int, resample: str = "bilinear") -> np.ndarray:
    """PIL resize of an RGB uint8 array (antialiased, as PIL always is)."""
    from PIL import Image

    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=RESAMPLE[resample]))


def fit(image: np.ndarray, height: int, width: int, mode: str = "crop", fill: int = 127) -> np.ndarray:
    """Centre-crops (``mode="crop"``) or pads with gray ``fill`` (``"pad"``) an RGB uint8
    image to the aspect ratio ``height : width``, then resizes it (bicubic) to that size."""
    h, w = image.shape[:2]
    if mode == "crop":
        ch, cw = (h, round(h * width / height)) if w * height > h * width else (round(w * height / width), w)
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image[top:top + ch, left:left + cw]
    elif mode == "pad":
        ph, pw = (round(w * height / width), w) if w * height > h * width else (h, round(h * width / height))
        canvas = np.full((ph, pw, 3), fill, np.uint8)
        top, left = (ph - h) // 2, (pw - w) // 2
        canvas[top:top + h, left:left + w] = image
        image = canvas
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    return resize(image, height, width, "bicubic")


def vae_pixels(images, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Images → the VAE's input ``(B, height, width, 3)`` float32 in [-1, 1] (see above)."""
    return np.stack([fit(to_rgb_uint8(im), height, width, mode).astype(np.float32) / 255.0 * 2.0 - 1.0
                     for im in images])


def to_uint8(pixels) -> np.ndarray:
    """Generated pixels in [-1, 1] → uint8 (``clip(127.5·x + 128)``, truncated, as released)."""
    return np.clip(127.5 * np.asarray(pixels, np.float32) + 128.0, 0, 255).astype(np.uint8)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 → float32 ``(x/255 − mean)/std`` with the processors' rounding."""
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def siglip_fixed(images, size: int = 512, resample: str = "bicubic", mean=SIGLIP_MEAN, std=SIGLIP_STD) -> np.ndarray:
    """Fixed-resolution SigLIP: each image resized to ``size × size`` (aspect not kept)."""
    return np.stack([normalize(resize(to_rgb_uint8(im), size, size, resample), mean, std) for im in images])


def naflex_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """Target ``(height, width)``, multiples of ``patch``, for an image under a patch budget.

    Finds (by bisection on the scale, to a tolerance of 1e-5, as the SigLIP2 processor
    does) the largest scale ``s`` for which ``ceil(h·s/p) · ceil(w·s/p) ≤ max_patches``,
    each side at least one patch.
    """
    if max_patches < 1 or height < 1 or width < 1:
        raise ValueError(f"Need a positive image size and patch budget, got {height}x{width}, {max_patches}")

    def side(scale: float, n: int) -> int:
        return max(patch, math.ceil(n * scale / patch) * patch)

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def siglip_naflex(images, patch: int = 16, max_patches: int = 256, resample: str = "bilinear", mean=SIGLIP_MEAN,
                  std=SIGLIP_STD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SigLIP2 NaFlex inputs for a list of images (see the module docstring)."""
    images = list(images)
    pv = np.zeros((len(images), max_patches, patch * patch * 3), np.float32)
    mask = np.zeros((len(images), max_patches), np.int32)
    shapes = np.zeros((len(images), 2), np.int32)
    for b, im in enumerate(images):
        x = to_rgb_uint8(im)
        h, w = naflex_grid(x.shape[0], x.shape[1], patch, max_patches)
        x = normalize(resize(x, h, w, resample), mean, std)
        rows, cols = h // patch, w // patch
        patches = x.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        pv[b, : rows * cols] = patches
        mask[b, : rows * cols] = 1
        shapes[b] = (rows, cols)
    return pv, mask, shapes
