"""Image understanding through SigLIP2: vision tower → ``siglip2_proj`` → the Qwen2 decoder.

The path the UniPic-1 report describes (the release ships the weights but never calls
them). For an image and a prompt holding one ``<image>`` token:

1. the vision tower encodes the image into ``N`` tokens (NaFlex: ``max_patches`` slots of
   which ``rows·cols`` are real; fixed: ``(image_size/patch)²``), and ``siglip2_proj``
   (Linear–SiLU–Linear, 1152→1536→1536 at full size) maps them to the LLM width;
2. ``<image>`` is expanded to ``N`` copies (:func:`unipic_jax.tokenizer.expand_image_tokens`),
   and the image embeddings are written, in order, into those positions of the prompt's
   embeddings; padding patches are masked out of the LLM's attention (positions are
   ``cumsum(mask) - 1``, so they take no position either);
3. the decoder answers from these ``inputs_embeds`` with its KV cache (greedy by default).

:func:`understanding_loss` is the training objective: cross-entropy on answer tokens only,
with the gradient into the visual features scaled (0.1 in UniPic's recipe).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unipic_jax import sharding
from unipic_jax import tokenizer as tok_lib
from unipic_jax.models import qwen2, siglip2
from unipic_jax.models.layers import MLPProjector


@dataclasses.dataclass(frozen=True)
class UnderstandingConfig:
    llm: qwen2.Qwen2Config
    vision: siglip2.SiglipConfig
    proj_hidden: int | None = None  # default: the LLM width
    image_token_id: int = 151665  # "<image>" added to the Qwen2.5 tokenizer (the release's id)
    visual_grad_scale: float = 1.0  # gradient multiplier into the image features (UniPic trains with 0.1)


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward; multiplies the gradient by ``scale``."""
    if scale == 1.0:
        return x
    return x * scale + jax.lax.stop_gradient(x) * (1.0 - scale)


