"""MAR's masked-autoencoder encoder and decoder (as UniPic-1 / Harmon use them), Flax NNX.

Tokens are VAE latent pixels in raster order: ``tokens (B, L, C)`` with ``L = h·w``; ``mask
(B, L)`` is 1 where a token is masked (to be generated), as in MAR. Both stacks are pre-norm
ViT blocks (LayerNorm eps 1e-6, qkv bias, exact GELU MLP of ratio 4).

Encoder::

    x = [buffer | z_proj(tokens)] + pos_enc            buffer: ``buffer_size`` slots of ``fake_latent``
    x = z_proj_ln(x); blocks over the visible tokens (and the buffer); encoder_norm

Decoder::

    x = decoder_embed(x_enc) at visible slots, ``mask_token`` (or ``decoder_embed(x_con)`` for
        editing) at masked ones; + pos_dec; blocks; decoder_norm; drop the buffer; + pos_diff
    → per-token condition ``z (B, L, W)`` for the diffusion head.

The position embeddings are learned for a ``grid × grid`` image (plus the buffer); for another
token grid only the image part is resized, bilinearly at half-pixel centres without
antialiasing (as ``F.interpolate(mode="bilinear")``). Masked tokens are excluded from the
encoder's attention by a key mask instead of being dropped, so shapes stay static under
``jit``; the visible tokens' outputs are the same, and masked slots are returned as zeros.
Training drops them as MAR does, with a static count: ``encode(..., keep=idx)`` runs only the
``K`` tokens ``idx (B, K)`` from :func:`visible_first` (the visible ones in raster order, then
masked fillers, which stay masked), ``K = max_visible(L, mask_ratio_min)``.

``attn_bias="alibi"`` (not in MAR or the release; for small models trained from scratch) adds
2-D ALiBi to every block's logits: ``−2^−h`` times the distance between two image tokens for
head ``h`` (:func:`distance_bias`), so the first heads attend to neighbouring tokens.

Parameters keep the release's names (``mar.*``, see ``convert.tables.MAR_TORCH_RULES``); the unused
``class_emb`` of the release is not created (the converter reports it as ignored). With
``scan_layers`` each stack is one module whose parameters carry a leading block axis
(logical name ``"layers"``), run as one scan.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unipic_jax import sharding
from unipic_jax.models.layers import (
    Dense, LayerNorm, PresetConfig, attention, make_blocks, param, resize_grid, run_blocks,
)


@dataclasses.dataclass(frozen=True)
class MARConfig(PresetConfig):
    token_dim: int = 16  # VAE latent channels (patch size 1)
    width: int = 1280
    encoder_depth: int = 20
    decoder_depth: int = 20
    num_heads: int = 16
    mlp_ratio: int = 4
    buffer_size: int = 64
    grid: int = 32  # side of the token grid the position embeddings are learned for (512 / 16)
    mask_ratio_min: float = 0.7
    # training mask ratios: N(1, mask_ratio_std²) truncated to [mask_ratio_min, 1] (MAR: 0.25 on [0.7, 1]);
    # a large std with mask_ratio_min 0 gives near-uniform ratios, as the visible shares sampling meets
    mask_ratio_std: float = 0.25
    pos_init: str = "normal"  # position tables at init: "normal" (σ 0.02, as MAR) or "sincos" (2-D, MAE)
    # "alibi": 2-D ALiBi in every block, see distance_bias (MAR and the release have none)
    attn_bias: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False  # stack each block stack (parameters (depth, ...)) and run it with a scan

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pos_init not in POS_INITS:
            raise ValueError(f"pos_init={self.pos_init!r}; choose from {POS_INITS}")
        if self.attn_bias not in ATTN_BIASES:
            raise ValueError(f"attn_bias={self.attn_bias!r}; choose from {ATTN_BIASES}")
        if self.pos_init == "sincos" and self.width % 4:
            raise ValueError(f"pos_init='sincos' needs a width divisible by 4, got {self.width}")
        if not (0.0 <= self.mask_ratio_min < 1.0 and self.mask_ratio_std > 0.0):
            raise ValueError(f"training mask ratios need 0 <= mask_ratio_min < 1 and mask_ratio_std > 0, got "
                             f"{self.mask_ratio_min} and {self.mask_ratio_std}")


POS_INITS = ("normal", "sincos")
ATTN_BIASES = ("none", "alibi")


PRESETS = {
    "huge": MARConfig(),
    "tiny": MARConfig(token_dim=4, width=32, encoder_depth=2, decoder_depth=2, num_heads=4, buffer_size=4, grid=4),
}


def sincos_2d(grid: int, width: int) -> np.ndarray:
    """MAE's fixed 2-D position table ``(grid², width)``, raster order: the first half of the
    channels encodes the column, the second the row, each as ``[sin(p·ω_i) | cos(p·ω_i)]``
    with ``ω_i = 10000^(−i/(width/4))``, ``i < width/4``."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(p):
        a = p.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def _pos_init(cfg: MARConfig, buffer: int):
    """Initializer of a ``(1, buffer + grid², width)`` table: the buffer rows normal(0.02),
    the image rows by ``cfg.pos_init``."""
    normal = jax.nn.initializers.normal(0.02)
    if cfg.pos_init == "normal":
        return normal

    def init(key, shape, dtype):
        table = jnp.asarray(sincos_2d(cfg.grid, cfg.width), dtype)[None]
        return jnp.concatenate([normal(key, (1, buffer, cfg.width), dtype), table], axis=1)

    return init


