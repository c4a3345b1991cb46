"""Checkpoint conversion between PyTorch / Hugging Face and unipic-jax.

``from_hf(path, mesh=None, dtype=None)`` reads a Hugging Face folder into an NNX model;
``to_hf(model, path)`` writes one that ``transformers`` loads; ``from_unipic`` / ``to_unipic``
read and write the official UniPic-1 release layout. ``python -m unipic_jax.convert``
converts between Hugging Face folders and Orbax checkpoints from the command line.
"""

from unipic_jax.convert.hf import ConversionError, from_hf, to_hf
from unipic_jax.convert.release import from_unipic, to_unipic

__all__ = ["ConversionError", "from_hf", "from_unipic", "to_hf", "to_unipic"]
