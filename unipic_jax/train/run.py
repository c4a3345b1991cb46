"""From a config to a finished run: mesh, tokenizer, model, data, stages, training, final
evaluation. ``train.py`` is a thin command line over :func:`run`.

Config fields (see ``configs/demo.py``):

* ``seed``; ``mesh`` (``data``, ``fsdp``, ``tensor``);
* ``tokenizer``: ``"shapes"`` (the shapes world's word-level tokenizer, written to
  ``WORKDIR/tokenizer``) or a tokenizer folder;
* ``model``: ``preset`` of ``UniPicConfig`` and nested ``overrides`` such as
  ``{"mar": {"grid": 8}}``; the LLM vocabulary and ``image_token_id`` follow the tokenizer;
* ``init`` / ``init_parts``: initial weights (a model checkpoint, a Hugging Face folder or the
  UniPic-1 release) and the parameter prefixes taken from them, see
  :mod:`unipic_jax.train.warm_start`;
* ``data``: the source (the shapes world's ``length``, canvas ``sizes`` and ``native``, TFDS or
  JSONL);
* ``stage_order`` and ``stages``: see :mod:`unipic_jax.train.stages`;
* ``train``: ``log_every``, ``checkpoint_every``, ``keep``, ``progress``, ``sample_every``
  with ``sample_prompts`` (a PNG grid under ``WORKDIR/samples`` and in TensorBoard every that
  many steps);
* ``eval``: the final evaluation's held-out shapes prompts and sampling settings, see
  :func:`unipic_jax.eval.shapes.settings` (saved with the model for ``eval.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from unipic_jax import checkpoint, distributed, sharding
from unipic_jax.files import write_json
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import sources as sources_lib
from unipic_jax.eval import shapes as shapes_eval
from unipic_jax.models import unipic
from unipic_jax.train.stages import Stage, set_vae_scale
from unipic_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


def load_config(path, arg: str | None = None):
    """``get_config()`` (or ``get_config(arg)``) of a config file, as ``train.py --config
    path[:arg]`` reads it; for tests, benchmarks and notebooks that start from a config."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file {path}; configs are Python files with get_config(), "
                                "e.g. configs/demo.py")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config() if arg is None else mod.get_config(arg)


def build_tokenizer(cfg, workdir: Path):
    """``cfg.tokenizer``: a folder, or ``"shapes"``: the shapes world's tokenizer, written once
    to ``WORKDIR/tokenizer`` by process 0 (into a temporary folder, then renamed) while the
    other processes wait, then read by all."""
    if cfg.tokenizer == "shapes":
        from unipic_jax.data import shapes_tokenizer

        path = workdir / "tokenizer"
        if distributed.is_main() and not (path / "tokenizer.json").exists():
            tmp = workdir / f".tokenizer.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)  # only ever our own temporary folder
            shapes_tokenizer.build(tmp)
            if path.exists():  # a folder without tokenizer.json: never ours to delete
                raise FileExistsError(f"{path} exists but holds no tokenizer.json; move it away")
            os.replace(tmp, path)
        distributed.barrier("tokenizer written")
        return tok_lib.load_tokenizer(path)
    return tok_lib.load_tokenizer(cfg.tokenizer)


def base_model_config(cfg) -> unipic.UniPicConfig:
    """``cfg.model``: a ``UniPicConfig`` preset with nested overrides (``{"mar": {"grid": 8}}``)."""
    mc = unipic.UniPicConfig.preset(cfg.model.preset)
    changes = {}  # applied together: the parts are validated against each other
    for part, fields in dict(cfg.model.get("overrides", {})).items():
        if hasattr(fields, "items"):
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(fields).items()}
            changes[part] = getattr(mc, part).replace(**fields)
        else:
            changes[part] = fields
    return dataclasses.replace(mc, **changes)


