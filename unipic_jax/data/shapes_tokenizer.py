"""A word-level tokenizer for the shapes world, so that demo models can have a tiny vocabulary.

The vocabulary is every word and punctuation mark of the shapes world's prompts, instructions,
questions and answers and of the release's prompt templates, plus the chat special tokens
(``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>``, ``<image>``) and ``[UNK]``.
Text is split on whitespace and punctuation (newlines carry no token), so the release's
templates (:mod:`unipic_jax.tokenizer`) work unchanged. It is a ``transformers``
``PreTrainedTokenizerFast``: ``save_pretrained`` / :func:`unipic_jax.tokenizer.load_tokenizer`
round-trip it like any other tokenizer.
"""

from __future__ import annotations

import os
import re

from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import shapes as world

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", tok_lib.IMAGE_TOKEN)
UNK = "[UNK]"
_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary(samples: int = 150) -> list[str]:
    """Every token the shapes world and the templates use (deterministic order)."""
    texts = [tok_lib.generation_prompt(None), tok_lib.generation_prompt("x"), tok_lib.edit_prompt(None),
             "system user assistant",
             " ".join(world.SHAPES), " ".join(world.plural(s) for s in world.SHAPES), " ".join(world.COLORS),
             " ".join(world.NUMBERS.values()), " ".join(world.RELATIONS), "left right top bottom above below"]
    for i in range(samples):
        for cat in world.CATEGORIES:
            texts.append(world.t2i_example(i, category=cat, sizes=((32, 32),))["prompt"])
        for kind in world.EDITS:
            texts.append(world.edit_example(i, kind=kind, sizes=((32, 32),))["instruction"])
        qa = world.qa_example(i, sizes=((32, 32),))
        texts += [qa["question"], qa["answer"]]
    words: list[str] = []
    seen = set(SPECIALS)
    for t in texts:
        for special in SPECIALS:
            t = t.replace(special, " ")
        for w in _WORD.findall(t):
            if w not in seen:
                seen.add(w)
                words.append(w)
    return sorted(words)


def build(path: str | os.PathLike | None = None):
    """The tokenizer (saved to ``path`` if given, for ``load_tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, UNK, *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=list(SPECIALS[1:]))
    if path is not None:
        tok.save_pretrained(os.fspath(path))
    return tok
