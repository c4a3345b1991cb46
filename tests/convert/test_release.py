"""The UniPic-1 release layout: official key names, dimensions read from tensors, exact round trip."""

import numpy as np
import pytest
import torch
from flax import nnx

from unipic_jax import convert
from unipic_jax.convert.hf import ConversionError
from unipic_jax.models import unipic as U

CFG = U.UniPicConfig.preset("tiny")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    model = U.UniPic(CFG, rngs=nnx.Rngs(0))
    convert.to_unipic(model, d / "release")
    return model, d / "release"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_release_files_use_the_official_names(release):
    _, path = release
    sd, vae = load(path / "pytorch_model.bin"), load(path / "kl16.ckpt")["model"]
    W, D = CFG.mar.width, CFG.llm.hidden_size
    expect = {
        "llm.model.embed_tokens.weight": (CFG.llm.vocab_size, D),
        "llm.model.layers.0.self_attn.q_proj.weight": (D, D),
        "llm.model.layers.1.mlp.gate_proj.weight": (CFG.llm.intermediate_size, D),
        "mar.fake_latent": (1, W), "mar.mask_token": (1, 1, W),
        "mar.encoder_pos_embed_learned": (1, CFG.mar.buffer_size + CFG.mar.grid**2, W),
        "mar.encoder_blocks.1.attn.qkv.weight": (3 * W, W), "mar.decoder_blocks.0.mlp.fc2.weight": (W, 4 * W),
        "mar.diffloss.net.res_blocks.1.adaLN_modulation.1.weight": (3 * CFG.diffloss.width, CFG.diffloss.width),
        "mar.diffloss.net.final_layer.linear.weight": (2 * CFG.mar.token_dim, CFG.diffloss.width),
        "proj_in.0.weight": (D, W), "proj_out.2.weight": (W, D),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert tuple(vae["encoder.conv_in.weight"].shape) == (CFG.vae.ch, 3, 3, 3)
    assert tuple(vae["quant_conv.weight"].shape) == (2 * CFG.vae.embed_dim, 2 * CFG.vae.embed_dim, 1, 1)
    assert (path / "Qwen2.5-1.5B-Instruct" / "config.json").exists()


def test_round_trip_is_bit_identical_and_dimensions_come_from_tensors(release, tmp_path):
    model, path = release
    back = convert.from_unipic(path, config="tiny")
    assert back.config == CFG
    # head counts are what the tensors cannot tell: overrides on the preset
    other = convert.from_unipic(path, config={"mar.num_heads": 2, "vae.num_groups": 4, "image_token_id": 1000})
    assert other.config.mar == CFG.mar.replace(num_heads=2) and other.config.vae == CFG.vae
    assert other.config.llm == CFG.llm and other.config.image_token_id == 1000
    dl = other.config.diffloss  # dimensions from the tensors, sampling settings from the default preset
    assert (dl.width, dl.depth, dl.z_channels, dl.sampling_steps) == (32, 2, 32, "100")
    # overrides apply before the tensor-read sizes are checked: 32 groups need the tensors' 32 channels
    wide = U.UniPic(CFG.replace(vae=CFG.vae.replace(ch=32, num_groups=32)), rngs=nnx.Rngs(1))
    convert.to_unipic(wide, tmp_path / "wide")
    assert convert.from_unipic(tmp_path / "wide", config={"preset": "tiny", "vae.num_groups": 32}).config == wide.config
    with pytest.raises(ConversionError, match="no valid UniPicConfig"):
        convert.from_unipic(tmp_path / "wide", config={"preset": "tiny", "vae.num_groups": 7})
    scanned = convert.from_unipic(path, config={"preset": "tiny", "llm.scan_layers": True, "mar.scan_layers": True,
                                                "diffloss.scan_layers": True})
    assert scanned.llm.layers.attn.q_proj.kernel.shape[0] == 2 and scanned.mar.decoder_blocks.fc1.kernel.shape[0] == 2
    for out, m in (("again", back), ("again_scanned", scanned)):
        convert.to_unipic(m, tmp_path / out)
        for name, inner in (("pytorch_model.bin", None), ("kl16.ckpt", "model")):
            a, b = load(path / name), load(tmp_path / out / name)
            a, b = (a[inner], b[inner]) if inner else (a, b)
            assert sorted(a) == sorted(b)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (out, k)
    lat = np.random.RandomState(0).randn(1, 4, 4, 4).astype(np.float32)
    np.testing.assert_array_equal(back.encode_image(lat)[1], model.encode_image(lat)[1])
    np.testing.assert_allclose(scanned.encode_image(lat)[1], model.encode_image(lat)[1], atol=1e-6)


def test_unused_and_unknown_keys(release, tmp_path):
    _, path = release
    sd = load(path / "pytorch_model.bin")
    sd["siglip2_proj.0.weight"] = torch.zeros(2, 2)  # released but unused by this composite: reported
    sd["mar.class_emb.weight"] = torch.zeros(10, CFG.mar.width)
    import shutil

    shutil.copytree(path, tmp_path / "r")
    torch.save(sd, tmp_path / "r" / "pytorch_model.bin")
    convert.from_unipic(tmp_path / "r", config="tiny")
    sd["mar.encoder_blocks.0.attn.extra"] = torch.zeros(2)
    torch.save(sd, tmp_path / "r" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"mar\.encoder_blocks\.0\.attn\.extra"):
        convert.from_unipic(tmp_path / "r", config="tiny")
    with pytest.raises(ConversionError, match="Unknown config override"):
        convert.from_unipic(path, config={"mar.heads": 2})
    (tmp_path / "r" / "kl16.ckpt").unlink()
    with pytest.raises(ConversionError, match="kl16.ckpt"):
        convert.from_unipic(tmp_path / "r", config="tiny")


def test_siglip2_tower_and_projector_round_trip(tmp_path):
    cfg = U.UniPicConfig.preset("tiny_siglip2")
    model = U.UniPic(cfg, rngs=nnx.Rngs(4))
    convert.to_unipic(model, tmp_path / "rel")
    sd = load(tmp_path / "rel" / "pytorch_model.bin")
    assert "siglip2.vision_model.encoder.layers.1.mlp.fc2.weight" in sd and "siglip2_proj.2.bias" in sd
    back = convert.from_unipic(tmp_path / "rel", config="tiny_siglip2")
    assert back.config == cfg
    import jax

    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    # without a vision config the tower is reported unused, not an error
    assert convert.from_unipic(tmp_path / "rel", config="tiny").config.vision is None
