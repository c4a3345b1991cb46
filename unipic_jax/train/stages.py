"""Stages and the registry of stage kinds.

A run is a sequence of **stages** (``cfg.stage_order``, each ``cfg.stages[name]``). Every
stage sets what is trained (``trainable``: parameter-path prefixes, ``""`` = all; the rest gets
zero updates), its optimizer (lr, ``schedule`` constant/cosine, ``warmup`` fraction,
``weight_decay`` with the recipe's no-decay groups, AdamW β (0.9, 0.95), ``clip``,
``accumulate`` micro-batches per update), ``ema`` decay (0: none) and its data (``buckets``,
per-task ``batch_size``, ``max_text_len``, ``understanding_size``): progressive resolution is
a later stage with other buckets. ``steps`` counts optimizer updates; with ``accumulate = a``
a stage reads ``a · steps`` batches. Parameters carry over between stages; optimizer state
and EMA start afresh.

What a stage computes is its **kind**, an entry of :data:`KINDS` (:func:`register`):

* ``"vae"``: the tokenizer's loss (``recon`` L1 or L2 reconstruction + ``kl_weight`` · KL) on
  the text-to-image images; with ``calibrate_scale`` the latent scale is set afterwards to
  1 / std of the posterior means (:func:`calibrate_vae_scale`). With ``decoder_noise`` or
  ``decoder_swap`` it fine-tunes a decoder that tolerates imperfect latents instead
  (:func:`denoising_decoder_loss`, after l-DeTok, arXiv 2507.15856): the encoder frozen, so
  the latent space does not move, and only ``vae.decoder`` / ``vae.post_quant_conv`` trained;
* ``"unipic"``: ``loss_weights`` · (text-to-image diffusion loss, editing loss,
  understanding cross-entropy), the VAE frozen (its latents under ``stop_gradient``, scaled by
  the train state's ``vae_scale``).

A kind is its loss ``loss(model, stage, batch, key, state) → (total, parts)``, optionally its
own ``make_step`` (default :func:`unipic_jax.train.step.make_train_step`) and a ``finish`` hook
run after the stage's last update.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.data import pipeline as pipeline_lib
from unipic_jax.train import optim

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A stage kind: its loss, and optionally its own step builder and a hook after the stage."""

    name: str
    loss: Callable[..., tuple[jax.Array, dict]]
    make_step: Callable | None = None  # (graphdef, rest, stage, tx, seed) -> step; None: step.make_train_step
    finish: Callable | None = None  # (trainer, stage, params, pipeline) -> None


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"stage kind {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


