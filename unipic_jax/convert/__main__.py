"""Command line: convert Hugging Face folders and the UniPic-1 release to and from
unipic-jax Orbax checkpoints.

    python -m unipic_jax.convert hf-to-orbax      HF_DIR      CKPT_DIR [--dtype bfloat16] [--mesh fsdp=-1]
                                                  [--scan_layers | --noscan_layers]
    python -m unipic_jax.convert orbax-to-hf      CKPT_DIR    HF_DIR   [--max_shard_size 5GB] [--overwrite]
    python -m unipic_jax.convert unipic-to-orbax  RELEASE_DIR CKPT_DIR [--config unipic_1_5b]
                                                  [--set mar.num_heads=16 ...] [--llm_dir DIR]
                                                  [--scan_layers | --noscan_layers]
    python -m unipic_jax.convert orbax-to-unipic  CKPT_DIR    RELEASE_DIR

A release folder holds ``pytorch_model.bin`` (or ``model.safetensors``), ``kl16.ckpt`` and the
Qwen2.5 folder (``config.json``, and the tokenizer files, which ``unipic-to-orbax`` copies to
``CKPT_DIR/tokenizer/`` so that ``python -m unipic_jax.generate`` finds them).

Loading places every tensor straight onto its sharding over ``--mesh`` (default: all
local devices on the ``fsdp`` axis), so a model larger than one device's memory converts.
``--scan_layers`` / ``--noscan_layers`` write the model with stacked (scanned) or separate
layers (default: as the config says); ``--set part.scan_layers=...`` then changes one part.
Every subcommand takes ``--dtype``, ``--mesh`` and ``--overwrite``; a flag that the chosen
subcommand does not use is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from absl import flags

from unipic_jax import checkpoint, cli, distributed, sharding
from unipic_jax.convert.hf import ConversionError, from_hf, to_hf
from unipic_jax.convert.release import find_llm_dir, from_unipic, to_unipic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes part.field=value, e.g. mar.num_heads=16; got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def copy_tokenizer(llm_dir: Path, dst: Path) -> Path | None:
    """Copies the tokenizer files found in ``llm_dir`` to ``dst/tokenizer/`` (if any)."""
    files = [llm_dir / f for f in TOKENIZER_FILES if (llm_dir / f).exists()]
    if not files:
        return None
    tmp = dst / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an interrupted copy
    tmp.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, tmp / f.name)
    final = dst / "tokenizer"
    if final.exists():
        shutil.rmtree(final)  # only reached with --overwrite (main refuses an existing one otherwise)
    tmp.rename(final)
    return final


PROG = "python -m unipic_jax.convert"


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    src: str
    dst: str
    flags: tuple[str, ...]  # besides the common ones (COMMON)


COMMON = ("dtype", "mesh", "overwrite")
COMMANDS = {
    "hf-to-orbax": Command("Hugging Face folder -> Orbax model checkpoint",
                           "folder with config.json and model.safetensors[.index.json]", "new checkpoint folder",
                           ("scan_layers",)),
    "orbax-to-hf": Command("Orbax model checkpoint -> Hugging Face folder",
                           "checkpoint folder written by hf-to-orbax or training", "new Hugging Face folder",
                           ("max_shard_size",)),
    "unipic-to-orbax": Command("the UniPic-1 release folder -> Orbax model checkpoint",
                               "folder with pytorch_model.bin (or model.safetensors), kl16.ckpt and the Qwen folder",
                               "new checkpoint folder", ("config", "set", "llm_dir", "scan_layers")),
    "orbax-to-unipic": Command("Orbax model checkpoint -> the UniPic-1 release layout",
                               "checkpoint folder holding a UniPic model", "new release folder", ()),
}

FLAGS = flags.FlagValues()  # this module's own flags (not absl's global FLAGS: --dtype, --mesh ... clash)
cli.define_help(FLAGS)
flags.DEFINE_string("dtype", None, "hf-to-orbax, unipic-to-orbax: parameter dtype to store (default: the "
                    "checkpoint's; float32 for unipic-to-orbax); orbax-to-hf, orbax-to-unipic: dtype of the "
                    "written tensors (default: as stored)", flag_values=FLAGS)
flags.DEFINE_string("mesh", "fsdp=-1", "mesh axis sizes, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' "
                    "(default fsdp=-1)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing destination", flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", "5GB", "orbax-to-hf: split safetensors above this size (default 5GB)",
                    flag_values=FLAGS)
flags.DEFINE_string("config", "unipic_1_5b", "unipic-to-orbax: UniPicConfig preset giving what the tensors "
                    "cannot tell (head counts; default unipic_1_5b)", flag_values=FLAGS)
flags.DEFINE_multi_string("set", None, "unipic-to-orbax: override a config field on the preset, "
                          "PART.FIELD=V, e.g. --set mar.num_heads=16 (repeatable)", flag_values=FLAGS)
flags.DEFINE_string("llm_dir", None, "unipic-to-orbax: the Qwen2.5 folder (default: the release's subfolder)",
                    flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", None, "hf-to-orbax, unipic-to-orbax: write the layers stacked (scanned, "
                  "--scan_layers) or separate (--noscan_layers) in every part (default: as the config says)",
                  flag_values=FLAGS)


def help_text() -> str:
    width = max(map(len, COMMANDS))
    cmds = "\n".join(f"  {name:<{width}}  {c.help}\n  {'':<{width}}    SRC: {c.src}\n  {'':<{width}}    DST: {c.dst}"
                     f"\n  {'':<{width}}    flags: {', '.join('--' + f for f in COMMON + c.flags)}"
                     for name, c in COMMANDS.items())
    return (f"{__doc__.rstrip()}\n\nusage: {PROG} {{{','.join(COMMANDS)}}} SRC DST [flags]\n\n"
            f"subcommands:\n{cmds}\n\nflags:\n{cli.flag_help(FLAGS)}\n")


def _release_config(preset: str, overrides: list[tuple[str, object]], scan_layers: bool | None):
    """What ``from_unipic`` takes as ``config``: the preset name, or a mapping with the overrides
    (``--scan_layers`` as ``part.scan_layers`` for every part that has layers, before ``--set``)."""
    from unipic_jax.models.unipic import UniPicConfig

    sets = dict(overrides)
    try:
        base = UniPicConfig.preset(sets.get("preset", preset))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if scan_layers is not None:
        forms = checkpoint.layer_forms(base)
        sets = {**{(f"{part}.scan_layers" if part else "scan_layers"): scan_layers for part in forms}, **sets}
    return {"preset": preset, **sets} if sets else preset


def parse_args(argv: list[str]) -> SimpleNamespace:
    """``argv`` (without the program name) as a namespace with ``command``, ``src``, ``dst`` and
    the flags; raises :class:`cli.UsageError`."""
    rest, args, given = cli.parse(FLAGS, PROG, argv)  # rest: the subcommand and SRC DST
    if not rest or rest[0] not in COMMANDS:
        raise cli.UsageError(f"the first argument must be a subcommand, one of {', '.join(COMMANDS)}"
                             + (f"; got {rest[0]!r}" if rest else ""))
    args.command, *paths = rest
    if len(paths) != 2:
        raise cli.UsageError(f"{args.command} takes SRC DST, got {len(paths)} argument(s) {paths}")
    args.src, args.dst = paths
    unused = sorted(given - set(COMMON) - set(COMMANDS[args.command].flags) - {"help"})
    if unused:
        raise cli.UsageError(f"{', '.join('--' + f for f in unused)} "
                             f"{'is not a flag' if len(unused) == 1 else 'are not flags'} of {args.command} (its flags: "
                             f"{', '.join('--' + f for f in COMMON + COMMANDS[args.command].flags)})")
    try:
        args.mesh = sharding.mesh_arg(args.mesh)
        args.overrides = [_override(t) for t in args.set or ()]
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if args.command == "unipic-to-orbax":
        args.release_config = _release_config(args.config, args.overrides, args.scan_layers)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli.wants_help(argv):
        print(help_text())
        return 0
    try:
        args = parse_args(argv)
    except cli.UsageError as e:
        return cli.report(PROG, e)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        distributed.initialize()
        mesh = sharding.make_mesh(args.mesh)  # e.g. axis sizes that do not match the devices
    except (ValueError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        if args.command == "hf-to-orbax":
            layers = {} if args.scan_layers is None else {"scan_layers": args.scan_layers}
            model = from_hf(args.src, mesh=mesh, dtype=args.dtype, **layers)
            out = checkpoint.save_model(args.dst, model, overwrite=args.overwrite)
        elif args.command == "orbax-to-hf":
            model = checkpoint.load_model(args.src, mesh=mesh, dtype=args.dtype)
            out = to_hf(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        elif args.command == "unipic-to-orbax":
            if (Path(args.dst) / "tokenizer").exists() and not args.overwrite:
                raise FileExistsError(f"{args.dst}/tokenizer already exists; pass --overwrite to replace it.")
            model = from_unipic(args.src, config=args.release_config, mesh=mesh, dtype=args.dtype,
                                llm_dir=args.llm_dir)
            out = checkpoint.save_model(args.dst, model, overwrite=args.overwrite)
            tok = copy_tokenizer(Path(args.llm_dir) if args.llm_dir else find_llm_dir(Path(args.src)), out)
            print(f"tokenizer: {tok or 'none found in the LLM folder; pass --tokenizer to generate'}")
        else:
            model = checkpoint.load_model(args.src, mesh=mesh, dtype=args.dtype)
            if checkpoint.kind_of_config(model.config) != "unipic":
                raise checkpoint.CheckpointError(f"{args.src} holds a {type(model.config).__name__}, not a UniPic")
            out = to_unipic(model, args.dst, overwrite=args.overwrite)
    except (ConversionError, checkpoint.CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
