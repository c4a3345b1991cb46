"""Qwen2 / Qwen2.5 decoder in Flax NNX (the LLM of UniPic-1).

Per layer (pre-norm)::

    h = x + o_proj(Attn(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down(silu(gate(n2(h))) * up(n2(h)))

with RMSNorm ``n1, n2``, grouped-query attention (``num_heads`` queries share
``num_kv_heads`` key/value heads), biases on q/k/v only, RoPE with base ``rope_theta``
in transformers' half-split layout. Logits = ``final_norm(x) · E^T`` (tied) or ``· lm_head``.

Parameter layouts (ours ← transformers; kernels are ``(out, in)`` as in ``nn.Linear``,
with head axes split out, so conversion only reshapes):

    embedder.embedding        (V, D)       ← model.embed_tokens.weight (V, D)
    layers.i.attn.q_proj      (H, hd, D)   ← self_attn.q_proj.weight (H·hd, D), bias (H·hd,) → (H, hd)
    layers.i.attn.k_proj/v    (K, hd, D)   ← self_attn.{k,v}_proj
    layers.i.attn.o_proj      (D, H, hd)   ← self_attn.o_proj.weight (D, H·hd)
    layers.i.mlp.gate_up_proj (2, F, D)    ← mlp.gate_proj.weight (F, D) as [0], mlp.up_proj.weight as [1]
    layers.i.mlp.down         (D, F)       ← mlp.down_proj.weight (D, F)
    lm_head.kernel            (V, D)       ← lm_head.weight (V, D)  (untied models only)

With ``scan_layers`` the layers are one stacked module: ``layers.attn.q_proj.kernel`` is
``(L, H, hd, D)`` (every parameter gains a leading layer axis, logical name ``"layers"``)
and the stack runs as one ``nnx.scan``, with ``remat`` inside the scanned body.

Positions are ``cumsum(attention_mask) - 1`` so padding (left or right) never shifts
them. The KV cache is a plain pytree :class:`KVCache` of fixed size; ``generate`` runs
prefill and a ``lax.while_loop`` of single-token decode steps in one compiled
function per (batch, prompt length, max_new_tokens, greedy/sampling).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax import sharding
from unipic_jax.models.layers import (
    Dense, PresetConfig, RMSNorm, apply_rope, attention, make_blocks, param, rope_sin_cos, run_blocks,
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(PresetConfig):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # "none" | "full" (recompute each layer) | "dots" (keep matmul outputs)
    scan_layers: bool = False  # stack the decoder layers (parameters (L, ...)) and run them with a scan

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # fail early on a bad name

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


    def num_params(self) -> int:
        D, F, H, K, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = D * H * hd + H * hd + 2 * (D * K * hd + K * hd) + H * hd * D
        layer = attn + 3 * D * F + 2 * D
        return self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + D


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

PRESETS: dict[str, Qwen2Config] = {
    "tiny": Qwen2Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    ),
    "qwen2_5_0_5b": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
    ),
    "qwen2_5_1_5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
    ),
    "qwen2_5_7b": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        tie_word_embeddings=False,
    ),
}


class KVCache(NamedTuple):
    """Fixed-size cache: ``k[i], v[i]`` are ``(B, S, K, hd)`` for layer ``i``; ``valid (B, S)``
    marks slots holding a real (non-padding) token. ``k, v`` are tuples of per-layer arrays
    for the unrolled model and ``(L, B, S, K, hd)`` arrays for the scanned one."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    valid: jax.Array

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, size: int) -> "KVCache":
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        axes = ("batch", "length", "act_kv_heads", None)
        if cfg.scan_layers:
            def z():
                return sharding.constrain(jnp.zeros((cfg.num_layers, *shape), cfg.dtype), ("layers", *axes))

            return cls(k=z(), v=z(), valid=jnp.zeros((batch, size), bool))

        def z():
            return sharding.constrain(jnp.zeros(shape, cfg.dtype), axes)

        return cls(
            k=tuple(z() for _ in range(cfg.num_layers)),
            v=tuple(z() for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch, size), bool),
        )


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        D, H, K, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = jax.nn.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=init, rngs=rngs)
        self.q_proj = Dense(D, (H, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.k_proj = Dense(D, (K, hd), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
        self.v_proj = Dense(D, (K, hd), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
        self.o_proj = Dense((H, hd), D, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=False, **kw)

    def __call__(self, x, sin, cos, mask, kv=None, write_index=None):
        """``x (B, T, D)``; ``mask (B, 1, T, S)``. With ``kv = (k_cache, v_cache)`` the new
        keys/values are written at ``write_index`` and attention runs over the whole cache."""
        q = sharding.constrain(apply_rope(self.q_proj(x), sin, cos), ("batch", "length", "act_heads", None))
        k = sharding.constrain(apply_rope(self.k_proj(x), sin, cos), ("batch", "length", "act_kv_heads", None))
        v = sharding.constrain(self.v_proj(x), ("batch", "length", "act_kv_heads", None))
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), write_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), write_index, axis=1)
            kv = (k, v)
        out = attention(q, k, v, mask)
        return self.o_proj(out), kv


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=False,
            kernel_init=jax.nn.initializers.normal(cfg.initializer_range), rngs=rngs,
        )
        # gate and up stacked: one matmul; each tensor-parallel shard keeps matching halves
        self.gate_up_proj = Dense(D, (2, F), in_axes=("embed",), out_axes=(None, "mlp"), **kw)
        self.down_proj = Dense(F, D, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x):
        gate_up = self.gate_up_proj(x)
        h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return self.down_proj(sharding.constrain(h, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, sin, cos, mask, kv=None, write_index=None):
        h, kv = self.attn(self.input_norm(x), sin, cos, mask, kv, write_index)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return sharding.constrain(x, ("batch", "length", "act_embed")), kv


class Embedder(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.embedding = param(
            rngs, jax.nn.initializers.normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"), cfg.param_dtype,
        )

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``cumsum(mask) - 1``, clipped at 0 for leading padding. ``(B, T)`` int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Qwen2(nnx.Module):
    """The decoder. ``model(input_ids, attention_mask)`` → logits ``(B, T, V)`` float32."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedder = Embedder(cfg, rngs=rngs)
        self.layers = make_blocks(lambda: DecoderLayer(cfg, rngs=rngs), cfg.num_layers, cfg.scan_layers)
        self.final_norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",), use_bias=False,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=jax.nn.initializers.normal(cfg.initializer_range), rngs=rngs,
        )

    # -- pieces ---------------------------------------------------------------------------

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states ``(..., D)`` → float32 logits ``(..., V)``."""
        if self.lm_head is None:
            return self.embedder.attend(hidden)
        k = self.lm_head.kernel[...].astype(self.config.dtype)
        return jnp.einsum("...d,vd->...v", hidden, k, preferred_element_type=jnp.float32)

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        write_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder stack; returns the final-normed hidden states ``(B, T, D)``.

        Either ``input_ids (B, T)`` or ``inputs_embeds (B, T, D)``. Without a cache,
        attention is causal over the ``T`` inputs with padding keys masked out. With a
        cache the inputs occupy cache slots ``[write_index, write_index + T)``; they attend
        to every earlier valid slot and the updated cache is returned.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        x = self.embedder(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        if x.ndim != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"Expected inputs (B, T) ids or (B, T, {cfg.hidden_size}) embeddings, got {x.shape}")
        B, T = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, T)}")
        attention_mask = attention_mask.astype(bool)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        sin, cos = rope_sin_cos(position_ids, cfg.head_dim, cfg.rope_theta)

        if cache is None:
            causal = jnp.tril(jnp.ones((T, T), bool))
            mask = causal[None, None] & attention_mask[:, None, None, :]
        else:
            S = cache.valid.shape[1]
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, write_index, axis=1)
            q_slot = write_index + jnp.arange(T)
            mask = (jnp.arange(S)[None, :] <= q_slot[:, None])[None, None] & valid[:, None, None, :]

        def step(layer, x, kv):
            return layer(x, sin, cos, mask, kv, write_index)

        if cache is None:
            xs = None
        else:
            xs = (cache.k, cache.v) if cfg.scan_layers else list(zip(cache.k, cache.v))
        x, kvs = run_blocks(step, self.layers, x, xs, remat=cfg.remat != "none", policy=REMAT_POLICIES[cfg.remat])
        x = self.final_norm(x)
        if cache is not None:
            k, v = kvs if cfg.scan_layers else (tuple(kv[0] for kv in kvs), tuple(kv[1] for kv in kvs))
            cache = KVCache(k, v, valid)
        return x, cache

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``(B, T, V)`` float32 (one compiled function per input shape)."""
        graphdef, state = nnx.split(self)
        return sharding.on_params_mesh(
            state, _forward, graphdef, state, input_ids, attention_mask, inputs_embeds, position_ids
        )

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rng: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        eos_token_id: int | tuple[int, ...] | None = None,
        pad_token_id: int | None = None,
    ) -> jax.Array:
        """Returns ``max_new_tokens`` new ids per row, ``(B, N)`` int32.

        The prompt is ``input_ids (B, T)`` or ``inputs_embeds (B, T, D)`` (e.g. text with
        image embeddings written in). Greedy at ``temperature == 0``; otherwise sampling
        from ``softmax(logits / T)`` restricted to the nucleus ``top_p`` (needs ``rng``).
        Prompts may be left- or right-padded (``attention_mask``): every row continues from
        its own last real token. A row stops at EOS (``eos_token_id``, default the
        config's) and is filled with ``pad_token_id`` afterwards; the loop ends when every
        row has stopped.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if input_ids is not None:
            input_ids = jnp.asarray(input_ids, jnp.int32)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
            shape = input_ids.shape
        else:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be (batch, length, {cfg.hidden_size}), got {inputs_embeds.shape}")
            shape = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones(shape, dtype=bool)
        attention_mask = jnp.asarray(attention_mask, bool)
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask {attention_mask.shape} does not match the prompt {shape}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"Need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        greedy = temperature == 0
        if not greedy and rng is None:
            raise ValueError("Sampling (temperature > 0) needs an rng key: rng=jax.random.key(seed).")
        rng = jax.random.key(0) if rng is None else rng
        eos = cfg.eos_ids if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        )
        pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        graphdef, state = nnx.split(self)
        fn = functools.partial(_generate, max_new_tokens=max_new_tokens, greedy=greedy, eos=eos, pad=int(pad))
        return sharding.on_params_mesh(state, fn, graphdef, state, input_ids, inputs_embeds, attention_mask, rng,
                        jnp.float32(temperature), jnp.float32(top_p))


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, input_ids, attention_mask, inputs_embeds, position_ids):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds, position_ids=position_ids)
    return model.logits(hidden)