@dataclasses.dataclass
class Stage:
    name: str
    kind: str
    steps: int
    lr: float
    trainable: tuple[str, ...] = ("",)
    schedule: str = "constant"
    warmup: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    accumulate: int = 1
    ema: float = 0.0
    kl_weight: float = 1e-6
    recon: str = "l1"  # vae stages: the pixel loss, "l1" (LDM) or "l2"
    calibrate_scale: bool = False  # vae stages: afterwards, set the latent scale to 1 / std(latents)
    decoder_noise: float = 0.0  # vae stages: the largest noise share tau of the denoising decoder's latents
    decoder_swap: float = 0.0  # vae stages: the share of tokens the denoising decoder sees swapped
    loss_weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"t2i": 1.0})
    data: pipeline_lib.PipelineConfig = dataclasses.field(default_factory=pipeline_lib.PipelineConfig)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.steps < 1 or self.accumulate < 1:
            raise ValueError(f"stage {self.name!r}: steps ({self.steps}) and accumulate ({self.accumulate}) must be "
                             ">= 1")
        if not (0.0 <= self.decoder_noise <= 1.0 and 0.0 <= self.decoder_swap <= 1.0):
            raise ValueError(f"stage {self.name!r}: decoder_noise ({self.decoder_noise}) and decoder_swap "
                             f"({self.decoder_swap}) are shares in [0, 1]")
        if self.denoising:
            decoder = ("vae.decoder", "vae.post_quant_conv")
            outside = [t for t in self.trainable if not any(t == d or t.startswith(d + ".") for d in decoder)]
            if self.kind != "vae" or outside or self.calibrate_scale:
                raise ValueError(f"stage {self.name!r}: a denoising decoder (decoder_noise / decoder_swap) is a 'vae' "
                                 f"stage that trains only {decoder} (the encoder frozen, so the latents keep their "
                                 f"meaning) and keeps the latent scale (calibrate_scale=False); got kind="
                                 f"{self.kind!r}, trainable={self.trainable}, calibrate_scale={self.calibrate_scale}")

    @property
    def denoising(self) -> bool:
        return self.decoder_noise > 0 or self.decoder_swap > 0

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def batches(self) -> int:
        """Batches the stage reads: ``accumulate`` per optimizer update."""
        return self.steps * self.accumulate

    def optimizer(self, params, stacked=None):
        """The stage's optimizer over ``params``: AdamW with its schedule sized in updates,
        clipping, no-decay groups, frozen parts and gradient accumulation."""
        return optim.make_optimizer(params, lr=self.lr, steps=self.steps, warmup=self.warmup, kind=self.schedule,
                                    weight_decay=self.weight_decay, clip=self.clip, trainable=self.trainable,
                                    accumulate=self.accumulate, stacked=stacked)

    @classmethod
    def from_config(cls, name: str, c, model_cfg, seed: int) -> "Stage":
        c = dict(c)
        batch = {k: int(v) for k, v in dict(c.pop("batch_size")).items() if int(v) > 0}
        weights = {k: float(v) for k, v in dict(c.pop("loss_weights", {"t2i": 1.0})).items()}
        if c["kind"] == "unipic":
            batch = {k: v for k, v in batch.items() if weights.get(k, 0.0) > 0}
        data = pipeline_lib.PipelineConfig(
            buckets=tuple(tuple(b) for b in c.pop("buckets")), batch_size=batch,
            max_text_len={k: int(v) for k, v in dict(c.pop("max_text_len")).items()},
            understanding_size=tuple(c.pop("understanding_size")), latent_stride=model_cfg.vae.downsample,
            buffer_size=model_cfg.mar.buffer_size, caption_dropout=float(c.pop("caption_dropout", 0.1)), seed=seed)
        c["trainable"] = tuple(c.get("trainable", ("",)))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ValueError(f"stage {name!r}: unknown fields {unknown}; a stage takes {sorted(known - {'name'})}")
        return cls(name=name, loss_weights=weights, data=data, **c)


# -- the kinds ------------------------------------------------------------------------------


def vae_loss(model, stage: Stage, batch: dict, key, state=None):
    if stage.denoising:
        return denoising_decoder_loss(model, stage, batch, key, state)
    return model.vae.loss(batch["t2i/pixels"], key, stage.kl_weight, stage.recon)


def corrupt_latents(z, key, noise: float, swap: float):
    """Latents ``z (B, h, w, C)`` (scaled, about unit variance) as a generator might get them
    wrong: ``z' = (1 − τ)·z + τ·ε`` with ``τ ~ U[0, noise]`` per image and ``ε ~ N(0, I)``
    (l-DeTok's interpolated noise), then each token, with probability ``swap``, replaced by the
    token at a random position of a random image of the batch."""
    B, h, w, C = z.shape
    k_tau, k_eps, k_swap, k_src = jax.random.split(key, 4)
    tau = jax.random.uniform(k_tau, (B, 1, 1, 1), jnp.float32, 0.0, noise)
    z = (1.0 - tau) * z + tau * jax.random.normal(k_eps, z.shape, jnp.float32)
    flat = z.reshape(B * h * w, C)
    src = jax.random.randint(k_src, (B * h * w,), 0, B * h * w)
    swapped = jax.random.bernoulli(k_swap, swap, (B * h * w,))
    return jnp.where(swapped[:, None], flat[src], flat).reshape(B, h, w, C)


def denoising_decoder_loss(model, stage: Stage, batch: dict, key, state=None):
    """The decoder's reconstruction loss (``recon``, per-image sum as in ``VAE.loss``) from
    corrupted encoder latents (:func:`corrupt_latents` of the frozen posterior means at the
    train state's ``vae_scale``): the decoder learns to map latents near the encoder's
    manifold back onto clean images. Parts: ``rec``, and ``clean_rec`` (the same loss on
    uncorrupted latents, not trained on) to show what the corruption costs."""
    scale = model.config.vae.scale if state is None or "vae_scale" not in state else state["vae_scale"]
    images = batch["t2i/pixels"]
    z = jax.lax.stop_gradient(model.vae.posterior(images)[0] * scale)
    noisy = corrupt_latents(z, key, stage.decoder_noise, stage.decoder_swap)

    def rec(latents):
        out = model.vae.decoder(model.vae.post_quant_conv(latents / scale)).astype(jnp.float32)
        err = jnp.abs(images - out) if stage.recon == "l1" else jnp.square(images - out)
        return jnp.mean(jnp.sum(err, axis=(1, 2, 3)))

    loss = rec(noisy)
    return loss, {"rec": loss, "clean_rec": jax.lax.stop_gradient(rec(z))}


