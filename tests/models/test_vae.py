"""The KL VAE against diffusers' AutoencoderKL (the same LDM architecture), float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from helpers import randomize

from unipic_jax.convert import tables
from unipic_jax.convert.hf import ConversionError, DictSource, load_state, torch_tensors
from unipic_jax.convert.mapping import KeyMap
from unipic_jax.models import vae as V

CFG = V.VAEConfig.preset("tiny")  # ch 16, ch_mult (1, 2, 2), 1 block per level, 4 latent channels


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = TorchVAE(**V.diffusers_config(CFG)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    abstract = nnx.eval_shape(lambda: V.AutoencoderKL(CFG, rngs=nnx.Rngs(0)))
    ours = load_state(abstract, DictSource(sd, "diffusers"), KeyMap(tables.vae_diffusers_rules(CFG)), progress=False)
    return ref, ours, sd


def images(seed=0, n=2, size=16):
    return np.tanh(np.random.RandomState(seed).randn(n, size, size, 3)).astype(np.float32)


def test_encode_and_decode_match_diffusers(pair):
    ref, ours, _ = pair
    x = images()
    with torch.no_grad():
        post = ref.encode(torch.tensor(x.transpose(0, 3, 1, 2))).latent_dist
        rec = ref.decode(post.mean).sample.numpy().transpose(0, 2, 3, 1)
    mean, logvar = ours.posterior(jnp.asarray(x))
    np.testing.assert_allclose(mean, post.mean.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, post.logvar.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    lat = ours.encode(jnp.asarray(x))
    assert lat.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(lat, mean * CFG.scale, rtol=1e-6)
    np.testing.assert_allclose(ours.decode(lat), rec, atol=1e-4, rtol=0)
    # a non-square image
    x2 = np.tanh(np.random.RandomState(3).randn(1, 8, 24, 3)).astype(np.float32)
    with torch.no_grad():
        m2 = ref.encode(torch.tensor(x2.transpose(0, 3, 1, 2))).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours.posterior(jnp.asarray(x2))[0], m2, atol=1e-4, rtol=0)


def test_ldm_names_round_trip_and_give_the_same_model(pair):
    _, ours, sd = pair
    ldm = dict(torch_tensors(ours, KeyMap(tables.vae_ldm_rules(CFG))))
    # the names and layouts of MAR's kl16.ckpt
    assert ldm["encoder.down.2.attn.0.q.weight"].shape == (32, 32, 1, 1)
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (32, 16, 1, 1)
    assert ldm["decoder.up.2.upsample.conv.weight"].shape == (32, 32, 3, 3)
    assert ldm["decoder.up.0.block.1.conv1.weight"].shape == (16, 16, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ldm and len(ldm) == len(sd)
    abstract = nnx.eval_shape(lambda: V.AutoencoderKL(CFG, rngs=nnx.Rngs(0)))
    again = load_state(abstract, DictSource(ldm, "ldm"), KeyMap(tables.vae_ldm_rules(CFG)), progress=False)
    back = dict(torch_tensors(again, KeyMap(tables.vae_diffusers_rules(CFG))))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    bad = dict(ldm)
    bad["encoder.down.0.block.0.nin_shortcut.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"encoder\.down\.0\.block\.0\.nin_shortcut\.weight"):
        load_state(abstract, DictSource(bad), KeyMap(tables.vae_ldm_rules(CFG)), progress=False)


def test_without_attention_matches_diffusers():
    cfg = CFG.replace(attention=False)
    torch.manual_seed(0)
    ref = TorchVAE(**V.diffusers_config(cfg)).eval()
    assert not any("attention" in k for k in ref.state_dict())
    sd = {k: v.numpy() + 0.05 * np.random.RandomState(1).randn(*v.shape).astype(np.float32)
          for k, v in ref.state_dict().items()}
    ref.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    abstract = nnx.eval_shape(lambda: V.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    ours = load_state(abstract, DictSource(sd, "diffusers"), KeyMap(tables.vae_diffusers_rules(cfg)), progress=False)
    assert not any("attn" in ".".join(map(str, path)) for path, _ in nnx.state(ours).flat_state())
    x = images(2)
    with torch.no_grad():
        mean = ref.encode(torch.tensor(x.transpose(0, 3, 1, 2))).latent_dist.mean
        rec = ref.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours.posterior(jnp.asarray(x))[0], mean.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(ours.decode(ours.encode(jnp.asarray(x))), rec, atol=1e-4)
    ldm = dict(torch_tensors(ours, KeyMap(tables.vae_ldm_rules(cfg))))  # every parameter has its LDM name
    assert len(ldm) == len(sd) and not any("attn" in k for k in ldm)
    with pytest.raises(ValueError, match="no norm='pixel'"):
        V.diffusers_config(CFG.replace(norm="pixel"))
    with pytest.raises(ValueError, match="norm='batch'"):
        V.VAEConfig(norm="batch")


@pytest.mark.parametrize("local", [False, True])
def test_local_latents_depend_only_on_nearby_pixels(local):
    """With per-pixel norms and no attention a latent sees only its receptive field (77 px
    for the tiny encoder); LDM's GroupNorm statistics and attention span the whole image."""
    cfg = CFG.replace(attention=False, norm="pixel") if local else CFG
    model = randomize(V.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    x = np.tanh(np.random.RandomState(4).randn(1, 16, 128, 3)).astype(np.float32)
    y = x.copy()
    y[:, :, 96:] = 1.0  # the right quarter turns white
    left = slice(0, 8)  # latent columns 0-7: pixels 0-31, more than 38 px from the change
    zx, zy = model.encode(jnp.asarray(x)), model.encode(jnp.asarray(y))
    change = float(jnp.max(jnp.abs(zx[:, :, left] - zy[:, :, left])))
    assert float(jnp.max(jnp.abs(zx - zy))) > 1e-2  # the change reaches the latents near it
    if local:
        assert change < 1e-6
        dx, dy = model.decode(zx), model.decode(zx.at[:, :, 24:].set(0.0))
        assert float(jnp.max(jnp.abs(dx[:, :, :16] - dy[:, :, :16]))) < 1e-6  # the decoder is local too
    else:
        assert change > 1e-3


def test_vae_training_loss_decreases():
    model = V.AutoencoderKL(CFG, rngs=nnx.Rngs(0))
    x = jnp.asarray(images(5, 4))
    opt = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(x, key), has_aux=True)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, jax.random.key(i))) for i in range(40)]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_bad_shapes():
    model = V.AutoencoderKL(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(jnp.zeros((1, 10, 16, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.encode(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        V.VAEConfig(ch=10, num_groups=4)
