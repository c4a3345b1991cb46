"""Command line: generate, edit and describe images with a UniPic checkpoint.

    python -m unipic_jax.generate --checkpoint CKPT --prompt "a red circle" --out a.png
    python -m unipic_jax.generate --checkpoint CKPT --edit src.png --instruction "make it blue" --out b.png
    python -m unipic_jax.generate --checkpoint CKPT --describe img.png --question "What is shown?"

``CKPT`` is an Orbax checkpoint written by ``python -m unipic_jax.convert unipic-to-orbax``
or by training, or the release folder itself (``pytorch_model.bin``, ``kl16.ckpt`` and the
Qwen2.5 folder, converted on the fly). The tokenizer is read from ``--tokenizer``, else
``CKPT/tokenizer/``, else the release's Qwen2.5 folder. Several ``--prompt`` (or ``--seed``
with ``--num_images``) give several images: ``a.png`` becomes ``a_0.png``, ``a_1.png``, ...
Defaults follow the release scripts: 1024×1024 pixels for generation and editing, 512 for
understanding, 32 iterations, CFG 3.0 (constant), temperature 1.0 (0.85 for editing).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from absl import flags

from unipic_jax import checkpoint, cli, distributed, sharding


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"--size takes N or HxW (pixels), got {text!r}") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"--size takes N or HxW (pixels), got {text!r}")
    return (parts[0], parts[-1])


def find_tokenizer(ckpt: Path, given: str | None) -> Path:
    """``--tokenizer``, else ``CKPT/tokenizer``, else a subfolder of ``CKPT`` with tokenizer files."""
    if given:
        return Path(given)
    candidates = [ckpt / "tokenizer"] + sorted(p for p in ckpt.iterdir() if p.is_dir())
    for c in candidates:
        if (c / "tokenizer_config.json").exists() or (c / "tokenizer.json").exists():
            return c
    raise FileNotFoundError(f"No tokenizer found in {ckpt}/tokenizer or its subfolders; pass --tokenizer DIR "
                            "(the Qwen2.5-1.5B-Instruct folder).")


def load(ckpt: Path, mesh=None, dtype=None, config: str | None = None):
    """A UniPic model from an Orbax checkpoint or a release folder."""
    from unipic_jax.convert.release import from_unipic

    if (ckpt / checkpoint.CONFIG).exists() or (ckpt / checkpoint.PARAMS).exists():
        model = checkpoint.load_model(ckpt, mesh=mesh, dtype=dtype)
        if checkpoint.kind_of_config(model.config) != "unipic":
            raise checkpoint.CheckpointError(f"{ckpt} holds a {type(model.config).__name__}, not a UniPic model")
        return model
    if (ckpt / "kl16.ckpt").exists():
        return from_unipic(ckpt, config=config, mesh=mesh, dtype=dtype)
    raise FileNotFoundError(f"{ckpt} is neither a unipic-jax checkpoint (config.json + params/) nor a UniPic-1 "
                            "release folder (pytorch_model.bin + kl16.ckpt).")


def _outputs(out: str, n: int) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out!r}")
    return [p] if n == 1 else [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


PROG = "python -m unipic_jax.generate"
FLAGS = flags.FlagValues()  # this module's own flags (not absl's global FLAGS: --checkpoint, --mesh ... clash)
cli.define_help(FLAGS)
flags.DEFINE_string("checkpoint", None, "Orbax UniPic checkpoint or UniPic-1 release folder", flag_values=FLAGS)
# the task: exactly one of --prompt, --edit, --describe (checked by parse_args)
flags.DEFINE_multi_string("prompt", None, "text-to-image prompt (repeatable)", flag_values=FLAGS)
flags.DEFINE_string("edit", None, "source image to edit (with --instruction)", flag_values=FLAGS)
flags.DEFINE_string("describe", None, "image to answer --question about", flag_values=FLAGS)
flags.DEFINE_string("instruction", None, "editing instruction", flag_values=FLAGS)
flags.DEFINE_string("question", "Describe this image.", "question for --describe", flag_values=FLAGS)
flags.DEFINE_string("out", "out.png", "output PNG (several images: out_0.png, out_1.png, ...)", flag_values=FLAGS)
flags.DEFINE_integer("num_images", 1, "images per prompt, each with its own seed", flag_values=FLAGS)
flags.DEFINE_string("size", None, "image size in pixels: N or HxW (default 1024; 512 for --describe)",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_iter", 32, "MAR sampling iterations (default 32)", flag_values=FLAGS)
flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale; 1 disables (default 3)", flag_values=FLAGS)
flags.DEFINE_enum("cfg_schedule", "constant", ["constant", "linear"],
                  "guidance over the sampling steps: constant, or linear from 1 (MAR's)", flag_values=FLAGS)
flags.DEFINE_float("temperature", None, "sampling temperature (default 1.0; 0.85 for editing)", flag_values=FLAGS)
flags.DEFINE_float("xt_temperature", 1.0, "scale of the diffusion head's starting noise x_T (default 1)",
                  flag_values=FLAGS)
flags.DEFINE_float("ddim_after", None, "decode the tokens of MAR steps whose visible fraction is at least this with "
                   "DDIM (eta 0); default off (the release's sampler)", flag_values=FLAGS)
flags.DEFINE_float("ddim_xt_scale", 1.0, "scale of x_T for the --ddim_after steps (default 1)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed (image i of each prompt uses seed + i)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 128, "answer length limit for --describe", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: CKPT/tokenizer or the Qwen folder)",
                    flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "compute/parameter dtype, e.g. bfloat16 (default: as stored)", flag_values=FLAGS)
flags.DEFINE_string("config", None, "UniPicConfig preset for a release folder (default unipic_1_5b)",
                    flag_values=FLAGS)
flags.DEFINE_string("mesh", "data=1,fsdp=-1", "mesh axis sizes (default data=1,fsdp=-1)", flag_values=FLAGS)


def help_text() -> str:
    return f"{__doc__.rstrip()}\n\nusage: {PROG} --checkpoint CKPT (--prompt P ... | --edit SRC " \
           f"--instruction I | --describe IMG) [flags]\n\nflags:\n{cli.flag_help(FLAGS)}\n"


def parse_args(argv: list[str]) -> SimpleNamespace:
    """The flags of ``argv`` (without the program name) as a namespace; raises :class:`cli.UsageError`."""
    rest, args, _ = cli.parse(FLAGS, PROG, argv)
    if rest:
        raise cli.UsageError(f"unexpected arguments {rest} (every setting is a --flag)")
    if args.checkpoint is None:
        raise cli.UsageError("--checkpoint is required")
    tasks = [f"--{t}" for t in ("prompt", "edit", "describe") if getattr(args, t) is not None]
    if len(tasks) != 1:
        raise cli.UsageError("one of --prompt, --edit, --describe is required" if not tasks else
                             f"{' and '.join(tasks)} cannot be combined: pass one of --prompt, --edit, --describe")
    if args.edit and not args.instruction:
        raise cli.UsageError("--edit needs --instruction")
    if args.num_images < 1:
        raise cli.UsageError("--num_images must be >= 1")
    try:
        args.size = None if args.size is None else _size(args.size)
        args.mesh = sharding.mesh_arg(args.mesh)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
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

    from unipic_jax import sample
    from unipic_jax import tokenizer as tok_lib

    try:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--checkpoint {ckpt} is not a folder")
        tok = tok_lib.load_tokenizer(find_tokenizer(ckpt, args.tokenizer))
        distributed.initialize()  # several processes: JAX_COORDINATOR_ADDRESS etc. (docs/multihost.md)
        mesh = sharding.make_mesh(args.mesh)
        t0 = time.time()
        model = load(ckpt, mesh=mesh, dtype=args.dtype, config=args.config)
        print(f"loaded {ckpt} in {time.time() - t0:.1f}s", file=sys.stderr)
        size = args.size or ((512, 512) if args.describe else (1024, 1024))
        opts = dict(size=size, num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                    xt_temperature=args.xt_temperature, ddim_after=args.ddim_after,
                    ddim_xt_scale=args.ddim_xt_scale, progress=True)
        if args.describe:
            answer = sample.describe(model, tok, [args.describe], [args.question], size=size,
                                     max_new_tokens=args.max_new_tokens)[0]
            if distributed.is_main():
                print(answer)
            return 0
        images = []
        for i in range(args.num_images):
            if args.edit:
                images.extend(sample.edit(model, tok, [args.edit], [args.instruction], seed=args.seed + i,
                                          temperature=0.85 if args.temperature is None else args.temperature,
                                          **opts))
            else:
                images.extend(sample.text_to_image(model, tok, args.prompt, seed=args.seed + i,
                                                   temperature=1.0 if args.temperature is None else args.temperature,
                                                   **opts))
        if distributed.is_main():  # every process computed the same images
            for path in sample.save_png(images, _outputs(args.out, len(images))):
                print(path)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
