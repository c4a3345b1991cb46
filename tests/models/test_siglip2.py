"""SigLIP (fixed) and SigLIP2 (NaFlex) vision towers against transformers, float32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import assert_same_tensors
from unipic_jax import convert, sharding
from unipic_jax.convert.hf import ConversionError
from unipic_jax.models import layers, siglip2


def perturb(model, seed, scale=0.05):
    """Random non-trivial values everywhere (biases and probe included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_naflex(path, seed=0, **kw):
    cfg = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
               num_patches=16)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = perturb(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**cfg)).eval(), seed)
    model.save_pretrained(path)
    return model


def hf_fixed(path, seed=0, **kw):
    cfg = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, patch_size=4,
               image_size=20)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg)).eval(), seed)
    model.save_pretrained(path)
    return model


def naflex_batch(shapes, max_patches, patch=4, seed=0):
    pv = np.random.RandomState(seed).randn(len(shapes), max_patches, patch * patch * 3).astype(np.float32)
    mask = np.zeros((len(shapes), max_patches), np.int32)
    for b, (h, w) in enumerate(shapes):
        mask[b, : h * w] = 1
    pv[mask == 0] = 0.0
    return pv, mask, np.asarray(shapes, np.int64)


def torch_naflex(model, pv, mask, shapes):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(mask),
                    spatial_shapes=torch.tensor(shapes))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_naflex_mixed_aspect_ratios_match_transformers(tmp_path, scan):
    hf = hf_naflex(tmp_path / "m")
    model = convert.from_hf(tmp_path / "m", progress=False, scan_layers=scan)
    assert model.config.scan_layers == scan
    assert model.config.naflex and model.config.num_patches == 16
    # a wide and a tall grid around the 4x4 table: up- and down-sampled position embeddings
    pv, mask, shapes = naflex_batch([(3, 7), (6, 2), (4, 4)], max_patches=24)
    ref_h, ref_p = torch_naflex(hf, pv, mask, shapes)
    h, pooled = model(pv, mask, shapes)
    assert h.shape == ref_h.shape and pooled.shape == ref_p.shape
    np.testing.assert_allclose(np.asarray(h), ref_h, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref_p, atol=1e-4, rtol=0)


def test_naflex_is_one_compiled_function_for_every_grid(tmp_path):
    hf_naflex(tmp_path / "m")
    model = convert.from_hf(tmp_path / "m", progress=False)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, pv, m, sh: nnx.merge(graphdef, s)(pv, m, sh)[1])
    pv, mask, _ = naflex_batch([(2, 3), (4, 5)], max_patches=20)
    a = fwd(state, pv, mask, np.array([[2, 3], [4, 5]]))
    b = fwd(state, pv, mask, np.array([[3, 2], [5, 4]]))
    assert fwd._cache_size() == 1
    assert not np.allclose(a, b)  # the grid shape changes the position embeddings


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("out,inp", [(7, 4), (3, 4), (2, 16), (16, 5), (4, 4), (1, 3)])
def test_resize_weights_equal_torch_bilinear(out, inp, antialias):
    eye = torch.eye(inp, dtype=torch.float32)[None, None]  # interpolate each basis vector
    ref = torch.nn.functional.interpolate(eye, size=(inp, out), mode="bilinear", align_corners=False,
                                          antialias=antialias)[0, 0].T.numpy()  # (out, inp)
    w = np.asarray(layers.resize_weights(out, inp, max_out=out + 2, antialias=antialias))
    np.testing.assert_allclose(w[:out], ref, atol=1e-6)
    assert (w[out:] == 0).all()


def test_fixed_resolution_siglip_matches_transformers(tmp_path):
    hf = hf_fixed(tmp_path / "m")
    model = convert.from_hf(tmp_path / "m", progress=False)
    assert not model.config.naflex and model.config.image_size == 20
    images = np.random.RandomState(3).randn(2, 20, 20, 3).astype(np.float32)  # NHWC
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    h, pooled = model(images)
    np.testing.assert_allclose(np.asarray(h), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="20x20"):
        model(images[:, :16, :16])


@pytest.mark.parametrize("make,scan", [(hf_naflex, False), (hf_fixed, False), (hf_fixed, True)])
def test_vision_round_trip_is_bit_identical(tmp_path, make, scan):
    hf = make(tmp_path / "m")
    model = convert.from_hf(tmp_path / "m", progress=False, scan_layers=scan)
    convert.to_hf(model, tmp_path / "back", progress=False)
    assert_same_tensors(tmp_path / "m", tmp_path / "back")
    back = type(hf).from_pretrained(tmp_path / "back")
    assert back.config.hidden_size == hf.config.hidden_size


def test_full_siglip2_checkpoint_loads_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=4,
              num_patches=16)
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = perturb(transformers.Siglip2Model(transformers.Siglip2Config(text_config=tc, vision_config=vc)).eval(), 1)
    full.save_pretrained(tmp_path / "full")
    model = convert.from_hf(tmp_path / "full", progress=False)  # text tower and logit scale are skipped
    pv, mask, shapes = naflex_batch([(2, 5), (4, 3)], max_patches=16)
    ref_h, ref_p = torch_naflex(full.vision_model, pv, mask, shapes)
    h, pooled = model(pv, mask, shapes)
    np.testing.assert_allclose(np.asarray(h), ref_h, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref_p, atol=1e-4, rtol=0)


def test_vision_conversion_errors_name_the_key(tmp_path):
    hf_naflex(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"layers\.2\.attn\.q_proj\.kernel \(torch key "
                                              r"encoder\.layers\.2\.self_attn\.q_proj\.weight\)"):
        convert.from_hf(tmp_path / "m", progress=False)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "patch_size": 2}))
    with pytest.raises(ConversionError, match=r"embeddings\.patch_embedding\.weight: checkpoint \(48, 48\), "
                                              r"model expects \(48, 12\)"):
        convert.from_hf(tmp_path / "m", progress=False)


@pytest.mark.parametrize("axes", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_vision_on_the_mesh_equals_single_device(tmp_path, axes):
    hf_naflex(tmp_path / "m", hidden_size=64, num_attention_heads=4, intermediate_size=128)
    single = convert.from_hf(tmp_path / "m", progress=False)
    mesh = sharding.make_mesh(axes)
    sharded = convert.from_hf(tmp_path / "m", mesh=mesh, progress=False)
    q = sharded.layers[0].attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
    pv, mask, shapes = naflex_batch([(2, 5), (4, 3), (3, 3), (1, 7)] * 2, max_patches=16)
    ref_h, ref_p = single(pv, mask, shapes)
    with jax.set_mesh(mesh):
        h, p = nnx.jit(lambda m, a, b, c: m(a, b, c))(sharded, jnp.asarray(pv), jnp.asarray(mask), jnp.asarray(shapes))
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref_p), atol=1e-5, rtol=0)


def test_presets_and_bad_inputs():
    n = siglip2.SiglipConfig.preset("so400m_patch16_512")
    abstract = nnx.eval_shape(lambda: siglip2.SiglipVision(n, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_cfg = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, patch_size=16, image_size=512)
    with torch.device("meta"):
        ref = sum(p.numel() for p in transformers.SiglipVisionModel(hf_cfg).parameters())
    assert total == ref and round(total / 1e6) == 429  # so400m vision tower with its pooling head
    model = siglip2.init(siglip2.SiglipConfig.preset("tiny"))
    with pytest.raises(ValueError, match="spatial_shapes"):
        model(np.zeros((1, 16, 48), np.float32))
    with pytest.raises(ValueError, match="square"):
        siglip2.SiglipConfig.preset("tiny", num_patches=15)
