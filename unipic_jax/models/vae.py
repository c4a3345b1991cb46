"""The KL VAE (LDM architecture, as MAR ships it as "KL-16"): UniPic-1's image tokenizer.

Channels-last throughout: images ``(B, H, W, 3)`` in [-1, 1], latents ``(B, H/16, W/16, 16)``.

Encoder: ``conv_in`` → per level ``i`` (channels ``ch·ch_mult[i]``): ``num_res_blocks``
ResNet blocks (GroupNorm(32, eps 1e-6) → swish → conv3, twice; 1×1 ``nin_shortcut`` when the
width changes), each followed by single-head self-attention at the last level, then a
stride-2 conv after zero-padding bottom/right (all levels but the last) → mid (ResNet,
attention, ResNet) → GroupNorm → swish → ``conv_out`` (2·embed: mean and log-variance) →
``quant_conv`` (1×1). Decoder: ``post_quant_conv`` → ``conv_in`` → mid → per level from the
last to the first, ``num_res_blocks + 1`` ResNet blocks then (but at level 0) nearest ×2
upsampling and a conv3 → GroupNorm → swish → ``conv_out``.

For small worlds trained from scratch, ``attention=False`` drops the attention blocks and
``norm="pixel"`` takes each group's statistics at each position alone: a latent then depends
only on the pixels in its receptive field, where LDM's GroupNorm statistics and attention make
every latent depend on the whole image (an object added far away moves the background latents
of the demo's VAE trained with LDM's norms and attention by 0.15 of the latents' std; trained
local, by 0.001).

``encode`` returns the posterior mode (or a sample) times ``scale`` (0.2325); ``decode``
divides by it. The posterior's log-variance is clamped to [-30, 20]. ``loss`` is the
reconstruction + KL objective for training the tokenizer on small worlds.

Parameter layout: conv kernels ``(out, kh, kw, in)`` (PyTorch's OIHW transposed to
channels-last); attention ``q, k, v, proj_out`` are 1×1 convs ``(C, 1, 1, C)``. Two
conversion tables (in ``unipic_jax.convert.tables``): the LDM names of ``kl16.ckpt``
(``vae_ldm_rules``, the same names as ours) and diffusers' ``AutoencoderKL`` names
(``vae_diffusers_rules``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax.models.layers import PresetConfig, attention, param


@dataclasses.dataclass(frozen=True)
class VAEConfig(PresetConfig):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder blocks per level; the decoder has one more
    embed_dim: int = 16
    in_channels: int = 3
    num_groups: int = 32
    scale: float = 0.2325
    # LDM's VAE couples every latent to the whole image: GroupNorm statistics span all positions and
    # self-attention runs at the lowest resolution. attention=False drops the attention blocks and
    # norm="pixel" takes each group's statistics at each position alone, so a latent depends only on
    # the pixels in its receptive field (local tokens, for small worlds trained from scratch)
    attention: bool = True
    norm: str = "group"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; choose from {NORMS}")
        if any((self.ch * m) % self.num_groups for m in self.ch_mult):
            raise ValueError(f"every width ch*ch_mult {[self.ch * m for m in self.ch_mult]} must be divisible by "
                             f"num_groups={self.num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


NORMS = ("group", "pixel")

PRESETS = {
    "kl16": VAEConfig(),
    "tiny": VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=4, num_groups=4),
}


class Conv(nnx.Module):
    """2-D convolution, NHWC input, kernel ``(out, k, k, in)``, "same" zero padding unless
    ``padding`` is given."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding="SAME", dtype, param_dtype,
                 rngs: nnx.Rngs):
        init = jax.nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        self.kernel = param(rngs, init, (cout, k, k, cin), (None, None, None, None), param_dtype)
        self.bias = param(rngs, jax.nn.initializers.zeros, (cout,), (None,), param_dtype)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "OHWI", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over ``(H, W, C/groups)``; with ``per_pixel`` over ``C/groups`` at each position."""

    def __init__(self, c: int, groups: int, *, eps: float = 1e-6, per_pixel: bool = False, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.groups, self.eps, self.dtype, self.per_pixel = groups, eps, dtype, per_pixel
        self.scale = param(rngs, jax.nn.initializers.ones, (c,), (None,), param_dtype)
        self.bias = param(rngs, jax.nn.initializers.zeros, (c,), (None,), param_dtype)

    def __call__(self, x):
        B, H, W, C = x.shape
        g = x.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
        axes = (4,) if self.per_pixel else (1, 2, 4)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def _kw(cfg: VAEConfig, rngs):
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _group_norm(c: int, cfg: VAEConfig, rngs):
    return GroupNorm(c, cfg.num_groups, per_pixel=cfg.norm == "pixel", **_kw(cfg, rngs))


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cin, cfg, rngs)
        self.conv1 = Conv(cin, cout, 3, **_kw(cfg, rngs))
        self.norm2 = _group_norm(cout, cfg, rngs)
        self.conv2 = Conv(cout, cout, 3, **_kw(cfg, rngs))
        self.nin_shortcut = Conv(cin, cout, 1, **_kw(cfg, rngs)) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all ``H·W`` positions, with a residual."""

    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.norm = _group_norm(c, cfg, rngs)
        self.q, self.k, self.v, self.proj_out = (Conv(c, c, 1, **_kw(cfg, rngs)) for _ in range(4))

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, H * W, 1, C) for f in (self.q, self.k, self.v))
        return x + self.proj_out(attention(q, k, v, None).reshape(B, H, W, C))


