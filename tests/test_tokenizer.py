"""Tokenizer loading and the UniPic prompt templates, with the real Qwen2 tokenizer files."""

import numpy as np
import pytest

from unipic_jax import tokenizer as T


def test_templates_match_the_release():
    assert T.generation_prompt("a red cube") == (
        "<|im_start|>user\nGenerate an image: a red cube<|im_end|>\n<|im_start|>assistant\n"
    )
    assert T.generation_prompt(None) == "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
    assert T.edit_prompt("make it blue") == "<|im_start|>user\n<image>\nmake it blue<|im_end|>\n<|im_start|>assistant\n"
    assert T.edit_prompt(None) == "<|im_start|>user\n<image>\nRepeat this image.<|im_end|>\n<|im_start|>assistant\n"
    assert T.understanding_prompt("What colour?").startswith("<|im_start|>user\n<image>\nWhat colour?")
    assert T.chat("hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_tokenizer_gets_image_token_inside_embedding(qwen_tokenizer_dir):
    tok = T.load_tokenizer(qwen_tokenizer_dir)
    image_id = T.image_token_id(tok)
    assert image_id == len(tok) - 1 == 151669 and image_id < 151936  # fits the embedding rows, no resize
    ids = tok(T.edit_prompt("flip it")).input_ids
    assert ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
    assert ids.count(image_id) == 1
    assert set(T.stop_token_ids(tok)) == {151645, 151643}
    expanded = T.expand_image_tokens(ids, image_id, 5)
    assert len(expanded) == len(ids) + 4 and expanded.count(image_id) == 5


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_pads_on_the_chosen_side(qwen_tokenizer_dir, side):
    tok = T.load_tokenizer(qwen_tokenizer_dir, padding_side=side)
    texts = [T.generation_prompt("a small green triangle above a circle"), T.generation_prompt(None)]
    ids, mask = T.encode(tok, texts)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    short = mask[1]
    assert (short[: short.sum()].all() if side == "right" else short[-short.sum():].all())
    ids, mask = T.encode(tok, texts, max_length=64)
    assert ids.shape == (2, 64)
    assert tok.decode(ids[0][mask[0]]) == texts[0]


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="only read from disk"):
        T.load_tokenizer(tmp_path / "nope")
