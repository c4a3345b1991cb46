"""Labelled sample grids: tiles upscaled, captions wrapped under them, verdicts in colour."""

import numpy as np
import pytest

from unipic_jax.eval import grids


def tiles(n, h=16, w=16):
    rs = np.random.RandomState(0)
    return [rs.randint(0, 255, (h, w, 3)).astype(np.uint8) for _ in range(n)]


def is_colour(img, rgb, tol=30):
    return np.all(np.abs(img.astype(int) - np.asarray(rgb)) <= tol, axis=-1)


def test_captions_wrap_inside_the_tile():
    font = grids._font(12)
    text = "a photo of a red triangle to the left of two small blue circles and a green square"
    lines = grids.wrap(text, 100, font, max_lines=10)
    assert len(lines) > 2 and all(font.getlength(line) <= 100 for line in lines)
    assert " ".join(lines) == text  # nothing lost when it fits
    cut = grids.wrap(text, 100, font, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("...") and font.getlength(cut[-1]) <= 100
    assert all(font.getlength(x) <= 40 for x in grids.wrap("supercalifragilistic", 40, font, 9))


def test_labelled_grid_layout_text_and_verdicts():
    ims = tiles(3)
    out = grids.labelled(ims, ["a red circle", "two blue squares", "a green triangle"], [True, False, None],
                         cols=3, min_width=64)
    f = 4  # ceil(64 / 16)
    assert out.dtype == np.uint8 and out.shape[1] == 3 * (16 * f + 6) + 6
    x0, y0 = 6, 6  # the first tile: the image upscaled by nearest neighbour
    np.testing.assert_array_equal(out[y0:y0 + 16 * f:f, x0:x0 + 16 * f:f], ims[0])
    cw = 16 * f + 6
    below = [out[y0 + 16 * f + 2:, x0 + i * cw: x0 + i * cw + 16 * f] for i in range(3)]
    assert all((b.min(-1) < 80).sum() > 20 for b in below)  # every caption is written
    assert is_colour(below[0], grids.PASS).sum() > 10 and not is_colour(below[0], grids.FAIL).any()
    assert is_colour(below[1], grids.FAIL).sum() > 10 and not is_colour(below[1], grids.PASS).any()
    assert not is_colour(below[2], grids.PASS).any() and not is_colour(below[2], grids.FAIL).any()
    # frames in the verdict's colour around the first two tiles only
    assert is_colour(out[y0 - 2, x0:x0 + 16 * f], grids.PASS).all()
    assert is_colour(out[y0 - 2, x0 + cw:x0 + cw + 16 * f], grids.FAIL).all()
    assert (out[y0 - 2, x0 + 2 * cw:x0 + 2 * cw + 16 * f] == 255).all()


def test_side_by_side_and_bad_input():
    a, b = tiles(2)
    ab = grids.side_by_side(a, b)
    assert ab.shape == (16, 34, 3)
    np.testing.assert_array_equal(ab[:, :16], a)
    np.testing.assert_array_equal(ab[:, 18:], b)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        grids.labelled([a, b], ["x"])
    with pytest.raises(ValueError, match="same-sized"):
        grids.labelled([a, np.zeros((8, 8, 3), np.uint8)], ["x", "y"])
    with pytest.raises(ValueError, match="same height"):
        grids.side_by_side(a, np.zeros((8, 8, 3), np.uint8))
