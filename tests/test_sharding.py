"""The mesh builder, the logical-axis rules and placement helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from unipic_jax import sharding
from unipic_jax.models import qwen2


def test_mesh_fills_the_minus_one_axis():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh({"tensor": 8, "fsdp": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert dict(sharding.make_mesh(None, devices=jax.devices()[:4]).shape) == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("cfg,msg", [
    ({"data": -1, "fsdp": -1}, "At most one"),
    ({"data": 3, "fsdp": -1}, "not divisible"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices but 8"),
    ({"model": 2}, "Unknown mesh axes"),
    ({"data": 0}, "positive"),
])
def test_bad_mesh_configs(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.make_mesh(cfg)


def test_logical_rules_with_divisibility_fallback():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # 3 heads do not split over tensor=2: replicated; 63 rows do not split over fsdp=2
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (63, 3, 16), mesh) == P(None, None, None)
    # batch takes data x fsdp, or only data when fsdp does not divide what is left
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "length"), (6, 5), mesh) == P("data", None)
    # a mesh axis is used at most once per array
    assert sharding.logical_to_spec(("vocab", "mlp")) == P("tensor", None)
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (2, 3), mesh)


def test_create_sharded_places_params_and_constrain_is_noop_without_mesh():
    cfg = qwen2.Qwen2Config.preset("tiny")
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = qwen2.init(cfg, seed=0, mesh=mesh)
    emb = model.embedder.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.hidden_size // 4)
    assert model.final_norm.scale[...].sharding.is_fully_replicated
    # same values (to the last ulp of jit vs eager) as building on one device
    plain = qwen2.init(cfg, seed=0)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(plain.embedder.embedding[...]), rtol=1e-6, atol=0)
    moved = sharding.shard_module(plain, mesh)
    assert moved.embedder.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharding.mesh_of(model) == mesh and sharding.mesh_of(qwen2.init(cfg)) is None
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", "act_embed")) is x


def test_pure_state_keeps_values_and_shardings_and_merges_back():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = qwen2.init(qwen2.Qwen2Config.preset("tiny"), seed=0, mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = sharding.pure(params)
    leaves = jax.tree.leaves(pure)
    assert len(leaves) == len(jax.tree.leaves(params)) and all(isinstance(x, jax.Array) for x in leaves)
    assert not any(sharding.is_variable(x) for x in jax.tree.leaves(pure, is_leaf=sharding.is_variable))
    assert pure["embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
    shifted = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p))(pure)  # through jit and back
    merged = nnx.merge(graphdef, shifted, rest)
    assert isinstance(merged.embedder.embedding, nnx.Param)
    np.testing.assert_array_equal(np.asarray(merged.embedder.embedding[...]),
                                  np.asarray(model.embedder.embedding[...]) + 1)


def test_constrain_shards_activations_inside_jit():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})

    @jax.jit
    def f(x):
        return sharding.constrain(x * 2, ("batch", "act_embed"))

    with jax.set_mesh(mesh):
        y = f(jnp.ones((16, 4)))
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)), 2)


def test_put_places_a_host_array_by_shards():
    mesh = sharding.make_mesh({"fsdp": 8})
    s = jax.sharding.NamedSharding(mesh, P("fsdp"))
    x = sharding.put(np.arange(16.0), s)
    assert x.sharding == s and len(x.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(x), np.arange(16.0))
    assert nnx.Param(jnp.ones(2)) is not None  # nnx importable alongside
