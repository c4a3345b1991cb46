"""Model checkpoints in Orbax format.

Layout of a model checkpoint folder::

    DIR/config.json    {"family": "qwen2" | "siglip" | "unipic", "config": {...the config dataclass...}}
    DIR/params/        an Orbax PyTree checkpoint of the model's ``nnx.Param`` state

Each config records its layer form (``scan_layers``: repeated blocks stacked, parameters
``layers.…`` with a leading block axis, or unrolled, ``layers.i.…``). :func:`load_model` with
the other form (``scan_layers=...`` or an override of a part's config) restores the stored
form and stacks or unstacks the arrays.

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


def layer_forms(cfg: Any, prefix: str = "") -> dict[str, bool]:
    """``{part: scan_layers}`` for a config and every part config it holds (``""`` = itself)."""
    out = {prefix.rstrip("."): cfg.scan_layers} if hasattr(cfg, "scan_layers") else {}
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            out.update(layer_forms(sub, f"{prefix}{f.name}."))
    return out


def with_layer_form(cfg: Any, scan_layers: bool | dict[str, bool]) -> Any:
    """``cfg`` with ``scan_layers`` set in itself and every part (a bool), or per part (a dict
    as :func:`layer_forms` returns)."""
    changes = {}
    if hasattr(cfg, "scan_layers"):
        flag = scan_layers if isinstance(scan_layers, bool) else scan_layers.get("", cfg.scan_layers)
        changes["scan_layers"] = flag
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            part = scan_layers if isinstance(scan_layers, bool) else {
                k[len(f.name) + 1:] if k != f.name else "": v for k, v in scan_layers.items()
                if k == f.name or k.startswith(f.name + ".")}
            changes[f.name] = with_layer_form(sub, part)
    return dataclasses.replace(cfg, **changes)


def _restack(src: dict, dst_abstract: dict) -> dict:
    """Source parameter arrays (flat path tuple → array) in the layout of ``dst_abstract``
    (flat path → abstract Variable): paths both share are copied; a stacked destination
    ``P + rest`` (``"layers"`` first in its annotation) is ``stack(src[P + (i,) + rest])``, an
    unrolled one ``P + (i,) + rest`` is ``src[P + rest][i]``."""
    out = {}
    for path, var in dst_abstract.items():
        if path in src:
            out[path] = src[path]
            continue
        names = var.get_metadata().get("out_sharding") or ()
        if names and names[0] == "layers":
            n = var.get_value().shape[0]
            for k in range(1, len(path)):
                if path[:k] + (0,) + path[k:] in src:
                    out[path] = jnp.stack([src[path[:k] + (i,) + path[k:]] for i in range(n)])
                    break
        else:
            for k, part in enumerate(path):
                if isinstance(part, int) and path[:k] + path[k + 1:] in src:
                    out[path] = src[path[:k] + path[k + 1:]][part]
                    break
        if path not in out:
            raise CheckpointError(f"The checkpoint has no parameter for {'.'.join(map(str, path))} in either "
                                  "layer form (stacked or unrolled); does the config match the checkpoint?")
    return out


def load_model(
    path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
    scan_layers: bool | dict[str, bool] | None = None, **overrides
) -> nnx.Module:
    """Restores a model saved by :func:`save_model`.

    ``dtype`` casts parameters and compute on restore (e.g. ``jnp.bfloat16``);
    ``scan_layers`` sets the layer form of every part (a bool) or per part (a dict as
    :func:`layer_forms` returns; default: as stored); other keyword
    arguments override config fields (e.g. ``remat="full"``). A layer form other than the
    stored one is restored as stored, then stacked or unstacked (both forms are briefly held).
    """
    path = Path(path).absolute()
    stored = read_config(path)
    cfg = read_config(path, **overrides)
    if scan_layers is not None:
        cfg = with_layer_form(cfg, scan_layers if isinstance(scan_layers, dict) else bool(scan_layers))
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = cfg.with_dtype(name) if hasattr(cfg, "with_dtype") else cfg.replace(dtype=name, param_dtype=name)
    forms = layer_forms(stored)
    if layer_forms(cfg) != forms:
        source = _restore(path, with_layer_form(cfg, forms), mesh)
        target = nnx.eval_shape(lambda: model_kinds()[kind_of_config(cfg)][1](cfg, nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(target, nnx.Param, ...)
        src = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
        del source
        dst = dict(nnx.to_flat_state(params))
        values = _restack(src, dst)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        new = [(p, v.replace(jax.device_put(values[p], sharding.variable_sharding(v, mesh) if mesh is not None
                                            else device))) for p, v in dst.items()]
        return nnx.merge(graphdef, nnx.from_flat_state(new), rest)
    return _restore(path, cfg, mesh)


def _restore(path: Path, cfg: Any, mesh) -> nnx.Module:
    """The checkpoint's parameters restored into a model of ``cfg`` (which must have the stored layout)."""
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
