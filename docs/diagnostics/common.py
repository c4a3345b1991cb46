"""What the diagnostics that read a trained model share: the ``--checkpoint`` / ``--tokenizer``
flags and loading both (the tokenizer defaults to the folder next to the checkpoint, where
``train.py`` puts it)."""

from __future__ import annotations

from pathlib import Path

from absl import flags

from unipic_jax import checkpoint
from unipic_jax import tokenizer as tok_lib


def define_checkpoint_flags() -> None:
    """Defines the required ``--checkpoint`` and the optional ``--tokenizer`` on absl's ``FLAGS``."""
    flags.DEFINE_string("checkpoint", None, "a model checkpoint (e.g. runs/demo/model); required")
    flags.DEFINE_string("tokenizer", None, "default: the tokenizer folder next to the checkpoint")
    flags.mark_flag_as_required("checkpoint")


def load_checkpoint(args):
    """``(model, tokenizer)`` from the flags ``args.checkpoint`` and ``args.tokenizer``."""
    tok_dir = args.tokenizer or Path(args.checkpoint).resolve().parent / "tokenizer"
    return checkpoint.load_model(args.checkpoint), tok_lib.load_tokenizer(tok_dir)
