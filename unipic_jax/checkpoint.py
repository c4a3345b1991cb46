"""Model checkpoints in Orbax format.

Layout of a model checkpoint folder::

    DIR/config.json    {"family": "qwen2" | "siglip" | "unipic", "config": {...the config dataclass...}}
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
from unipic_jax.convert.hf import families

CONFIG = "config.json"
PARAMS = "params"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not match."""


def model_kinds() -> dict[str, tuple[type, Any]]:
    """Family name → (config type, ``build(cfg, rngs)``) for every model a checkpoint may hold."""
    from unipic_jax.models import unipic

    kinds = {name: (fam.config_type, fam.build) for name, fam in families().items()}
    kinds["unipic"] = (unipic.UniPicConfig, lambda cfg, rngs: unipic.UniPic(cfg, rngs=rngs))
    return kinds


def kind_of_config(cfg: Any) -> str:
    for name, (cfg_type, _) in model_kinds().items():
        if isinstance(cfg, cfg_type):
            return name
    raise CheckpointError(f"No checkpoint family holds a {type(cfg).__name__}")


def save_model(path: str | os.PathLike, model: nnx.Module, *, overwrite: bool = False) -> Path:
    """Saves ``model``'s parameters and config under ``path`` (see the module docstring)."""
    path = Path(path).absolute()
    name = kind_of_config(model.config)
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
    kinds = model_kinds()
    if meta.get("family") not in kinds:
        raise CheckpointError(f"{path}/{CONFIG} names family {meta.get('family')!r}; known: {sorted(kinds)}")
    cfg_type = kinds[meta["family"]][0]
    try:
        cfg = cfg_type.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG} does not describe a {cfg_type.__name__}: {e}") from e
    return cfg.replace(**overrides) if overrides else cfg


def load_model(
    path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, **overrides
) -> nnx.Module:
    """Restores a model saved by :func:`save_model`.

    ``dtype`` casts parameters and compute on restore (e.g. ``jnp.bfloat16``); other
    keyword arguments override config fields (e.g. ``remat="full"``).
    """
    path = Path(path).absolute()
    cfg = read_config(path, **overrides)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = cfg.with_dtype(name) if hasattr(cfg, "with_dtype") else cfg.replace(dtype=name, param_dtype=name)
    build = model_kinds()[kind_of_config(cfg)][1]
    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
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
