"""Preprocessing: pixel-exact against the Hugging Face SigLIP / SigLIP2 image processors."""

import numpy as np
import pytest
import transformers
from PIL import Image

from unipic_jax.data import image as I

SIZES = [(37, 53), (64, 64), (200, 31), (9, 120), (300, 180)]


def random_images(seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.mark.parametrize("patch,max_patches", [(4, 24), (16, 256), (8, 7)])
def test_naflex_matches_the_siglip2_processor_exactly(patch, max_patches):
    images = random_images()
    hf = transformers.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_patches)
    ref = hf(images=images, return_tensors="np")
    pv, mask, shapes = I.siglip_naflex(images, patch=patch, max_patches=max_patches)
    np.testing.assert_array_equal(shapes, ref["spatial_shapes"])
    np.testing.assert_array_equal(mask, ref["pixel_attention_mask"])
    assert pv.dtype == ref["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(pv, ref["pixel_values"])


def test_fixed_matches_the_siglip_processor_exactly_and_is_nhwc():
    images = random_images(1)
    hf = transformers.SiglipImageProcessorPil(size={"height": 48, "width": 48})
    ref = hf(images=images, return_tensors="np")["pixel_values"]  # NCHW
    out = I.siglip_fixed(images, size=48)
    assert out.shape == (len(images), 48, 48, 3)
    np.testing.assert_array_equal(out, ref.transpose(0, 2, 3, 1))


def test_pil_grayscale_rgba_and_float_inputs_agree_with_the_processor():
    rs = np.random.RandomState(2)
    gray = Image.fromarray(rs.randint(0, 256, (30, 40), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rs.randint(0, 256, (25, 33, 4), dtype=np.uint8), mode="RGBA")
    floats = rs.rand(21, 17, 3).astype(np.float32)
    hf = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=32)
    for im in (gray, rgba):
        ref = hf(images=[im], do_convert_rgb=True, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(I.siglip_naflex([im], 4, 32)[0], ref)
    # float input in [0, 1]: the processor's own float path (do_rescale=False) gives the same pixels
    ref = hf(images=[floats], do_rescale=False, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(I.siglip_naflex([floats], 4, 32)[0], ref, atol=1e-6)


def test_naflex_grid_keeps_aspect_ratio_within_the_budget():
    for h, w in [(100, 100), (100, 400), (513, 17), (1, 1), (4000, 3000)]:
        gh, gw = I.naflex_grid(h, w, 16, 256)
        assert gh % 16 == 0 and gw % 16 == 0 and (gh // 16) * (gw // 16) <= 256
    assert I.naflex_grid(512, 512, 16, 256) == (256, 256)
    assert I.naflex_grid(256, 1024, 16, 256) == (128, 512)


def test_bad_images_are_clear_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(I.ImageError, match="Cannot decode image"):
        I.load_image(bad)
    with pytest.raises(I.ImageError, match="shape"):
        I.to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(I.ImageError, match=r"\[0, 1\]"):
        I.to_rgb_uint8(np.full((4, 4, 3), 7.0))
    good = tmp_path / "ok.png"
    Image.fromarray(np.full((5, 6, 3), 200, np.uint8)).save(good)
    assert I.load_image(good).shape == (5, 6, 3)
