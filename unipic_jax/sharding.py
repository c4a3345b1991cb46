"""The one place that knows about device meshes.

Mesh axes (always these three, in this order):

  ``data``    pure data parallelism: the batch is split, parameters are replicated.
  ``fsdp``    fully-sharded data parallelism: the batch is split AND parameters /
              optimizer state are sharded over this axis (gathered per layer by XLA).
  ``tensor``  tensor (model) parallelism: attention heads and MLP width are split.

Modules never name mesh axes. They annotate parameters with *logical* axis names
(``nnx.Param(..., out_sharding=("embed", "heads", "head_dim"))``) and constrain
activations with :func:`constrain` (``constrain(x, ("batch", "length", "embed"))``).
:data:`LOGICAL_RULES` maps logical names to mesh axes. A logical dimension whose
size is not divisible by its mesh axes is replicated instead (so a tiny model with
3 KV heads still runs on ``tensor=2``); a mesh axis is used at most once per array.

Typical use::

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=1))
    model = sharding.create_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        logits = model(tokens)

On several processes call :func:`unipic_jax.distributed.initialize` first (before any
other JAX call); everything else is the same on one host and many.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. The first rule for a name wins.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the leading axis of stacked (scanned) blocks' parameters
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; exactly one may be -1 (takes the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def from_any(cls, cfg: "MeshConfig | Mapping[str, int] | None") -> "MeshConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, MeshConfig):
            return cfg
        unknown = set(cfg) - set(AXES)
        if unknown:
            raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the axes are {AXES}.")
        return cls(**{k: int(v) for k, v in cfg.items()})

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolves -1 and checks that the product equals ``num_devices``."""
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"Mesh axis sizes must be positive or -1, got {self}.")
        if sizes.count(-1) > 1:
            raise ValueError(f"At most one mesh axis may be -1, got {self}.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"Cannot fill the -1 axis of {self}: {num_devices} devices are not "
                    f"divisible by the product of the other axes ({known})."
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"Mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
                f"{num_devices} are available; use -1 for one axis to take the rest."
            )
        return tuple(sizes)  # type: ignore[return-value]


def mesh_arg(text: str) -> dict[str, int]:
    """Parses a command-line mesh, ``"data=2,fsdp=-1,tensor=1"`` → ``{"data": 2, ...}``.

    Raises ``ValueError`` (with the expected form) on a malformed mesh or an unknown axis."""
    try:
        out = {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
        MeshConfig.from_any(out)  # validates axis names
    except ValueError as e:
        raise ValueError(
            f"--mesh takes axis=size pairs like 'data=1,fsdp=-1,tensor=2', got {text!r} ({e})") from e
    return out


def make_mesh(
    cfg: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices, all hosts).

    Axes are ``AxisType.Auto`` so that :func:`constrain` and GSPMD propagation work.
    """
    cfg = MeshConfig.from_any(cfg)
    devices = list(jax.devices() if devices is None else devices)
    try:
        shape = cfg.shape(len(devices))
    except ValueError as e:
        if jax.process_count() == 1:
            raise
        raise ValueError(f"{e} (the global device count: {jax.process_count()} processes x "
                         f"{jax.local_device_count()} devices; set the mesh in the config for it)") from None
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _rule(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"Logical axis {name!r} has no rule in LOGICAL_RULES; add one to unipic_jax/sharding.py.")


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    rules=LOGICAL_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``.

    With ``shape`` and ``mesh`` given, mesh axes that do not divide the dimension (or
    that are absent from the mesh) are dropped, so the dimension is replicated.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"Logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}.")
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        axes = [a for a in _rule(name, rules) if a not in used]
        if mesh is not None:
            sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
            axes = [a for a in axes if a in sizes]
            if shape is not None:
                # keep the longest prefix of axes whose product divides the dimension
                kept = []
                for a in axes:
                    if shape[i] % (math.prod(sizes[b] for b in kept) * sizes[a]) == 0:
                        kept.append(a)
                    else:
                        break
                axes = kept
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def is_variable(x) -> bool:
    """``is_leaf`` for trees whose NNX Variables are to be handled whole."""
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` of one (possibly abstract) variable from its logical annotation."""
    names = var.get_metadata().get("out_sharding")
    shape = var.get_value().shape
    if not names:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A state-shaped tree of ``NamedSharding`` (Variables kept as containers)."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state, is_leaf=is_variable)


def pure(state: nnx.State) -> nnx.State:
    """``state`` with its Variables replaced by their values (an ``nnx.State`` of arrays).
    ``nnx.merge`` / ``nnx.update`` take it as they take ``state``; ``jit`` flattens it and
    rebuilds it on every call far faster: for the demo's train state (791 leaves) 1 ms
    instead of 26, Python time that a step otherwise spends before and after its computation."""
    return nnx.State(nnx.to_pure_dict(state))


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """Runs ``ctor`` under ``jit`` with sharded outputs: no parameter ever exists unsharded.
    Without a mesh, simply ``ctor()``."""
    if mesh is None:
        return ctor()
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    @jax.jit
    def init():
        _, state = nnx.split(ctor())
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an existing module's state onto ``mesh`` (in place), following its annotations."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))
    return module


def put(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Places a host array on ``sharding``; each process copies only the shards it addresses."""
    if sharding is None:
        return jax.numpy.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a module's (or pytree's) arrays live on, or ``None`` if they are unsharded."""
    for leaf in jax.tree.leaves(nnx.state(tree) if isinstance(tree, nnx.Module) else tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def on_params_mesh(params: Any, fn: Callable, *args):
    """Calls ``fn(*args)`` inside the mesh that ``params`` live on (unless a mesh is set), so
    that :func:`constrain` applies when a sharded model is called without ``jax.set_mesh``."""
    mesh = mesh_of(params)
    if mesh is not None and jax.sharding.get_abstract_mesh().empty:
        with jax.set_mesh(mesh):
            return fn(*args)
    return fn(*args)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
