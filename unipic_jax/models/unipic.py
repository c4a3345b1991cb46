"""The UniPic-1 composite: VAE + MAR + diffusion head + Qwen2 LLM (+ optional SigLIP2).

Latents are the VAE's scaled latents ``(B, h, w, C)``; image tokens are their pixels in raster
order (``L = h·w``); ``mask (B, L)`` is 1 where a token is masked (to be generated).

``encode_image(latents, mask)`` → ``(x_enc, z_enc)``: the MAR encoder output ``(B, S + L, W)``
(buffer first; masked slots zero) and ``z_enc = proj_in(x_enc)`` reordered to
``[image tokens | buffer]`` ``(B, L + S, D)``, the LLM's view of the image.

``condition(input_ids, attention_mask, latents, mask, x_con)`` → ``z (B, L, W)``, the
diffusion head's per-token condition: the LLM runs on ``[prompt | image tokens | buffer]``
with ``position_ids = cumsum(mask) − 1``; masked image slots are masked out of its attention
(equivalent to MAR dropping them, with static shapes; training passes ``keep``, the visible
slots, so the encoder and the LLM run on those alone); its last hidden states at the image
and buffer slots, buffer moved back first, go through ``proj_out`` and are ADDED to ``x_enc``;
the MAR decoder then gives ``z`` (for editing, ``x_con``, the source image's unmasked encoder
output, fills the masked slots instead of ``mask_token``). Text reaches MAR only this way.
The prompt may be given as ``inputs_embeds`` (an editing prompt holds the source image, see
``embed_prompt``), or as a :class:`PromptCache` from ``prefill`` — the prompt's KV cache,
computed once and reused at every sampling iteration.

``understand_logits(input_ids, attention_mask, latents)``: the release's understanding path:
``input_ids`` already hold the ``<image>`` id once per image token plus buffer (``L + S``
times, ``image_token_id`` = 151665 in the release); ``z_enc`` is written into those slots and
the LLM returns logits ``(B, T, V)``. With ``understanding="siglip2"`` (and a ``vision``
config) the image comes from the SigLIP2 tower through ``siglip2_proj`` instead, as the
report describes (``pixel_values`` etc. as in :mod:`unipic_jax.models.understanding`).

Training losses: ``t2i_loss`` (MAR's random masking, diffusion loss on the masked tokens),
``edit_loss`` (the same on the target image, with the source image in the prompt and in
``x_con``) and ``understanding_loss`` (cross-entropy on answer tokens). Gradients into image
features used as LLM input (and into ``x_con``) are scaled by ``visual_grad_scale`` (0.1).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax import sharding
from unipic_jax.models import diffloss as diffloss_lib
from unipic_jax.models import mar as mar_lib
from unipic_jax.models import qwen2, siglip2
from unipic_jax.models import vae as vae_lib
from unipic_jax.models.layers import MLPProjector, PresetConfig
from unipic_jax.models.understanding import insert_image_embeddings, scale_gradient, understanding_loss

UNDERSTANDING_PATHS = ("mar", "siglip2")


@dataclasses.dataclass(frozen=True)
class UniPicConfig(PresetConfig):
    llm: qwen2.Qwen2Config
    mar: mar_lib.MARConfig
    diffloss: diffloss_lib.DiffLossConfig
    vae: vae_lib.VAEConfig
    vision: siglip2.SiglipConfig | None = None  # the SigLIP2 tower (+ siglip2_proj), if held
    understanding: str = "mar"  # image features for understanding: "mar" (as released) or "siglip2"
    image_token_id: int = 151665
    visual_grad_scale: float = 0.1  # gradient multiplier into image features fed to the LLM
    # start the LLM -> MAR residual (proj_out's last layer) at zero, so a model trained from
    # scratch begins as a plain MAR and lets the LLM's features in as they become useful
    zero_init_proj_out: bool = False

    def __post_init__(self):
        if self.diffloss.z_channels != self.mar.width or self.diffloss.in_channels != self.mar.token_dim:
            raise ValueError(f"diffloss (in {self.diffloss.in_channels}, z {self.diffloss.z_channels}) does not fit "
                             f"MAR (tokens {self.mar.token_dim}, width {self.mar.width})")
        if self.vae.embed_dim != self.mar.token_dim:
            raise ValueError(f"VAE latents have {self.vae.embed_dim} channels but MAR tokens {self.mar.token_dim}")
        if self.understanding not in UNDERSTANDING_PATHS:
            raise ValueError(f"understanding={self.understanding!r}; choose from {UNDERSTANDING_PATHS}")
        if self.understanding == "siglip2" and self.vision is None:
            raise ValueError("understanding='siglip2' needs a vision config (e.g. SiglipConfig.preset('tiny'))")

    def with_dtype(self, dtype, param_dtype=None) -> "UniPicConfig":
        """Every part computing in ``dtype``, parameters stored in ``param_dtype`` (default: same)."""
        kw = dict(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype or dtype).name)
        return dataclasses.replace(
            self, llm=self.llm.replace(**kw), mar=self.mar.replace(**kw), diffloss=self.diffloss.replace(**kw),
            vae=self.vae.replace(**kw), vision=self.vision.replace(**kw) if self.vision is not None else None)


_TINY = UniPicConfig(
    llm=qwen2.Qwen2Config.preset("tiny"), mar=mar_lib.MARConfig.preset("tiny"),
    diffloss=diffloss_lib.DiffLossConfig.preset("tiny"), vae=vae_lib.VAEConfig.preset("tiny"),
    image_token_id=1000,
)
PRESETS = {
    "unipic_1_5b": UniPicConfig(
        llm=qwen2.Qwen2Config.preset("qwen2_5_1_5b"), mar=mar_lib.MARConfig.preset("huge"),
        diffloss=diffloss_lib.DiffLossConfig.preset("unipic"), vae=vae_lib.VAEConfig.preset("kl16"),
    ),
    "unipic_1_5b_siglip2": UniPicConfig(
        llm=qwen2.Qwen2Config.preset("qwen2_5_1_5b"), mar=mar_lib.MARConfig.preset("huge"),
        diffloss=diffloss_lib.DiffLossConfig.preset("unipic"), vae=vae_lib.VAEConfig.preset("kl16"),
        vision=siglip2.SiglipConfig.preset("so400m_patch16_512"), understanding="siglip2",
    ),
    "tiny": _TINY,
    "tiny_siglip2": _TINY.replace(vision=siglip2.SiglipConfig.preset("tiny"), understanding="siglip2"),
}


class PromptCache(NamedTuple):
    """The prompt's KV cache, sized for ``prompt + L + S`` slots (the image slots are
    rewritten, and the result thrown away, at every ``condition`` call)."""

    kv: qwen2.KVCache
    prompt_len: jax.Array  # (B,) real prompt tokens per row: the first image position


class UniPic(nnx.Module):
    def __init__(self, cfg: UniPicConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D, W = cfg.llm.hidden_size, cfg.mar.width
        kw = dict(dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype, rngs=rngs)
        self.vae = vae_lib.AutoencoderKL(cfg.vae, rngs=rngs)
        self.mar = mar_lib.MAR(cfg.mar, rngs=rngs)
        self.diffloss = diffloss_lib.DiffLoss(cfg.diffloss, rngs=rngs)
        self.llm = qwen2.Qwen2(cfg.llm, rngs=rngs)
        self.proj_in = MLPProjector(W, D, D, **kw)
        self.proj_out = MLPProjector(D, D, W, out_kernel_init="zeros" if cfg.zero_init_proj_out else None, **kw)
        if cfg.vision is not None:
            self.siglip2 = siglip2.SiglipVision(cfg.vision, rngs=rngs)
            self.siglip2_proj = MLPProjector(cfg.vision.hidden_size, D, D, **kw)

    @staticmethod
    def _tokens(latents):
        if latents.ndim != 4:
            raise ValueError(f"Expected latents (B, h, w, C), got {latents.shape}")
        B, h, w, C = latents.shape
        return latents.reshape(B, h * w, C), (h, w)

    # -- the stages ------------------------------------------------------------------------

    def encode_image(self, latents, mask=None, keep=None):
        """``(x_enc (B, S+L, W), z_enc (B, L+S, D))``, see the module docstring; with ``keep
        (B, K)`` only those tokens (``S+K`` and ``K+S`` slots, see ``MAR.encode``)."""
        tokens, shape = self._tokens(latents)
        x_enc = self.mar.encode(tokens, mask, image_shape=shape, keep=keep)
        S = self.config.mar.buffer_size
        z_enc = self.proj_in(x_enc)
        return x_enc, jnp.concatenate([z_enc[:, S:], z_enc[:, :S]], axis=1)

    def image_context(self, latents):
        """A source image as context (editing, understanding): ``(x_con, z_enc)`` from the
        unmasked encoder, with gradients scaled by ``visual_grad_scale``."""
        x_con, z_enc = self.encode_image(latents)
        g = self.config.visual_grad_scale
        return scale_gradient(x_con, g), scale_gradient(z_enc, g)

    def embed_prompt(self, input_ids, image_embeds=None):
        """Prompt embeddings ``(B, T, D)``; ``image_embeds (B, N, D)`` are written, in order,
        at the ``image_token_id`` slots (each row must hold exactly ``N`` of them)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        embeds = self.llm.embedder(input_ids)
        if image_embeds is None:
            return embeds
        return insert_image_embeddings(embeds, input_ids, image_embeds, self.config.image_token_id)

    def prefill(self, inputs_embeds, attention_mask, image_shape: tuple[int, int]) -> PromptCache:
        """Runs the prompt once and keeps its KV cache, with room for an ``image_shape`` grid."""
        B, T = attention_mask.shape
        size = T + image_shape[0] * image_shape[1] + self.config.mar.buffer_size
        attention_mask = jnp.asarray(attention_mask, bool)
        _, kv = self.llm.hidden_states(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       cache=qwen2.KVCache.zeros(self.config.llm, B, size), write_index=0)
        return PromptCache(kv, jnp.sum(attention_mask, axis=1).astype(jnp.int32))

    def condition(self, input_ids=None, attention_mask=None, latents=None, mask=None, x_con=None, *,
                  inputs_embeds=None, cache: PromptCache | None = None, keep=None):
        """Per-token diffusion conditions ``z (B, L, W)`` for a prompt (``input_ids`` or
        ``inputs_embeds`` with ``attention_mask``, or a ``cache`` from ``prefill``) and
        partly masked latents.

        ``keep (B, K)``, from ``mar.visible_first(mask, K)`` with every visible token among
        them: the encoder and the LLM run on those ``K`` image slots only, not all ``L`` (the
        same result; training uses it, as MAR drops the masked tokens)."""
        S = self.config.mar.buffer_size
        if mask is None:
            raise ValueError("condition needs mask (B, L): 1 where a token is to be generated")
        if keep is not None and cache is not None:
            raise ValueError("keep is for a full forward pass; the cached sampling path runs every slot")
        x_enc, z_enc = self.encode_image(latents, mask, keep)
        B, L = mask.shape
        visible = ~mask.astype(bool)
        if keep is not None:
            visible = jnp.take_along_axis(visible, keep, axis=1)
        image_mask = jnp.concatenate([visible, jnp.ones((B, S), bool)], axis=1)
        if cache is not None:
            T = cache.kv.valid.shape[1] - (L + S)
            if T < 0:
                raise ValueError(f"The prompt cache has {cache.kv.valid.shape[1]} slots, too few for {L}+{S} tokens")
            pos = cache.prompt_len[:, None] + jnp.maximum(jnp.cumsum(image_mask, axis=1) - 1, 0)
            hidden, _ = self.llm.hidden_states(inputs_embeds=z_enc, attention_mask=image_mask, position_ids=pos,
                                               cache=cache.kv, write_index=T)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.embed_prompt(input_ids)
            full_mask = jnp.concatenate([jnp.asarray(attention_mask, bool), image_mask], axis=1)
            hidden, _ = self.llm.hidden_states(
                inputs_embeds=jnp.concatenate([inputs_embeds, z_enc.astype(inputs_embeds.dtype)], 1),
                attention_mask=full_mask)
        K = image_mask.shape[1] - S
        z_llm = hidden[:, -(K + S):]
        z_llm = jnp.concatenate([z_llm[:, K:], z_llm[:, :K]], axis=1)  # buffer back to the front
        # batch-sharded here and after the scatter below: without it, once the diffusion head keeps its
        # tokens batch-sharded, XLA 0.10.2's partitioner emits an invalid gather for the scatter's transpose
        rows = ("batch", "length", "act_embed")
        x_enc = sharding.constrain(x_enc + self.proj_out(z_llm).astype(x_enc.dtype), rows)
        if keep is not None:  # back to all L slots; the others are masked, and decode refills them
            image = jnp.zeros((B, L, x_enc.shape[-1]), x_enc.dtype)
            image = image.at[jnp.arange(B)[:, None], keep].set(x_enc[:, S:])
            x_enc = sharding.constrain(jnp.concatenate([x_enc[:, :S], image], axis=1), rows)
        return self.mar.decode(x_enc, mask, image_shape=latents.shape[1:3], x_con=x_con)

    def siglip_embeddings(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        """``(B, N, D)`` SigLIP2 image tokens through ``siglip2_proj`` (gradient-scaled)."""
        if self.config.vision is None:
            raise ValueError("This UniPic has no SigLIP2 tower; build it with a vision config.")
        hidden, _ = self.siglip2(pixel_values, pixel_attention_mask, spatial_shapes)
        return scale_gradient(self.siglip2_proj(hidden), self.config.visual_grad_scale)

    def understanding_embeds(self, input_ids, latents=None, pixel_values=None, pixel_attention_mask=None,
                             spatial_shapes=None):
        """The prompt's embeddings with the image at its slots, by ``config.understanding``:
        ``"mar"`` takes VAE ``latents`` (``L + S`` slots), ``"siglip2"`` takes ``pixel_values``."""
        if self.config.understanding == "siglip2":
            if pixel_values is None:
                raise ValueError("understanding='siglip2' needs pixel_values (see understanding.preprocess)")
            image = self.siglip_embeddings(pixel_values, pixel_attention_mask, spatial_shapes)
        else:
            if latents is None:
                raise ValueError("understanding='mar' needs the image's VAE latents (B, h, w, C)")
            image = self.image_context(latents)[1]
        return self.embed_prompt(input_ids, image)

    def understand_logits(self, input_ids, attention_mask, latents=None, *, pixel_values=None,
                          pixel_attention_mask=None, spatial_shapes=None):
        """LLM logits ``(B, T, V)`` with the image written at the ``image_token_id`` slots."""
        embeds = self.understanding_embeds(input_ids, latents, pixel_values, pixel_attention_mask, spatial_shapes)
        hidden, _ = self.llm.hidden_states(inputs_embeds=embeds, attention_mask=jnp.asarray(attention_mask))
        return self.llm.logits(hidden)

    # -- training losses -------------------------------------------------------------------

    def _generation_loss(self, latents, key, x_con=None, **prompt):
        tokens, _ = self._tokens(latents)
        B, L, C = tokens.shape
        k_mask, k_loss = jax.random.split(key)
        mask = mar_lib.training_mask(k_mask, B, L, self.config.mar.mask_ratio_min, self.config.mar.mask_ratio_std)
        K = mar_lib.max_visible(L, self.config.mar.mask_ratio_min)
        keep = mar_lib.visible_first(mask, K) if K < L else None
        z = self.condition(latents=latents, mask=mask, x_con=x_con, keep=keep, **prompt)
        return self.diffloss.loss(tokens.reshape(B * L, C), z.reshape(B * L, -1), mask.reshape(B * L), k_loss)

    def t2i_loss(self, input_ids, attention_mask, latents, key):
        """Text-to-image loss: a random MAR mask, the diffusion loss on the masked tokens."""
        return self._generation_loss(latents, key, input_ids=input_ids, attention_mask=attention_mask)

    def edit_loss(self, input_ids, attention_mask, source_latents, latents, key):
        """Editing loss: the source image's ``z_enc`` fills the prompt's ``<image>`` slots
        (``L + S`` of them) and its ``x_con`` the decoder's masked slots; the target
        ``latents`` are masked and denoised as in ``t2i_loss``."""
        x_con, z_src = self.image_context(jax.lax.stop_gradient(source_latents))
        embeds = self.embed_prompt(input_ids, z_src)
        return self._generation_loss(latents, key, x_con=x_con, inputs_embeds=embeds, attention_mask=attention_mask)

    def understanding_loss(self, input_ids, attention_mask, labels, latents=None, **siglip_inputs):
        """Cross-entropy on the answer tokens (``labels >= 0``); image as in ``understand_logits``."""
        logits = self.understand_logits(input_ids, attention_mask, latents, **siglip_inputs)
        return understanding_loss(logits, labels)