def sample_token(logits: jax.Array, rng, temperature, top_p, greedy: bool) -> jax.Array:
    """Picks one token per row from float32 ``logits (B, V)``: argmax, or nucleus sampling."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "greedy", "eos", "pad"))
def _generate(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, temperature, top_p, *,
              max_new_tokens, greedy, eos, pad):
    model: Qwen2 = nnx.merge(graphdef, state)
    cfg = model.config
    B, T = attention_mask.shape
    N = max_new_tokens
    cache = KVCache.zeros(cfg, B, T + N)

    # prefill: the prompt fills slots [0, T); logits of each row's last real token
    hidden, cache = model.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                                        write_index=0)
    last = T - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    next_pos = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # position of the first new token
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def pick(logits, done, rng):
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, temperature, top_p, greedy)
        tok = jnp.where(done, pad, tok)
        return tok, done | jnp.isin(tok, eos_arr), rng

    tok, done, rng = pick(logits, jnp.zeros((B,), bool), rng)
    out = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry):
        i, tok, out, cache, done, pos, rng = carry
        hidden, cache = model.hidden_states(
            tok[:, None], jnp.ones((B, 1), bool), position_ids=pos[:, None], cache=cache, write_index=T + i - 1
        )
        tok, done, rng = pick(model.logits(hidden[:, 0]), done, rng)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, tok, out, cache, done, pos + 1, rng

    carry = (jnp.int32(1), tok, out, cache, done, next_pos, rng)
    return jax.lax.while_loop(cond, body, carry)[2]


def init(cfg: Qwen2Config, seed: int = 0, mesh: Any = None) -> Qwen2:
    """A randomly initialised model, created directly on ``mesh`` when one is given."""
    return sharding.create_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(seed)), mesh)


def config_from_hf(hf: dict[str, Any], **overrides) -> Qwen2Config:
    """A transformers ``Qwen2Config`` dict (config.json) → :class:`Qwen2Config`."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Only hidden_act='silu' is supported, the checkpoint has {hf['hidden_act']!r}")
    if hf.get("use_sliding_window", False):
        raise ValueError("Sliding-window attention (use_sliding_window=true) is not supported.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported; only the default rotary embedding is.")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def config_to_hf(cfg: Qwen2Config) -> dict[str, Any]:
    """:class:`Qwen2Config` → keyword arguments of ``transformers.Qwen2Config``."""
    out = dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.initializer_range,
        use_sliding_window=False,
        dtype=cfg.param_dtype,
    )
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        out["head_dim"] = cfg.head_dim
    return out
