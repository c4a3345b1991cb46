"""The UniPic-1 composite: VAE + MAR + diffusion head + Qwen2 LLM (+ optional SigLIP2).

Latents are the VAE's scaled latents ``(B, h, w, C)``; image tokens are their pixels in raster
order (``L = h·w``); ``mask (B, L)`` is 1 where a token is masked (to be generated).

``encode_image(latents, mask)`` → ``(x_enc, z_enc)``: the MAR encoder output ``(B, S + L, W)``
(buffer first; masked slots zero) and ``z_enc = proj_in(x_enc)`` reordered to
``[image tokens | buffer]`` ``(B, L + S, D)``, the LLM's view of the image.

``condition(input_ids, attention_mask, latents, mask)`` → ``z (B, L, W)``, the diffusion
head's per-token condition: the LLM runs on ``[text | image tokens | buffer]`` with
``position_ids = cumsum(mask) − 1``; masked image slots are masked out of its attention
(equivalent to MAR dropping them, with static shapes); its last hidden states at the image
and buffer slots, buffer moved back first, go through ``proj_out`` and are ADDED to ``x_enc``;
the MAR decoder then gives ``z``. Text reaches MAR only this way.

``understand_logits(input_ids, attention_mask, latents)``: the release's understanding path:
``input_ids`` already hold the ``<image>`` id once per image token plus buffer (``L + S``
times, ``image_token_id`` = 151665 in the release); ``z_enc`` is written into those slots and
the LLM returns logits ``(B, T, V)``.

``t2i_loss`` is the text-to-image training loss (MAR's random masking, diffusion loss on the
masked tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax.models import diffloss as diffloss_lib
from unipic_jax.models import mar as mar_lib
from unipic_jax.models import qwen2, vae as vae_lib
from unipic_jax.models.layers import MLPProjector, PresetConfig
from unipic_jax.models.understanding import insert_image_embeddings


@dataclasses.dataclass(frozen=True)
class UniPicConfig(PresetConfig):
    llm: qwen2.Qwen2Config
    mar: mar_lib.MARConfig
    diffloss: diffloss_lib.DiffLossConfig
    vae: vae_lib.VAEConfig
    image_token_id: int = 151665

    def __post_init__(self):
        if self.diffloss.z_channels != self.mar.width or self.diffloss.in_channels != self.mar.token_dim:
            raise ValueError(f"diffloss (in {self.diffloss.in_channels}, z {self.diffloss.z_channels}) does not fit "
                             f"MAR (tokens {self.mar.token_dim}, width {self.mar.width})")
        if self.vae.embed_dim != self.mar.token_dim:
            raise ValueError(f"VAE latents have {self.vae.embed_dim} channels but MAR tokens {self.mar.token_dim}")


PRESETS = {
    "unipic_1_5b": UniPicConfig(
        llm=qwen2.Qwen2Config.preset("qwen2_5_1_5b"), mar=mar_lib.MARConfig.preset("huge"),
        diffloss=diffloss_lib.DiffLossConfig.preset("unipic"), vae=vae_lib.VAEConfig.preset("kl16"),
    ),
    "tiny": UniPicConfig(
        llm=qwen2.Qwen2Config.preset("tiny"), mar=mar_lib.MARConfig.preset("tiny"),
        diffloss=diffloss_lib.DiffLossConfig.preset("tiny"), vae=vae_lib.VAEConfig.preset("tiny"),
        image_token_id=1000,
    ),
}


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
        self.proj_out = MLPProjector(D, D, W, **kw)

    @staticmethod
    def _tokens(latents):
        if latents.ndim != 4:
            raise ValueError(f"Expected latents (B, h, w, C), got {latents.shape}")
        B, h, w, C = latents.shape
        return latents.reshape(B, h * w, C), (h, w)

    def encode_image(self, latents, mask=None):
        """``(x_enc (B, S+L, W), z_enc (B, L+S, D))``, see the module docstring."""
        tokens, shape = self._tokens(latents)
        x_enc = self.mar.encode(tokens, mask, image_shape=shape)
        S = self.config.mar.buffer_size
        z_enc = self.proj_in(x_enc)
        return x_enc, jnp.concatenate([z_enc[:, S:], z_enc[:, :S]], axis=1)

    def condition(self, input_ids, attention_mask, latents, mask, x_con=None):
        """Per-token diffusion conditions ``z (B, L, W)`` for a prompt and partly masked latents."""
        S = self.config.mar.buffer_size
        x_enc, z_enc = self.encode_image(latents, mask)
        B, L = mask.shape
        input_ids = jnp.asarray(input_ids, jnp.int32)
        text = self.llm.embedder(input_ids)
        full_mask = jnp.concatenate(
            [jnp.asarray(attention_mask, bool), ~mask.astype(bool), jnp.ones((B, S), bool)], axis=1)
        hidden, _ = self.llm.hidden_states(inputs_embeds=jnp.concatenate([text, z_enc.astype(text.dtype)], 1),
                                           attention_mask=full_mask)
        z_llm = hidden[:, -(L + S):]
        z_llm = jnp.concatenate([z_llm[:, L:], z_llm[:, :L]], axis=1)  # buffer back to the front
        x_enc = x_enc + self.proj_out(z_llm).astype(x_enc.dtype)
        return self.mar.decode(x_enc, mask, image_shape=latents.shape[1:3], x_con=x_con)

    def understand_logits(self, input_ids, attention_mask, latents):
        """LLM logits with the image written at the ``image_token_id`` slots (``L + S`` of them)."""
        _, z_enc = self.encode_image(latents)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        embeds = insert_image_embeddings(self.llm.embedder(input_ids), input_ids, z_enc, self.config.image_token_id)
        hidden, _ = self.llm.hidden_states(inputs_embeds=embeds, attention_mask=jnp.asarray(attention_mask))
        return self.llm.logits(hidden)

    def t2i_loss(self, input_ids, attention_mask, latents, key):
        """Text-to-image loss: a random MAR mask, the diffusion loss on the masked tokens."""
        tokens, _ = self._tokens(latents)
        B, L, C = tokens.shape
        k_mask, k_loss = jax.random.split(key)
        mask = mar_lib.training_mask(k_mask, B, L, self.config.mar.mask_ratio_min)
        z = self.condition(input_ids, attention_mask, latents, mask)
        return self.diffloss.loss(tokens.reshape(B * L, C), z.reshape(B * L, -1), mask.reshape(B * L), k_loss)
