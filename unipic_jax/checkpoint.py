"""Model checkpoints in Orbax format.

Layout of a model checkpoint folder::

    DIR/config.json    {"family": "qwen2", "config": {...the model config dataclass...}}
    DIR/params/        an Orbax PyTree checkpoint of the model's ``nnx.Param`` state

Orbax writes ``params/`` into a temporary folder and renames it when complete, and
``config.json`` is written (atomically) only after that, so a folder with a
``config.json`` always holds a complete checkpoint. Restoring builds the model
abstractly and restores every array straight onto its sharding on the given mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from unipic_jax import sharding
from unipic_jax.convert.hf import families, family_of_config

CONFIG = "config.json"
PARAMS = "params"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not match."""


def save_model(path: str | os.PathLike, model: nnx.Module, *, overwrite: bool = False) -> Path:
    """Saves ``model``'s parameters and config under ``path`` (see the module docstring)."""
    path = Path(path).absolute()
    name = family_of_config(model.config).name
    if (path / CONFIG).exists() or (path / PARAMS).exists():
        if not overwrite:
            raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS, nnx.state(model, nnx.Param), force=overwrite)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        tmp = path / f".{CONFIG}.tmp"
        tmp.write_text(json.dumps({"family": name, "config": dataclasses.asdict(model.config)}, indent=2))
        os.replace(tmp, path / CONFIG)
    return path


def read_config(path: str | os.PathLike, **overrides) -> Any:
    """The model config stored in a checkpoint folder, with fields overridden."""
    path = Path(path)
    if not (path / CONFIG).exists():
        hint = " (params/ exists: the save was interrupted before it finished)" if (path / PARAMS).exists() else ""
        raise CheckpointError(f"{path} is not a unipic-jax model checkpoint: no {CONFIG}{hint}.")
    meta = json.loads((path / CONFIG).read_text())
    fams = families()
    if meta.get("family") not in fams:
        raise CheckpointError(f"{path}/{CONFIG} names family {meta.get('family')!r}; known: {sorted(fams)}")
    cfg_type = fams[meta["family"]].config_type
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(meta["config"]) - fields
    if unknown:
        raise CheckpointError(f"{path}/{CONFIG} has fields {sorted(unknown)} that {cfg_type.__name__} lacks.")
    cfg = cfg_type(**meta["config"])
    return cfg.replace(**overrides) if overrides else cfg


def load_model(
    path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, **overrides
) -> nnx.Module:
    """Restores a model saved by :func:`save_model`.

    ``dtype`` casts parameters and compute on restore (e.g. ``jnp.bfloat16``); other
    keyword arguments override config fields (e.g. ``remat="full"``).
    """
    path = Path(path).absolute()
    if dtype is not None:
        overrides.update(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
    cfg = read_config(path, **overrides)
    fam = family_of_config(cfg)
    abstract = nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(v):
        s = sharding.variable_sharding(v, mesh) if mesh is not None else device
        return v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s))

    target_state = jax.tree.map(target, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / PARAMS, target_state)
    except Exception as e:
        raise CheckpointError(
            f"Could not restore {path / PARAMS}: {type(e).__name__}: {e}. The checkpoint is incomplete, "
            "corrupt, or was written for a different config."
        ) from e
    return nnx.merge(graphdef, restored, rest)