def insert_image_embeddings(text_embeds, input_ids, image_embeds, image_token_id):
    """Writes ``image_embeds (B, N, D)`` into the positions of ``input_ids`` equal to
    ``image_token_id`` (row ``b`` must hold exactly ``N`` of them), in order."""
    is_image = input_ids == image_token_id
    idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, idx[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class SiglipUnderstanding(nnx.Module):
    def __init__(self, cfg: UnderstandingConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision = siglip2.SiglipVision(cfg.vision, rngs=rngs)
        self.siglip2_proj = MLPProjector(
            cfg.vision.hidden_size, cfg.proj_hidden or cfg.llm.hidden_size, cfg.llm.hidden_size,
            dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype, rngs=rngs,
        )
        self.llm = qwen2.Qwen2(cfg.llm, rngs=rngs)

    def image_embeddings(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None) -> jax.Array:
        """``(B, N, D_llm)`` image tokens (the vision tower's last hidden state, projected)."""
        hidden, _ = self.vision(pixel_values, pixel_attention_mask, spatial_shapes)
        return scale_gradient(self.siglip2_proj(hidden), self.config.visual_grad_scale)

    def embed(self, input_ids, pixel_values, pixel_attention_mask=None, spatial_shapes=None) -> jax.Array:
        """The prompt's ``inputs_embeds (B, T, D)`` with the image written at its ``<image>`` slots."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        image = self.image_embeddings(pixel_values, pixel_attention_mask, spatial_shapes)
        return insert_image_embeddings(self.llm.embedder(input_ids), input_ids, image, self.config.image_token_id)

    def __call__(self, input_ids, attention_mask, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        """Logits ``(B, T, V)`` float32. ``attention_mask`` must already mask padding patches'
        slots (see :func:`build_prompts`)."""
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
        hidden, _ = self.llm.hidden_states(inputs_embeds=embeds, attention_mask=jnp.asarray(attention_mask))
        return self.llm.logits(hidden)

    def generate(self, input_ids, attention_mask, pixel_values, pixel_attention_mask=None, spatial_shapes=None,
                 **generate_kwargs) -> jax.Array:
        """New token ids ``(B, max_new_tokens)`` answering each prompt (see ``Qwen2.generate``)."""
        graphdef, state = nnx.split(self)
        embeds = sharding.on_params_mesh(state, _embed, graphdef, state, input_ids, pixel_values,
                                         pixel_attention_mask, spatial_shapes)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, input_ids, pixel_values, pixel_attention_mask, spatial_shapes):
    return nnx.merge(graphdef, state).embed(input_ids, pixel_values, pixel_attention_mask, spatial_shapes)


def understanding_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over answer tokens: ``logits[:, t]`` predicts
    ``labels[:, t + 1]``; labels < 0 (prompt, image, padding) are ignored."""
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def build_prompts(tokenizer, questions, image_masks, answers=None, max_length: int | None = None):
    """Token ids, attention mask and labels for understanding prompts, right-padded.

    ``image_masks (B, N)``: which of each image's ``N`` slots hold real patches. Each
    question becomes ``chat("<image>\\n{question}")`` with ``<image>`` expanded to ``N``
    slots; with ``answers`` the answer and ``<|im_end|>`` follow and are the only labelled
    tokens (labels elsewhere are -100).
    """
    image_id = tok_lib.image_token_id(tokenizer)
    image_masks = np.asarray(image_masks).astype(bool)
    rows, masks, labels = [], [], []
    for b, q in enumerate(questions):
        ids = tokenizer(tok_lib.understanding_prompt(q), add_special_tokens=False).input_ids
        if ids.count(image_id) != 1:
            raise ValueError(f"An understanding prompt needs exactly one {tok_lib.IMAGE_TOKEN}; question {b} has "
                             f"{ids.count(image_id)}")
        ids = tok_lib.expand_image_tokens(ids, image_id, image_masks.shape[1])
        mask = np.ones(len(ids), bool)
        start = ids.index(image_id)
        mask[start:start + image_masks.shape[1]] = image_masks[b]
        lab = [-100] * len(ids)
        if answers is not None:
            ans = tokenizer(answers[b] + tok_lib.ANSWER_SUFFIX, add_special_tokens=False).input_ids
            ids, lab, mask = ids + ans, lab + ans, np.concatenate([mask, np.ones(len(ans), bool)])
        rows.append(ids)
        masks.append(mask)
        labels.append(lab)
    T = max_length or max(len(r) for r in rows)
    if any(len(r) > T for r in rows):
        raise ValueError(f"A prompt is longer than max_length={T}; raise it or shorten the question.")
    pad = tokenizer.pad_token_id
    out_ids = np.full((len(rows), T), pad, np.int32)
    out_mask = np.zeros((len(rows), T), bool)
    out_labels = np.full((len(rows), T), -100, np.int32)
    for b, (r, m, lab) in enumerate(zip(rows, masks, labels)):
        out_ids[b, : len(r)], out_mask[b, : len(r)], out_labels[b, : len(r)] = r, m, lab
    return out_ids, out_mask, out_labels


def preprocess(cfg: siglip2.SiglipConfig, images) -> tuple[Any, Any, Any]:
    """Images → the vision tower's inputs, matching the Hugging Face processors."""
    from unipic_jax.data import image as image_lib

    if cfg.naflex:
        return image_lib.siglip_naflex(images, patch=cfg.patch_size, max_patches=cfg.num_patches)
    pv = image_lib.siglip_fixed(images, size=cfg.image_size)
    return pv, np.ones((len(pv), cfg.num_patches), np.int32), None


def answer(model: SiglipUnderstanding, tokenizer, image, question: str, max_new_tokens: int = 64) -> str:
    """Answers a question about one image (PIL image, array or path), greedily."""
    return answer_batch(model, tokenizer, [image], [question], max_new_tokens)[0]


def answer_batch(model: SiglipUnderstanding, tokenizer, images, questions, max_new_tokens: int = 64) -> list[str]:
    from unipic_jax.data import image as image_lib

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tok_id = tok_lib.image_token_id(tokenizer)
    if tok_id != model.config.image_token_id:
        raise ValueError(f"The tokenizer's {tok_lib.IMAGE_TOKEN} id is {tok_id} but the model expects "
                         f"{model.config.image_token_id}; build the model with image_token_id={tok_id}.")
    images = [image_lib.load_image(im) if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__") else im
              for im in images]
    pv, pmask, shapes = preprocess(model.config.vision, images)
    ids, mask, _ = build_prompts(tokenizer, questions, pmask)
    new = model.generate(ids, mask, pv, pmask, shapes, max_new_tokens=max_new_tokens,
                         eos_token_id=tok_lib.stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in np.asarray(new)]