def unipic_loss(model, stage: Stage, batch: dict, key, state=None):
    """``Σ loss_weights[task] · loss[task]`` over the tasks present in ``batch`` (float32)."""
    scale = model.config.vae.scale if state is None or "vae_scale" not in state else state["vae_scale"]

    def enc(x):  # the frozen VAE: scaled posterior means, no gradient
        return jax.lax.stop_gradient(model.vae.posterior(x)[0] * scale)

    keys = jax.random.split(key, 3)
    parts, total = {}, jnp.float32(0.0)
    w = stage.loss_weights
    if "t2i/pixels" in batch:
        parts["t2i"] = model.t2i_loss(batch["t2i/input_ids"], batch["t2i/attention_mask"],
                                      enc(batch["t2i/pixels"]), keys[0])
        total += w.get("t2i", 0.0) * parts["t2i"]
    if "edit/pixels" in batch:
        parts["edit"] = model.edit_loss(batch["edit/input_ids"], batch["edit/attention_mask"],
                                        enc(batch["edit/source"]), enc(batch["edit/pixels"]), keys[1])
        total += w.get("edit", 0.0) * parts["edit"]
    if "understanding/pixels" in batch:
        parts["understanding"] = model.understanding_loss(
            batch["understanding/input_ids"], batch["understanding/attention_mask"], batch["understanding/labels"],
            enc(batch["understanding/pixels"]))
        total += w.get("understanding", 0.0) * parts["understanding"]
    return total, parts


def calibrate_vae_scale(trainer, stage: Stage, params, pipe, batches: int = 4) -> float:
    """Sets the latent scale to 1 / std of the unscaled posterior means over the stage's first
    ``batches`` global batches of its first bucket, so the generator sees unit-variance tokens
    (as Stable Diffusion's scaling factor does). One compiled reduction over the global
    (sharded) batches: every process gets the same statistic. Returns the scale."""
    from flax import nnx

    if not stage.calibrate_scale:
        return trainer.model.config.vae.scale
    nnx.update(trainer.model, params)
    graphdef, state = nnx.split(trainer.model.vae)

    @jax.jit
    def moments(state, pixels):
        mean = nnx.merge(graphdef, state).posterior(pixels)[0].astype(jnp.float32)
        return jnp.stack([jnp.sum(mean), jnp.sum(jnp.square(mean)), jnp.float32(mean.size)])

    first = pipe.bucket(0)
    steps = [k for k in range(64 * batches) if pipe.bucket(k) == first][:batches]
    total = np.zeros(3)
    for k in steps:
        pixels = {"p": pipe[k]["t2i/pixels"]}
        if trainer.mesh is not None:
            pixels = pipeline_lib.global_batch(pixels, trainer.mesh)
        total += np.asarray(jax.device_get(moments(state, pixels["p"])), np.float64)
    mean = total[0] / total[2]
    std = float(np.sqrt(max(total[1] / total[2] - mean**2, 0.0)))
    scale = 1.0 / max(std, 1e-6)
    set_vae_scale(trainer.model, scale)
    log.info("VAE latent scale calibrated over %d global batches: std %.4f -> scale %.4f", len(steps), std, scale)
    return scale


def set_vae_scale(model, scale: float):
    """Sets the VAE's latent scale on a UniPic model (its config: what sampling and saved
    checkpoints use; training reads it from the train state)."""
    cfg = model.config
    model.vae.config = cfg.vae.replace(scale=float(scale))
    model.config = dataclasses.replace(cfg, vae=model.vae.config)


register(Kind("vae", vae_loss, finish=calibrate_vae_scale))
register(Kind("unipic", unipic_loss))


def stage_loss(model, stage: Stage, batch: dict, key, state: dict[str, Any] | None = None):
    """The stage's weighted loss and its parts (float32)."""
    return stage.spec.loss(model, stage, batch, key, state)
