"""The diffusion head (MAR's SimpleMLPAdaLN + DiffLoss)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import randomize

from unipic_jax.convert import tables
from unipic_jax.convert.hf import DictSource, load_state
from unipic_jax.convert.mapping import KeyMap, ours_to_torch, path_str
from unipic_jax.models import diffloss as DL

TINY = DL.DiffLossConfig(in_channels=4, z_channels=12, width=32, depth=2, batch_mul=2, sampling_steps="20")


def test_timestep_embedding_closed_form():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(DL.timestep_embedding(t, 8))
    f = np.exp(-math.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb, np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], 1), rtol=1e-5,
                               atol=1e-6)
    assert DL.timestep_embedding(t, 7).shape == (3, 7)


def test_timestep_table_equals_the_mlp_per_token():
    """More timesteps than the schedule has: each token gathers its row of the MLP run once per
    schedule step; values and gradients match the MLP run on every token."""
    emb = DL.TimestepEmbedder(TINY, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(1), (TINY.num_steps + 500,), 0, TINY.num_steps)
    g, p = nnx.split(emb)
    table = lambda p: jnp.sum(jnp.sin(nnx.merge(g, p)(t)))  # noqa: E731
    direct = lambda p: jnp.sum(jnp.sin(nnx.merge(g, p)._mlp(t)))  # noqa: E731
    np.testing.assert_allclose(np.asarray(emb(t)), np.asarray(emb._mlp(t)), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(table)(p)), jax.tree.leaves(jax.grad(direct)(p))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_release_keys_round_trip_bit_identical(scan):
    cfg = TINY.replace(scan_layers=scan)
    model = DL.DiffLoss(cfg, rngs=nnx.Rngs(0))
    km = KeyMap(tables.diffloss_torch_rules(cfg))
    state = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(v[...]) + np.random.RandomState(len(state)).randn(*v.shape)
        for key, rule, index in km.to_torch(path_str(p), v.shape):
            state[key] = ours_to_torch(rule, x, index)
    assert state["net.res_blocks.1.adaLN_modulation.1.weight"].shape == (3 * 32, 32)
    assert state["net.final_layer.adaLN_modulation.1.weight"].shape == (2 * 32, 32)
    assert state["net.final_layer.linear.weight"].shape == (8, 32)
    abstract = nnx.eval_shape(lambda: DL.DiffLoss(cfg, rngs=nnx.Rngs(0)))
    loaded = load_state(abstract, DictSource(state), km, progress=False)
    for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
        for key, rule, index in km.to_torch(path_str(p), v.shape):
            np.testing.assert_array_equal(ours_to_torch(rule, np.asarray(v[...]), index),
                                          state[key].astype(np.float32))
    # the adaLN chunks are (shift, scale, gate) in that order along the torch output axis
    ada = loaded.net.res_blocks.ada.kernel[...][0] if scan else loaded.net.res_blocks[0].ada.kernel[...]
    np.testing.assert_array_equal(ada[2], state["net.res_blocks.0.adaLN_modulation.1.weight"][64:].astype(np.float32))


def test_cfg_batch_layout():
    model = randomize(DL.DiffLoss(TINY, rngs=nnx.Rngs(1)))  # MAR's init zeroes the output layer
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(6, 4), jnp.float32)
    z = jnp.asarray(rs.randn(6, 12), jnp.float32)
    t = jnp.array([5] * 6)
    out = model.net.forward_with_cfg(x, t, z, 3.0)
    plain = model.net(jnp.concatenate([x[:3], x[:3]]), t, z)
    cond, uncond = plain[:3, :4], plain[3:, :4]
    np.testing.assert_allclose(out[:3, :4], uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[3:, :4], out[:3, :4])
    np.testing.assert_allclose(out[:, 4:], plain[:, 4:])  # each half keeps its own variance


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_decreases_and_sampling_is_deterministic(prediction):
    model = DL.DiffLoss(TINY.replace(prediction=prediction), rngs=nnx.Rngs(2))
    assert model.train_schedule.prediction == model.sample_schedule.prediction == prediction
    rs = np.random.RandomState(3)
    z = jnp.asarray(rs.randn(16, 12), jnp.float32)
    target = jnp.tanh(z[:, :4] * 2)  # a deterministic function of the condition
    mask = jnp.ones(16)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(target, z, mask, key))(model)
        opt.update(model, grads)
        return loss

    key = jax.random.key(0)
    eval_keys = jax.random.split(jax.random.key(9), 8)
    before = np.mean([float(model.loss(target, z, mask, k)) for k in eval_keys])
    for i in range(150):
        step(model, opt, jax.random.fold_in(key, i))
    after = np.mean([float(model.loss(target, z, mask, k)) for k in eval_keys])
    assert after < 0.7 * before, (before, after)
    a = model.sample(z[:4], jax.random.key(5), temperature=0.9)
    b = model.sample(z[:4], jax.random.key(5), temperature=0.9)
    assert a.shape == (4, 4) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    guided = model.sample(jnp.concatenate([z[:4], jnp.zeros((4, 12))]), jax.random.key(5), cfg=2.0)
    assert guided.shape == (4, 4)


@pytest.mark.parametrize("bad", ["net.res_blocks.0.extra.weight"])
def test_unknown_release_key_is_named(bad):
    abstract = nnx.eval_shape(lambda: DL.DiffLoss(TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(Exception, match=bad.replace(".", r"\.")):
        load_state(abstract, DictSource({bad: np.zeros(2)}), KeyMap(tables.DIFFLOSS_TORCH_RULES), progress=False)


def test_init_follows_mar():
    """MAR's initialize_weights: xavier_uniform Linear layers, N(0, 0.02²) time embedding,
    adaLN modulation and the output layer zero, so every residual block starts as identity."""
    net = DL.DiffLoss(TINY, rngs=nnx.Rngs(4)).net
    for block in net.res_blocks:
        assert np.all(np.asarray(block.ada.kernel[...]) == 0) and np.all(np.asarray(block.ada.bias[...]) == 0)
    for p in (net.final_layer.ada.kernel, net.final_layer.linear.kernel, net.final_layer.linear.bias):
        assert np.all(np.asarray(p[...]) == 0)
    assert 0.015 < float(np.asarray(net.time_embed.fc1.kernel[...]).std()) < 0.025
    k = np.asarray(net.input_proj.kernel[...])
    assert np.abs(k).max() <= np.sqrt(6.0 / (4 + 32))
    x, t, z = jnp.ones((3, 4)), jnp.array([1, 50, 900]), jnp.ones((3, 12))
    np.testing.assert_array_equal(net(x, t, z), np.zeros((3, 8)))


def test_training_keeps_the_token_batch_sharded():
    """Under FSDP each device keeps its share of the N·batch_mul repeated tokens: no all-gather
    of them (once one gathered the diffusion head's whole batch onto every device, 1.1 GiB per
    block at 256² × 64 examples)."""
    import re

    from unipic_jax import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    model = sharding.create_sharded(lambda: DL.DiffLoss(TINY, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model)
    n = 56  # tokens; repeated batch_mul times
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    target, z = (jax.device_put(jnp.ones((n, d), jnp.float32), rows) for d in (TINY.in_channels, TINY.z_channels))
    mask = jax.device_put(jnp.ones((n,), jnp.float32), rows)

    def loss(p):
        return nnx.merge(graphdef, p).loss(target, z, mask, jax.random.key(0))

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    big = n * TINY.batch_mul
    gathered = re.findall(rf"= \w+\[{big}[,\]][^=]*all-gather\(", hlo)
    assert "all-gather" in hlo  # the parameters are gathered (FSDP), so the check can see gathers
    assert not gathered, gathered[:2]


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}])
def test_the_head_on_a_mesh_equals_one_device(axes):
    """Loss, gradients and guided samples of a random head, sharded (FSDP + tensor) and not.
    On the 2 × 2 × 2 mesh, XLA 0.10.2 once computed ``h + gate · mlp(…)`` wrongly when only the
    residual stream was constrained to the batch axes (forward off by 100 %)."""
    from unipic_jax import sharding

    mesh = sharding.make_mesh(axes)
    one = randomize(DL.DiffLoss(TINY, rngs=nnx.Rngs(0)), scale=0.3)
    sharded = sharding.create_sharded(lambda: DL.DiffLoss(TINY, rngs=nnx.Rngs(0)), mesh)
    nnx.update(sharded, jax.device_put(nnx.state(one), jax.tree.map(lambda x: x.sharding, nnx.state(sharded))))
    n = 48
    z = jax.random.normal(jax.random.key(1), (n, TINY.z_channels))
    x = jax.random.normal(jax.random.key(2), (n, TINY.in_channels))
    mask = (jnp.arange(n) % 3 > 0).astype(jnp.float32)

    def run(m):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(x, z, mask, jax.random.key(7)))(m)
        out = m.net(x, jnp.arange(n) * 20, z)
        return loss, grads, out, m.sample(z, jax.random.key(5), 1.0, 2.5)

    a = nnx.jit(run)(one)
    with jax.set_mesh(mesh):
        b = nnx.jit(run)(sharded)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for u, v in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * np.abs(u).max())
    scale = np.abs(a[2]).max()
    np.testing.assert_allclose(a[2], b[2], atol=1e-5 * scale)
    np.testing.assert_allclose(a[3], b[3], atol=1e-4 * np.abs(a[3]).max())
