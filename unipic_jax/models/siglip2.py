"""SigLIP / SigLIP2 vision tower in Flax NNX (UniPic-1's understanding encoder).

A pre-norm ViT::

    x = patch_embed(patches) + pos
    x = x + out_proj(MHA(LN1(x)))  ;  x = x + fc2(gelu_tanh(fc1(LN2(x))))     (× num_layers)
    last_hidden_state = post_layernorm(x)
    pooled = MAP head: probe attends to last_hidden_state, then + MLP(LN(·))   (if use_head)

Two forms, as in transformers:

* **fixed** (``SiglipVisionModel``, ``naflex=False``): NHWC images of ``image_size``; the
  ``num_patches`` position embeddings are added as they are.
* **NaFlex** (``Siglip2VisionModel``, ``naflex=True``): patches arrive pre-split and padded,
  ``pixel_values (B, N, p·p·C)`` with ``pixel_attention_mask (B, N)`` and ``spatial_shapes
  (B, 2)`` = each image's (rows, cols) of patches. The ``√num_patches × √num_patches`` grid
  of position embeddings is resized per image to its own grid with PyTorch's antialiased
  bilinear interpolation (half-pixel centres), and padding slots get the first embedding.
  Padding patches are masked out as keys in every attention and in the pooling head. The
  resize is written as two interpolation matrices built from the (traced) grid sizes, so
  one compiled function serves every mix of aspect ratios.

Parameter layouts (ours ← transformers; kernels are ``(out, in)``):

    patch_embed.kernel  (D, p, p, C)  ← embeddings.patch_embedding.weight: Linear (D, p·p·C) for
                                         SigLIP2 (patch pixels in (row, col, channel) order), Conv2d
                                         (D, C, p, p) for SigLIP (transposed)
    pos_embed           (P, D)        ← embeddings.position_embedding.weight
    layers.i.attn.{q,k,v}_proj (H, hd, D), out_proj (D, H, hd); mlp.fc1 (F, D), fc2 (D, F)
    head.attn.in_proj   (3, H, hd, D) ← head.attention.in_proj_weight (3D, D) (q; k; v stacked)

With ``scan_layers`` the encoder layers are one stacked module (``layers.attn.q_proj.kernel``
``(L, H, hd, D)``, leading logical axis ``"layers"``) run as one scan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax import sharding
from unipic_jax.models.layers import (
    Dense, LayerNorm, PresetConfig, attention, make_blocks, param, resize_weights, run_blocks,
)


@dataclasses.dataclass(frozen=True)
class SiglipConfig(PresetConfig):
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    num_patches: int  # rows of the position-embedding table (a square grid)
    naflex: bool = True  # SigLIP2 NaFlex (pre-split patches) or fixed resolution (SigLIP)
    image_size: int | None = None  # fixed form only
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    use_head: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False  # stack the encoder layers (parameters (L, ...)) and run them with a scan

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"num_patches must be a square number, got {self.num_patches}")
        if not self.naflex:
            if self.image_size is None or self.image_size % self.patch_size:
                raise ValueError(f"the fixed form needs image_size divisible by patch_size, got {self.image_size}")
            if (self.image_size // self.patch_size) ** 2 != self.num_patches:
                raise ValueError(f"image_size {self.image_size} / patch {self.patch_size} does not give "
                                 f"{self.num_patches} patches")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return math.isqrt(self.num_patches)


_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=16)
PRESETS: dict[str, SiglipConfig] = {
    "tiny": SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=4,
                         num_patches=16),
    "so400m_patch16_512": SiglipConfig(**_SO400M, num_patches=1024, naflex=False, image_size=512),
    "so400m_patch16_naflex": SiglipConfig(**_SO400M, num_patches=256),
}


def _kw(cfg: SiglipConfig, rngs):
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = Dense(D, F, in_axes=("embed",), out_axes=("mlp",), **_kw(cfg, rngs))
        self.fc2 = Dense(F, D, in_axes=("mlp",), out_axes=("embed",), **_kw(cfg, rngs))

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x), approximate=True)
        return self.fc2(sharding.constrain(h, ("batch", "length", "act_mlp")))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        D, H, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, Dense(D, (H, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), **_kw(cfg, rngs)))
        self.out_proj = Dense((H, hd), D, in_axes=("heads", "head_dim"), out_axes=("embed",), **_kw(cfg, rngs))

    def __call__(self, x, mask):
        heads = ("batch", "length", "act_heads", None)
        q, k, v = (sharding.constrain(p(x), heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, mask))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **_kw(cfg, rngs))
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **_kw(cfg, rngs))
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class PoolingHead(nnx.Module):
    """Multi-head attention pooling (MAP): a learned probe attends to all (valid) tokens."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        D, H, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.probe = param(rngs, jax.nn.initializers.normal(1.0), (1, 1, D), (None, None, "embed"), cfg.param_dtype)
        self.in_proj = Dense(D, (3, H, hd), in_axes=("embed",), out_axes=(None, "heads", "head_dim"), **_kw(cfg, rngs))
        self.out_proj = Dense((H, hd), D, in_axes=("heads", "head_dim"), out_axes=("embed",), **_kw(cfg, rngs))
        self.layernorm = LayerNorm(D, eps=cfg.layer_norm_eps, **_kw(cfg, rngs))
        self.mlp = MLP(cfg, rngs=rngs)
        self.dtype = cfg.dtype

    def __call__(self, x, key_mask):
        B = x.shape[0]
        k_in = self.in_proj.kernel[...].astype(self.dtype)
        b_in = self.in_proj.bias[...].astype(self.dtype)
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (B, 1, x.shape[-1]))
        q = jnp.einsum("btd,nhd->btnh", probe, k_in[0]) + b_in[0]
        k = jnp.einsum("bsd,nhd->bsnh", x, k_in[1]) + b_in[1]
        v = jnp.einsum("bsd,nhd->bsnh", x, k_in[2]) + b_in[2]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        h = self.out_proj(attention(q, k, v, mask))
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVision(nnx.Module):
    """``model(pixel_values, pixel_attention_mask=None, spatial_shapes=None)`` →
    ``(last_hidden_state (B, N, D), pooled (B, D) or None)``."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.patch_embed = Dense((p, p, C), D, in_axes=(None, None, None), out_axes=("embed",), **_kw(cfg, rngs))
        self.pos_embed = param(rngs, jax.nn.initializers.normal(D**-0.5), (cfg.num_patches, D), (None, "embed"),
                               cfg.param_dtype)
        self.layers = make_blocks(lambda: EncoderLayer(cfg, rngs=rngs), cfg.num_layers, cfg.scan_layers)
        self.post_layernorm = LayerNorm(D, eps=cfg.layer_norm_eps, **_kw(cfg, rngs))
        self.head = PoolingHead(cfg, rngs=rngs) if cfg.use_head else None

    def patchify(self, images: jax.Array) -> jax.Array:
        """NHWC images → ``(B, rows·cols, p, p, C)`` patches in raster order."""
        cfg = self.config
        B, H, W, C = images.shape
        p = cfg.patch_size
        if C != cfg.num_channels or H % p or W % p:
            raise ValueError(f"Expected NHWC images with {cfg.num_channels} channels and sides divisible by {p}, "
                             f"got shape {images.shape}")
        x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (H // p) * (W // p), p, p, C)

    def naflex_positions(self, spatial_shapes: jax.Array, length: int) -> jax.Array:
        """Position embeddings resized to each image's grid, padded with the first one: ``(B, N, D)``."""
        g = self.config.grid
        table = self.pos_embed[...].astype(jnp.float32).reshape(g, g, -1)

        def one(shape):
            rows, cols = shape[0], shape[1]
            ry = resize_weights(rows, g, length)  # (N, g): row n of the image's grid, at most N rows
            rx = resize_weights(cols, g, length)
            n = jnp.arange(length)
            r, c = n // jnp.maximum(cols, 1), n % jnp.maximum(cols, 1)
            per_row = jnp.einsum("ny,yxd->nxd", ry[r], table)
            pos = jnp.einsum("nx,nxd->nd", rx[c], per_row)
            return jnp.where((n < rows * cols)[:, None], pos, pos[0])

        return jax.vmap(one)(spatial_shapes.astype(jnp.int32)).astype(self.config.dtype)

    def __call__(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        cfg = self.config
        pixel_values = jnp.asarray(pixel_values)
        if cfg.naflex:
            if spatial_shapes is None or pixel_values.ndim != 3:
                raise ValueError("The NaFlex form takes pixel_values (B, N, patch*patch*channels) with "
                                 f"spatial_shapes (B, 2); got pixel_values {pixel_values.shape}, "
                                 f"spatial_shapes {None if spatial_shapes is None else jnp.shape(spatial_shapes)}")
            B, N, _ = pixel_values.shape
            p = cfg.patch_size
            patches = pixel_values.reshape(B, N, p, p, cfg.num_channels)
            pos = self.naflex_positions(jnp.asarray(spatial_shapes), N)
        else:
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
                hint = " (NCHW? use x.transpose(0, 2, 3, 1))" if pixel_values.ndim == 4 else ""
                raise ValueError(f"The fixed form takes NHWC images of {cfg.image_size}x{cfg.image_size}x"
                                 f"{cfg.num_channels}, got {pixel_values.shape}{hint}")
            patches = self.patchify(pixel_values)
            B, N = patches.shape[:2]
            pos = self.pos_embed[...].astype(cfg.dtype)[None]
        x = self.patch_embed(patches.astype(cfg.dtype)) + pos
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        key_mask = None if pixel_attention_mask is None else jnp.asarray(pixel_attention_mask).astype(bool)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x, _ = run_blocks(lambda layer, x, _: (layer(x, mask), None), self.layers, x, remat=cfg.remat)
        x = self.post_layernorm(x)
        pooled = self.head(x, key_mask) if self.head is not None else None
        return x, pooled


def init(cfg: SiglipConfig, seed: int = 0, mesh: Any = None) -> SiglipVision:
    """A randomly initialised tower, created directly on ``mesh`` when one is given."""
    return sharding.create_sharded(lambda: SiglipVision(cfg, rngs=nnx.Rngs(seed)), mesh)


VISION_TYPES = {"siglip_vision_model": False, "siglip2_vision_model": True}
FULL_TYPES = {"siglip": False, "siglip2": True}


def config_from_hf(hf: dict[str, Any], **overrides) -> SiglipConfig:
    """A transformers config.json dict (vision-only or full SigLIP/SigLIP2) → :class:`SiglipConfig`."""
    import transformers

    mt = hf.get("model_type")
    naflex = VISION_TYPES.get(mt, FULL_TYPES.get(mt))
    if naflex is None:
        raise ValueError(f"model_type {mt!r} is not a SigLIP model")
    vc = hf.get("vision_config", {}) if mt in FULL_TYPES else hf
    cls = transformers.Siglip2VisionConfig if naflex else transformers.SiglipVisionConfig
    full = cls(**{k: v for k, v in vc.items() if k not in ("model_type", "architectures", "transformers_version")})
    if full.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Only the tanh GELU is supported, the checkpoint has hidden_act={full.hidden_act!r}")
    kw = dict(
        hidden_size=full.hidden_size, intermediate_size=full.intermediate_size, num_layers=full.num_hidden_layers,
        num_heads=full.num_attention_heads, patch_size=full.patch_size, num_channels=full.num_channels,
        layer_norm_eps=full.layer_norm_eps, use_head=getattr(full, "vision_use_head", True), naflex=naflex,
    )
    if naflex:
        kw["num_patches"] = full.num_patches
    else:
        kw.update(image_size=full.image_size, num_patches=(full.image_size // full.patch_size) ** 2)
    kw.update(overrides)
    return SiglipConfig(**kw)


def config_to_hf(cfg: SiglipConfig) -> dict[str, Any]:
    out = dict(
        architectures=["Siglip2VisionModel" if cfg.naflex else "SiglipVisionModel"],
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=cfg.use_head,
        dtype=cfg.param_dtype,
    )
    if cfg.naflex:
        out["num_patches"] = cfg.num_patches
    else:
        out["image_size"] = cfg.image_size
    return out