def distance_bias(index: jax.Array, width: int, num_heads: int) -> jax.Array:
    """2-D ALiBi: ``(B, H, n, n)`` logit biases ``−2^−h · ‖p_i − p_j‖`` for head ``h``, where
    ``p`` is a slot's (row, column) on a token grid ``width`` wide and ``index (B, n)`` its
    raster index, −1 for a buffer slot (no distance to anything). Head 0 looks mostly at the
    nearest tokens, the last ones over the whole image; distances are in tokens, so the same
    bias serves every resolution."""
    pos = jnp.stack([index // width, index % width], axis=-1).astype(jnp.float32)
    dist = jnp.sqrt(jnp.sum(jnp.square(pos[:, :, None] - pos[:, None, :]), axis=-1))
    image = index >= 0
    dist = jnp.where(image[:, :, None] & image[:, None, :], dist, 0.0)
    slopes = 2.0 ** -jnp.arange(num_heads, dtype=jnp.float32)
    return -slopes[None, :, None, None] * dist[:, None]


def _norm_kw(cfg, rngs):
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _kw(cfg, rngs):
    # MAR initialises every Linear with xavier_uniform (zero bias), as the JAX ViT does
    return dict(_norm_kw(cfg, rngs), kernel_init="xavier_uniform")


class Block(nnx.Module):
    """timm's ViT block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        W, H = cfg.width, cfg.num_heads
        self.norm1 = LayerNorm(W, eps=1e-6, **_norm_kw(cfg, rngs))
        self.qkv = Dense(W, (3, H, W // H), in_axes=("embed",), out_axes=(None, "heads", "head_dim"), **_kw(cfg, rngs))
        self.proj = Dense((H, W // H), W, in_axes=("heads", "head_dim"), out_axes=("embed",), **_kw(cfg, rngs))
        self.norm2 = LayerNorm(W, eps=1e-6, **_norm_kw(cfg, rngs))
        self.fc1 = Dense(W, cfg.mlp_ratio * W, in_axes=("embed",), out_axes=("mlp",), **_kw(cfg, rngs))
        self.fc2 = Dense(cfg.mlp_ratio * W, W, in_axes=("mlp",), out_axes=("embed",), **_kw(cfg, rngs))

    def __call__(self, x, mask, bias=None):
        qkv = self.qkv(self.norm1(x))
        x = x + self.proj(attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], mask, bias))
        h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
        return sharding.constrain(x + self.fc2(h), ("batch", "length", "act_embed"))


def _run(blocks, x, mask, remat: bool, bias=None):
    return run_blocks(lambda block, x, _: (block(x, mask, bias), None), blocks, x, remat=remat)[0]


class MAR(nnx.Module):
    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        W, S, L = cfg.width, cfg.buffer_size, cfg.grid**2
        init = jax.nn.initializers.normal(0.02)
        self.fake_latent = param(rngs, init, (1, W), (None, "embed"), cfg.param_dtype)
        self.z_proj = Dense(cfg.token_dim, W, in_axes=(None,), out_axes=("embed",), **_kw(cfg, rngs))
        self.z_proj_ln = LayerNorm(W, eps=1e-6, **_norm_kw(cfg, rngs))
        self.encoder_pos_embed = param(rngs, _pos_init(cfg, S), (1, S + L, W), (None, None, "embed"), cfg.param_dtype)
        self.encoder_blocks = make_blocks(lambda: Block(cfg, rngs=rngs), cfg.encoder_depth, cfg.scan_layers)
        self.encoder_norm = LayerNorm(W, eps=1e-6, **_norm_kw(cfg, rngs))
        self.decoder_embed = Dense(W, W, in_axes=("embed",), out_axes=("mlp",), **_kw(cfg, rngs))
        self.mask_token = param(rngs, init, (1, 1, W), (None, None, "embed"), cfg.param_dtype)
        self.decoder_pos_embed = param(rngs, _pos_init(cfg, S), (1, S + L, W), (None, None, "embed"), cfg.param_dtype)
        self.decoder_blocks = make_blocks(lambda: Block(cfg, rngs=rngs), cfg.decoder_depth, cfg.scan_layers)
        self.decoder_norm = LayerNorm(W, eps=1e-6, **_norm_kw(cfg, rngs))
        self.diffusion_pos_embed = param(rngs, _pos_init(cfg, 0), (1, L, W), (None, None, "embed"), cfg.param_dtype)

    def _pos(self, table, h: int, w: int, buffer: bool) -> jax.Array:
        """A position table for an ``h × w`` token grid (the buffer part is kept as learned)."""
        cfg = self.config
        t = table[...][0]
        S = cfg.buffer_size if buffer else 0
        image = t[S:]
        if (h, w) != (cfg.grid, cfg.grid):
            image = resize_grid(image.reshape(cfg.grid, cfg.grid, -1), h, w).reshape(h * w, -1)
        return jnp.concatenate([t[:S], image]).astype(cfg.dtype)

    def _bias(self, index, w: int):
        """The blocks' logit bias for slots ``[buffer | image tokens index (B, n)]`` (or None)."""
        if self.config.attn_bias == "none":
            return None
        S = self.config.buffer_size
        buffer = jnp.full((index.shape[0], S), -1, jnp.int32)
        return distance_bias(jnp.concatenate([buffer, index.astype(jnp.int32)], axis=1), w, self.config.num_heads)

    def _check(self, tokens, mask, image_shape):
        B, L, _ = tokens.shape
        h, w = image_shape if image_shape is not None else (self.config.grid, self.config.grid)
        if h * w != L:
            raise ValueError(f"{L} tokens do not form the {h}x{w} grid given by image_shape")
        if mask is not None and mask.shape != (B, L):
            raise ValueError(f"mask has shape {mask.shape}, expected {(B, L)}")
        return h, w

    def encode(self, tokens, mask=None, image_shape=None, buffer=None, keep=None) -> jax.Array:
        """Encoder output ``(B, buffer_size + L, W)``; masked slots are zero.

        ``buffer (B, buffer_size or 1, W)`` replaces ``fake_latent`` in the buffer slots.
        ``keep (B, K)`` (needs ``mask``): only those image tokens are run, in that order, and
        the output is ``(B, buffer_size + K, W)``; slot ``S + j`` is token ``keep[:, j]``."""
        cfg = self.config
        h, w = self._check(tokens, mask, image_shape)
        B, L, _ = tokens.shape
        pos = self._pos(self.encoder_pos_embed, h, w, True)
        visible = ~mask.astype(bool) if mask is not None else jnp.ones((B, L), bool)
        index = jnp.arange(L, dtype=jnp.int32)[None]  # each slot's raster index, for attn_bias
        if keep is not None:
            if mask is None or keep.ndim != 2 or keep.shape[0] != B:
                raise ValueError(f"keep must be (B={B}, K) token indices and comes with a mask, got "
                                 f"{getattr(keep, 'shape', keep)}")
            tokens = jnp.take_along_axis(tokens, keep[..., None], axis=1)
            index = keep
            visible = jnp.take_along_axis(visible, keep, axis=1)
            S = cfg.buffer_size
            pos = jnp.concatenate([jnp.broadcast_to(pos[:S], (B, S, pos.shape[-1])), pos[S:][keep]], axis=1)
        x = self.z_proj(tokens.astype(cfg.dtype))
        if buffer is None:
            buffer = self.fake_latent[...][None]
        x = jnp.concatenate([jnp.broadcast_to(buffer.astype(cfg.dtype), (B, cfg.buffer_size, x.shape[-1])), x], 1)
        x = self.z_proj_ln(x + pos)
        visible = jnp.concatenate([jnp.ones((B, cfg.buffer_size), bool), visible], axis=1)
        x = _run(self.encoder_blocks, x, visible[:, None, None, :], cfg.remat, self._bias(index, w))
        return jnp.where(visible[..., None], self.encoder_norm(x), 0)

    def decode(self, x_enc, mask, image_shape=None, x_con=None) -> jax.Array:
        """Diffusion conditions ``z (B, L, W)`` from the encoder output; masked slots take
        ``mask_token`` or, for editing, ``decoder_embed(x_con)`` (``x_con`` an encoder output)."""
        cfg = self.config
        B = x_enc.shape[0]
        L = x_enc.shape[1] - cfg.buffer_size
        h, w = image_shape if image_shape is not None else (cfg.grid, cfg.grid)
        if h * w != L or mask.shape != (B, L):
            raise ValueError(f"decode got x_enc {x_enc.shape} and mask {mask.shape} for a {h}x{w} grid")
        x = self.decoder_embed(x_enc)
        fill = self.decoder_embed(x_con) if x_con is not None else jnp.broadcast_to(
            self.mask_token[...].astype(cfg.dtype), x.shape)
        masked = jnp.concatenate([jnp.zeros((B, cfg.buffer_size), bool), mask.astype(bool)], 1)
        x = jnp.where(masked[..., None], fill, x) + self._pos(self.decoder_pos_embed, h, w, True)
        bias = self._bias(jnp.arange(L, dtype=jnp.int32)[None], w)
        x = self.decoder_norm(_run(self.decoder_blocks, x, None, cfg.remat, bias))
        return x[:, cfg.buffer_size:] + self._pos(self.diffusion_pos_embed, h, w, False)


# -- masking -------------------------------------------------------------------------------


def sample_mask_ratio(key, mask_ratio_min: float = 0.7, std: float = 0.25) -> jax.Array:
    """One ratio per batch from N(1, std²) truncated to ``[mask_ratio_min, 1]``."""
    return 1.0 + std * jax.random.truncated_normal(key, (mask_ratio_min - 1.0) / std, 0.0)


def random_orders(key, batch: int, length: int) -> jax.Array:
    """A random generation order (a permutation of ``range(length)``) per row, ``(B, L)`` int32."""
    return jax.vmap(lambda k: jax.random.permutation(k, length))(jax.random.split(key, batch)).astype(jnp.int32)


def mask_by_order(orders: jax.Array, num_masked) -> jax.Array:
    """``(B, L)`` float mask with 1 at the first ``num_masked`` positions of each row's order."""
    ranks = jnp.argsort(orders, axis=-1)
    return (ranks < num_masked).astype(jnp.float32)


def max_visible(length: int, mask_ratio_min: float) -> int:
    """The most visible tokens a :func:`training_mask` leaves: at least
    ``ceil(length · mask_ratio_min)`` are masked."""
    return length - math.floor(length * mask_ratio_min)


def visible_first(mask: jax.Array, k: int) -> jax.Array:
    """``(B, k)`` int32 token indices: the visible tokens (``mask == 0``) in raster order, then
    masked ones to fill the row. Visible tokens past ``k`` would be dropped, so ``k`` must be
    at least the most any row has (see :func:`max_visible`)."""
    return jnp.argsort(mask.astype(bool).astype(jnp.int32), axis=1, stable=True)[:, :k].astype(jnp.int32)


def training_mask(key, batch: int, length: int, mask_ratio_min: float = 0.7, std: float = 0.25) -> jax.Array:
    """MAR's training mask: ``ceil(L · ratio)`` tokens masked along a random order per row."""
    k1, k2 = jax.random.split(key)
    n = jnp.ceil(length * sample_mask_ratio(k1, mask_ratio_min, std)).astype(jnp.int32)
    return mask_by_order(random_orders(k2, batch, length), n)


def mask_schedule(length: int, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masked, clamped)``: ``masked[k]`` tokens are masked before step ``k`` (``num_iter + 1``
    entries, from ``length`` down to 0); ``clamped[k]`` is the count the release computes
    after step ``k`` (≥ 1 even after the last step), which the linear CFG schedule uses."""
    if num_iter < 1 or length < 1:
        raise ValueError(f"Need num_iter >= 1 and at least one token, got num_iter={num_iter}, length={length}")
    masked, clamped = [length], []
    for k in range(num_iter):
        n = max(1, min(masked[-1] - 1, math.floor(length * math.cos(math.pi / 2.0 * (k + 1) / num_iter))))
        clamped.append(n)
        masked.append(0 if k == num_iter - 1 else n)
    return np.asarray(masked, np.int32), np.asarray(clamped, np.int32)