def model_config(cfg, tok) -> unipic.UniPicConfig:
    """The model of ``cfg`` with the LLM's vocabulary, EOS/pad and ``<image>`` id from ``tok``."""
    mc = base_model_config(cfg)
    vocab = max(mc.llm.vocab_size if cfg.tokenizer != "shapes" else 0, -(-len(tok) // 64) * 64)
    return dataclasses.replace(mc, llm=mc.llm.replace(vocab_size=vocab, eos_token_id=tok_lib.stop_token_ids(tok),
                                                      pad_token_id=tok.pad_token_id, bos_token_id=None),
                               image_token_id=tok_lib.image_token_id(tok))


def release_config(cfg) -> dict:
    """``cfg.model`` as :func:`unipic_jax.convert.release.from_unipic`'s config: the preset and
    dotted overrides (``{"preset": ..., "mar.grid": 8}``)."""
    out = {"preset": cfg.model.preset}
    for part, fields in dict(cfg.model.get("overrides", {})).items():
        if hasattr(fields, "items"):
            out.update({f"{part}.{k}": tuple(v) if isinstance(v, list) else v for k, v in dict(fields).items()})
        else:
            out[part] = fields
    return out


def build_sources(cfg, tasks=sources_lib.TASKS) -> dict[str, Any]:
    """``data.source``: ``"shapes"`` (``length``, canvas ``sizes``; ``native``: each stage's own
    buckets instead, see :class:`~unipic_jax.data.sources.ShapesSource`), ``"tfds"`` (``tfds.{task}``: a data set
    name or prepared folder, ``data_dir``, ``split``) or ``"jsonl"`` (``jsonl.{task}``: a manifest)."""
    d = cfg.data
    if d.source == "shapes":
        sizes, native = tuple(tuple(s) for s in d.sizes), bool(d.get("native", False))
        return {t: sources_lib.ShapesSource(t, "train", cfg.seed, int(d.length), sizes, native) for t in tasks}
    if d.source == "tfds":
        return {t: sources_lib.TfdsSource(t, d.tfds[t], split=d.get("split", "train"),
                                          data_dir=d.get("data_dir") or None) for t in tasks}
    if d.source == "jsonl":
        return {t: sources_lib.JsonlSource(t, d.jsonl[t]) for t in tasks}
    raise ValueError(f"data.source={d.source!r}; choose 'shapes', 'tfds' or 'jsonl'")


def run(cfg, workdir: str, max_steps: int | None = None) -> dict:
    """Trains (or resumes) the run in ``workdir`` on every process of the run; returns the
    final summary. Process 0 writes the run files (``summary.json``, ``history.json``,
    ``metrics.jsonl``); checkpoints and the final model are written by all processes together.

    ``WORKDIR/model`` always holds the model of the newest finished run: it is saved (with
    the sampling settings of ``cfg.eval`` in ``eval.json`` and the step in ``step.json``)
    whenever training ends at a step other than the one it holds, into a temporary folder
    that replaces the old one only once complete."""
    workdir = Path(workdir)
    distributed.initialize()
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.check_same("config", cfg, hint="pass the same --config file and --config.* overrides")
    mesh = sharding.make_mesh(dict(cfg.mesh))
    tok = build_tokenizer(cfg, workdir)
    mc = model_config(cfg, tok)
    model = sharding.create_sharded(lambda: unipic.UniPic(mc, rngs=nnx.Rngs(cfg.seed)), mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if cfg.get("init"):
        from unipic_jax.train import warm_start

        info = warm_start.warm_start(model, cfg.init, parts=tuple(cfg.get("init_parts", ("",))), mesh=mesh,
                                     release_config=release_config(cfg))
        if info["vae_scale"] is not None:
            set_vae_scale(model, info["vae_scale"])
    log.info("model: %.2fM parameters on mesh %s", n_params / 1e6, dict(mesh.shape))
    stages = [Stage.from_config(name, cfg.stages[name], mc, cfg.seed) for name in cfg.stage_order]
    needed = sorted({t for st in stages for t in st.data.batch_size})
    trainer = Trainer(model, stages, build_sources(cfg, needed), tok, workdir, seed=cfg.seed,
                      log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every, keep=cfg.train.keep,
                      sample_every=int(cfg.train.get("sample_every", 0)), sample_fn=shapes_eval.sample_fn(cfg, tok),
                      progress=cfg.train.get("progress", True))
    result = trainer.run(max_steps=max_steps)
    summary: dict[str, Any] = {"steps": result.steps, "final_metrics": result.last_metrics, "params": n_params}
    if distributed.is_main():
        write_json(workdir / "history.json", result.history)
    if result.stopped:
        summary["stopped"] = True
        return summary
    settings = shapes_eval.settings(cfg.eval)
    final = save_final_model(model, workdir, result.steps, settings)
    summary["model"] = str(final)
    if settings["per_category"]:
        summary.update(shapes_eval.benchmark(model, tok, settings, workdir / "eval"))
    if distributed.is_main():
        write_json(workdir / "summary.json", summary)
    distributed.barrier("run finished")
    return summary


def save_final_model(model, workdir: Path, step: int, settings: dict) -> Path:
    """Saves ``WORKDIR/model`` (see :func:`run`) on every process; returns its path."""
    final = workdir / "model"
    done = final / "step.json"
    if done.exists() and json.loads(done.read_text()).get("step") == step and (final / checkpoint.CONFIG).exists():
        return final  # saved by an earlier call that stopped after it
    tmp = workdir / f".model-{step}.partial"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of an interrupted save
    distributed.barrier("final model: clean")
    checkpoint.save_model(tmp, model, overwrite=True)  # collective
    if distributed.is_main():
        write_json(tmp / "eval.json", settings)
        write_json(tmp / "step.json", {"step": step})
        old = workdir / f".model-{step}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)  # the previous model, now replaced
    distributed.barrier("final model: saved")
    return final
