"""Sample grids: same-sized uint8 images tiled row by row with white gutters, optionally each
with its caption (prompt, instruction, or question and answer) and the scorer's verdict written
under it.

:func:`labelled` upscales every image by the integer factor ``f = ceil(min_width / w)``
(nearest neighbour, so pixels stay sharp) and writes under it, in Pillow's default TrueType
font at ``font_size`` px, a coloured ``PASS`` (green) or ``FAIL`` (red) where a verdict is
given, then the caption wrapped at word boundaries to the tile's width (at most
``max_lines`` lines, the last ending in "..." when cut). A tile with a verdict gets a frame of
the verdict's colour. The result is readable at 100 % zoom.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS, FAIL, INK = (0, 140, 40), (200, 20, 20), (0, 0, 0)


def grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles same-sized uint8 images ``(h, w, 3)`` into one image, ``cols`` a row (default: a
    square), with white gutters of ``pad`` pixels."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("grid needs at least one image")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError(f"grid needs same-sized images; got {sorted({im.shape[:2] for im in images})}")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


@functools.lru_cache(maxsize=4)
def _font(size: int):
    return ImageFont.load_default(size=size)


def wrap(text: str, width: float, font, max_lines: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels in ``font`` (a word
    wider than a line is cut); at most ``max_lines``, the last ending in "..." if cut."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if font.getlength(trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
        while font.getlength(cur) > width and len(cur) > 1:  # one word wider than the line
            cut = len(cur)
            while cut > 1 and font.getlength(cur[:cut]) > width:
                cut -= 1
            lines.append(cur[:cut])
            cur = cur[cut:]
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def labelled(images: Sequence[np.ndarray], captions: Sequence[str], verdicts: Sequence[bool | None] | None = None,
             cols: int | None = None, min_width: int = 144, font_size: int = 12, max_lines: int = 5,
             pad: int = 6) -> np.ndarray:
    """A grid (see the module docstring) of ``images`` with ``captions`` under them and, where
    ``verdicts[i]`` is True or False, a PASS / FAIL mark. Returns uint8 ``(H, W, 3)``."""
    images = [np.asarray(im, np.uint8) for im in images]
    if not images:
        raise ValueError("labelled needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    verdicts = list(verdicts) if verdicts is not None else [None] * len(images)
    if len(verdicts) != len(images):
        raise ValueError(f"{len(images)} images but {len(verdicts)} verdicts")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError(f"labelled needs same-sized images; got {sorted({im.shape[:2] for im in images})}")
    f = max(1, math.ceil(min_width / w))
    tw, th = w * f, h * f
    font = _font(font_size)
    line_h = font_size + 3
    texts = [(["PASS" if v else "FAIL"] if v is not None else []) + wrap(c, tw, font, max_lines)
             for c, v in zip(captions, verdicts, strict=True)]
    text_h = line_h * max(len(t) for t in texts) + 4
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = tw + pad, th + text_h + pad
    canvas = Image.new("RGB", (cols * cw + pad, rows * ch + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, lines, v) in enumerate(zip(images, texts, verdicts, strict=True)):
        r, c = divmod(i, cols)
        x, y = pad + c * cw, pad + r * ch
        canvas.paste(Image.fromarray(im[..., :3]).resize((tw, th), Image.NEAREST), (x, y))
        if v is not None:
            draw.rectangle((x - 2, y - 2, x + tw + 1, y + th + 1), outline=PASS if v else FAIL, width=2)
        for k, line in enumerate(lines):
            colour = (PASS if v else FAIL) if (v is not None and k == 0) else INK
            draw.text((x, y + th + 3 + k * line_h), line, fill=colour, font=font)
    return np.asarray(canvas)


def side_by_side(a: np.ndarray, b: np.ndarray, gap: int = 2) -> np.ndarray:
    """Two same-height uint8 images joined left to right with a white gap (an edit's source
    and result as one tile)."""
    a, b = np.asarray(a, np.uint8), np.asarray(b, np.uint8)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"side_by_side needs the same height; got {a.shape} and {b.shape}")
    return np.concatenate([a[..., :3], np.full((a.shape[0], gap, 3), 255, np.uint8), b[..., :3]], axis=1)