class Downsample(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.conv = Conv(c, c, 3, stride=2, padding="VALID", **_kw(cfg, rngs))

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.conv = Conv(c, c, 3, **_kw(cfg, rngs))

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: ResNet blocks (with attention after each, if any) and a resampler."""

    def __init__(self, blocks, attn, resample):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attn)
        self.downsample = resample if isinstance(resample, Downsample) else None
        self.upsample = resample if isinstance(resample, Upsample) else None


class Mid(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(c, c, cfg, rngs=rngs)
        self.attn_1 = AttnBlock(c, cfg, rngs=rngs) if cfg.attention else None
        self.block_2 = ResnetBlock(c, c, cfg, rngs=rngs)

    def __call__(self, x):
        h = self.block_1(x)
        return self.block_2(self.attn_1(h) if self.attn_1 is not None else h)


def _run_level(level: Level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        n = len(cfg.ch_mult)
        self.conv_in = Conv(cfg.in_channels, cfg.ch, 3, **_kw(cfg, rngs))
        levels, cin = [], cfg.ch
        for i, m in enumerate(cfg.ch_mult):
            cout = cfg.ch * m
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs) for j in range(cfg.num_res_blocks)]
            attn = ([AttnBlock(cout, cfg, rngs=rngs) for _ in range(cfg.num_res_blocks)]
                    if i == n - 1 and cfg.attention else [])
            levels.append(Level(blocks, attn, Downsample(cout, cfg, rngs=rngs) if i < n - 1 else None))
            cin = cout
        self.down = nnx.List(levels)
        self.mid = Mid(cin, cfg, rngs=rngs)
        self.norm_out = _group_norm(cin, cfg, rngs)
        self.conv_out = Conv(cin, 2 * cfg.embed_dim, 3, **_kw(cfg, rngs))

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if level.downsample is not None:
                h = level.downsample(h)
        return self.conv_out(jax.nn.swish(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        n = len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv(cfg.embed_dim, cin, 3, **_kw(cfg, rngs))
        self.mid = Mid(cin, cfg, rngs=rngs)
        levels = [None] * n  # indexed by level: 0 is the full resolution, as in LDM
        for i in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs) for j in range(cfg.num_res_blocks + 1)]
            levels[i] = Level(blocks, [], Upsample(cout, cfg, rngs=rngs) if i > 0 else None)
            cin = cout
        self.up = nnx.List(levels)
        self.norm_out = _group_norm(cin, cfg, rngs)
        self.conv_out = Conv(cin, cfg.in_channels, 3, **_kw(cfg, rngs))

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(list(self.up)):
            h = _run_level(level, h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = Conv(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1, **_kw(cfg, rngs))
        self.post_quant_conv = Conv(cfg.embed_dim, cfg.embed_dim, 1, **_kw(cfg, rngs))

    def posterior(self, images):
        """``(mean, logvar)`` of the diagonal Gaussian posterior, unscaled, ``(B, h, w, embed)``."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"Expected NHWC images with {self.config.in_channels} channels, got {images.shape}")
        f = self.config.downsample
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"Image sides must be multiples of {f}, got {images.shape[1:3]}")
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images, key=None):
        """Scaled latents: the posterior mode, or a sample when ``key`` is given."""
        mean, logvar = self.posterior(images)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return z * self.config.scale

    def decode(self, latents):
        """Pixels in (about) [-1, 1] from scaled latents."""
        z = latents.astype(jnp.float32) / self.config.scale
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def loss(self, images, key, kl_weight: float = 1e-6, recon: str = "l1"):
        """Tokenizer training loss: per-image sum of ``|x − x̂|`` (``recon="l1"``, LDM's pixel
        term) or ``(x − x̂)²`` (``"l2"``) plus ``kl_weight`` × KL to N(0, I), averaged over the
        batch (LDM's normalisation), and its parts."""
        if recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
        mean, logvar = self.posterior(images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        out = self.decoder(self.post_quant_conv(z)).astype(jnp.float32)
        err = jnp.abs(images - out) if recon == "l1" else jnp.square(images - out)
        rec = jnp.mean(jnp.sum(err, axis=(1, 2, 3)))
        kl = jnp.mean(0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        return rec + kl_weight * kl, {"rec": rec, "kl": kl}


def diffusers_config(cfg: VAEConfig) -> dict:
    """Keyword arguments of ``diffusers.AutoencoderKL`` for the same architecture."""
    if cfg.norm != "group":
        raise ValueError(f"diffusers' AutoencoderKL has no norm={cfg.norm!r} (only GroupNorm over all positions)")
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D" if cfg.attention
                                                               else "DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.embed_dim, norm_num_groups=cfg.num_groups, scaling_factor=cfg.scale,
        mid_block_add_attention=cfg.attention,
    )
