"""The KL VAE against diffusers' AutoencoderKL (the same LDM architecture), float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

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
    ours = load_state(abstract, DictSource(sd, "diffusers"), KeyMap(V.diffusers_rules(CFG)), progress=False)
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
    ldm = dict(torch_tensors(ours, KeyMap(V.ldm_rules(CFG))))
    # the names and layouts of MAR's kl16.ckpt
    assert ldm["encoder.down.2.attn.0.q.weight"].shape == (32, 32, 1, 1)
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (32, 16, 1, 1)
    assert ldm["decoder.up.2.upsample.conv.weight"].shape == (32, 32, 3, 3)
    assert ldm["decoder.up.0.block.1.conv1.weight"].shape == (16, 16, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ldm and len(ldm) == len(sd)
    abstract = nnx.eval_shape(lambda: V.AutoencoderKL(CFG, rngs=nnx.Rngs(0)))
    again = load_state(abstract, DictSource(ldm, "ldm"), KeyMap(V.ldm_rules(CFG)), progress=False)
    back = dict(torch_tensors(again, KeyMap(V.diffusers_rules(CFG))))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    bad = dict(ldm)
    bad["encoder.down.0.block.0.nin_shortcut.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"encoder\.down\.0\.block\.0\.nin_shortcut\.weight"):
        load_state(abstract, DictSource(bad), KeyMap(V.ldm_rules(CFG)), progress=False)


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
