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
* ``data``: the source (the shapes world's ``length`` and canvas ``sizes``, TFDS or JSONL);
* ``stage_order`` and ``stages``: see :class:`unipic_jax.train.trainer.Stage`;
* ``train``: ``log_every``, ``checkpoint_every``, ``keep``, ``progress``, ``sample_every``
  with ``sample_prompts`` (a PNG grid under ``WORKDIR/samples`` and in TensorBoard every that
  many steps);
* ``eval``: held-out shapes prompts per category, image ``size``, sampling settings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from unipic_jax import checkpoint, sharding
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import sources as sources_lib
from unipic_jax.models import unipic
from unipic_jax.train.trainer import Stage, Trainer, set_vae_scale, write_json

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
    if cfg.tokenizer == "shapes":
        from unipic_jax.data import shapes_tokenizer

        path = workdir / "tokenizer"
        if not (path / "tokenizer.json").exists() and jax.process_index() == 0:
            shapes_tokenizer.build(path)
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
    """``data.source``: ``"shapes"`` (``length``, ``sizes``), ``"tfds"`` (``tfds.{task}``: a data set
    name or prepared folder, ``data_dir``, ``split``) or ``"jsonl"`` (``jsonl.{task}``: a manifest)."""
    d = cfg.data
    if d.source == "shapes":
        sizes = tuple(tuple(s) for s in d.sizes)
        return {t: sources_lib.ShapesSource(t, "train", cfg.seed, int(d.length), sizes) for t in tasks}
    if d.source == "tfds":
        return {t: sources_lib.TfdsSource(t, d.tfds[t], split=d.get("split", "train"),
                                          data_dir=d.get("data_dir") or None) for t in tasks}
    if d.source == "jsonl":
        return {t: sources_lib.JsonlSource(t, d.jsonl[t]) for t in tasks}
    raise ValueError(f"data.source={d.source!r}; choose 'shapes', 'tfds' or 'jsonl'")


def run(cfg, workdir: str, max_steps: int | None = None) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the final summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.initialize_distributed()
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
                      sample_every=int(cfg.train.get("sample_every", 0)), sample_fn=sample_fn(cfg, tok),
                      progress=cfg.train.get("progress", True))
    result = trainer.run(max_steps=max_steps)
    summary: dict[str, Any] = {"steps": result.steps, "final_metrics": result.last_metrics, "params": n_params}
    write_json(workdir / "history.json", result.history)
    if result.stopped:
        summary["stopped"] = True
        return summary
    final = workdir / "model"
    if jax.process_index() == 0 and not (final / checkpoint.CONFIG).exists():
        checkpoint.save_model(final, model, overwrite=True)
    summary["model"] = str(final)
    if cfg.eval.get("per_category", 0):
        summary.update(evaluate(model, tok, cfg.eval, workdir))
    write_json(workdir / "summary.json", summary)
    return summary


def sample_prompts(cfg) -> list[str]:
    """``train.sample_prompts``, or the first held-out shapes prompt of each GenEval category."""
    prompts = list(cfg.train.get("sample_prompts", ()) or ())
    if not prompts:
        from unipic_jax.data import shapes as world

        prompts = [world.t2i_example(i, "validation", seed=cfg.seed, category=c)["prompt"]
                   for i in range(2) for c in world.CATEGORIES]
    return prompts


def sample_fn(cfg, tok):
    """The periodic sample grid of a run (``train.sample_every`` steps): the fixed prompts of
    :func:`sample_prompts` at the stage's first bucket, sampled as ``eval`` says (same seed
    every time, so grids of successive steps compare)."""
    if not int(cfg.train.get("sample_every", 0)):
        return None
    from unipic_jax import sample
    from unipic_jax.eval import shapes as shapes_eval

    prompts, e = sample_prompts(cfg), cfg.eval

    def fn(model, stage, step):
        del step
        if stage.kind != "unipic":
            return None
        images = sample.text_to_image(model, tok, prompts, size=tuple(stage.data.buckets[0]), seed=cfg.seed,
                                      num_iter=int(e.num_iter), cfg=float(e.cfg), temperature=float(e.temperature))
        return shapes_eval.grid(images, cols=min(len(prompts), 6))

    return fn


def evaluate(model, tok, ecfg, workdir: Path) -> dict:
    """The shapes benchmark on held-out prompts; writes ``samples.png`` (one row per category)."""
    from unipic_jax import sample
    from unipic_jax.eval import shapes as shapes_eval

    kw = dict(num_iter=int(ecfg.num_iter), cfg=float(ecfg.cfg), cfg_schedule=str(ecfg.get("cfg_schedule", "constant")),
              temperature=float(ecfg.temperature))
    res = shapes_eval.t2i(model, tok, size=tuple(ecfg.size), per_category=int(ecfg.per_category), **kw)
    path = workdir / "samples.png"
    sample.save_png(shapes_eval.grid(res["images"], cols=int(ecfg.per_category))[None], [path])
    out = {"t2i": res["scores"], "samples": str(path)}
    if ecfg.get("edit_per_kind", 0):
        out["edit"] = shapes_eval.edit(model, tok, size=tuple(ecfg.size), per_kind=int(ecfg.edit_per_kind), **kw)[
            "scores"]
    if ecfg.get("qa", 0):
        out["understanding"] = {"accuracy": shapes_eval.understanding(model, tok, size=tuple(ecfg.size),
                                                                      n=int(ecfg.qa))["accuracy"]}
    return out


def format_summary(summary: dict) -> str:
    lines = [f"trained {summary['steps']} steps; model in {summary.get('model')}"]
    if "t2i" in summary:
        s = summary["t2i"]
        lines.append("shapes benchmark (held-out prompts, GenEval rules): overall %.3f" % s["overall"])
        lines += [f"  {k:14s} {v:.3f}" for k, v in s["categories"].items()]
        lines.append(f"  objects per image: {s['objects']:.2f} detected, {s['prompted_objects']:.2f} prompted")
    if "edit" in summary:
        lines.append("editing: overall %.3f  %s" % (summary["edit"]["overall"], {k: round(v, 3) for k, v in
                                                                                 summary["edit"]["categories"].items()}))
    if "understanding" in summary:
        lines.append("understanding exact match: %.3f" % summary["understanding"]["accuracy"])
    if "samples" in summary:
        lines.append(f"sample grid: {summary['samples']}")
    return "\n".join(lines)

