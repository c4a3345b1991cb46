"""Sampling from UniPic: text-to-image, editing and understanding answers.

Text-to-image (MAR's masked autoregression, as in the release's ``sample``):

1. the prompt batch is ``[cond; uncond]`` (``2B`` rows) when ``cfg != 1``, else ``B`` rows;
   the prompt's KV cache is computed once (:meth:`UniPic.prefill`);
2. every row gets a random token order (the two halves share theirs); before step ``k`` of
   ``K = num_iter`` the first ``m_k`` tokens of the order are masked, ``m_0 = L``,
   ``m_{k+1} = max(1, min(m_k − 1, ⌊L·cos(π/2·(k+1)/K)⌋))`` and ``m_K = 0``;
3. step ``k`` computes the conditions ``z`` of all tokens (:meth:`UniPic.condition` on the
   cached prompt) and samples the tokens leaving the mask, ``order[m_{k+1} : m_k]``, with the
   diffusion head (respaced DDPM from ``x_T = xt_temperature·N(0, I)``, per-step noise
   scaled by ``temperature``; CFG scale ``cfg`` or, with ``cfg_schedule="linear"``,
   ``1 + (cfg − 1)·(L − m'_{k+1})/L`` where ``m'`` is the clamped count before the last
   step's zero), writing them into both halves. Mode-seeking decoding of late tokens (off by
   default, ``ddim_after=None``): a step whose visible fraction ``1 − m_k/L`` is
   ``≥ ddim_after`` decodes its tokens deterministically with DDIM (``η = 0``, the same
   respaced steps: ``x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1})·ε̂``, ``x̂0`` and ``ε̂`` from the
   guided prediction) from ``x_T = ddim_xt_scale·N(0, I)`` (``< 1``: nearer the mode);
   the per-step choice is an array argument of the compiled step, so it costs no compile;
4. the latents are decoded by the VAE to pixels and to uint8.

All counts are known before sampling, so each step is one compiled function of static
shape (the sampled tokens are gathered into ``max_k (m_k − m_{k+1})`` slots): one compile
per (batch, prompt length rounded up to ``PROMPT_MULTIPLE``, resolution, ``num_iter``),
reused across steps and calls (temperatures, ``ddim_after`` and the scales are traced).
The loop runs in Python, which gives the progress bar.
Randomness comes only from ``seed``.

Editing: the source image is VAE-encoded and run through the unmasked MAR encoder; its
``z_enc`` fills the ``<image>`` slots of ``<image>\\n{instruction}`` (unconditional:
``<image>\\nRepeat this image.``) and its encoder output ``x_con`` the decoder's masked slots.

Understanding: the image goes in as the config says (``"mar"``: pad to square with gray 127,
VAE, MAR encoder, ``proj_in``; ``"siglip2"``: the SigLIP2 tower) and the LLM answers greedily.

Shard the model over a mesh (``sharding.create_sharded`` / ``checkpoint.load_model(mesh=)``)
and every function here runs on it; the batch follows the ``batch`` logical axis.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unipic_jax import sharding
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import image as image_lib
from unipic_jax.models import mar as mar_lib
from unipic_jax.models.mar import mask_schedule
from unipic_jax.models.unipic import UniPic

CFG_SCHEDULES = ("constant", "linear")
# prompts are padded to a multiple of this many tokens, so that batches of similar prompts share one
# compiled step; positions follow each row's own length, so the padding moves only the last float bits
PROMPT_MULTIPLE = 16


def cfg_scales(cfg: float, schedule: str, length: int, clamped: np.ndarray) -> np.ndarray:
    """The guidance scale of each step."""
    if schedule == "constant":
        return np.full(len(clamped), cfg, np.float32)
    if schedule == "linear":
        return (1.0 + (cfg - 1.0) * (length - clamped.astype(np.float32)) / length).astype(np.float32)
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("grid",))
def _prefill(graphdef, state, input_ids, attention_mask, source_latents, *, grid):
    model: UniPic = nnx.merge(graphdef, state)
    x_con, z_src = (None, None) if source_latents is None else model.encode_image(source_latents)
    embeds = model.embed_prompt(input_ids, z_src)
    return model.prefill(embeds, attention_mask, grid), x_con


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("grid", "n_max", "guided", "record"))
def _step(graphdef, state, cache, x_con, tokens, orders, k, masked, scales, temperature, key, ddim, xt_temperature,
          ddim_xt_scale, *, grid, n_max, guided, record=False):
    """One MAR step: the new ``tokens``; with ``record``, also the diffusion path of the
    step's ``n_max`` token slots (``{"x": (S+1, B', n_max, C), "log_var", "noise": (S, …)}``,
    ``B'`` the sampled rows) and their token indices ``(B', n_max)`` (:mod:`unipic_jax.rl.rollout`)."""
    model: UniPic = nnx.merge(graphdef, state)
    B, L, C = tokens.shape
    m_now, m_next = masked[k], masked[k + 1]
    ranks = jnp.argsort(orders, axis=1)
    mask = (ranks < m_now).astype(jnp.float32)
    z = model.condition(latents=tokens.reshape(B, *grid, C), mask=mask, x_con=x_con, cache=cache)
    # the tokens leaving the mask: order[m_next : m_now], gathered into n_max slots
    padded = jnp.concatenate([orders, jnp.zeros((B, n_max), orders.dtype)], axis=1)
    idx = jax.lax.dynamic_slice_in_dim(padded, m_next, n_max, axis=1)
    valid = jnp.arange(n_max)[None, :] < (m_now - m_next)
    zs = jnp.take_along_axis(z, idx[..., None], axis=1).reshape(B * n_max, -1)
    key = jax.random.fold_in(key, k)
    head = dict(xt_temperature=xt_temperature, ddim=ddim[k], ddim_xt_scale=ddim_xt_scale, record=record)
    out = model.diffloss.sample(zs, key, temperature, scales[k] if guided else None, **head)
    new, path = out if record else (out, None)
    rows = B // 2 if guided else B
    new = new.reshape(rows, n_max, C)
    if guided:
        new = jnp.concatenate([new, new])  # the unconditional half follows the conditional one
    slots = jnp.where(valid, idx, L)  # out of range: dropped
    tokens = tokens.at[jnp.arange(B)[:, None], slots].set(new.astype(tokens.dtype), mode="drop")
    if not record:
        return tokens
    path = {name: v.reshape(v.shape[0], rows, n_max, C) for name, v in path.items()}
    return tokens, path, idx[:rows]


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(graphdef, state, latents):
    return nnx.merge(graphdef, state).vae.decode(latents)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(graphdef, state, pixels):
    return nnx.merge(graphdef, state).vae.encode(pixels)


def ddim_steps(masked: np.ndarray, ddim_after: float | None) -> np.ndarray:
    """Which of the ``K`` MAR steps decode deterministically (DDIM): those whose visible
    fraction before the step, ``1 − masked[k]/L``, is ``≥ ddim_after``; none for None."""
    K, L = len(masked) - 1, int(masked[0])
    if ddim_after is None:
        return np.zeros(K, bool)
    return (L - masked[:-1]).astype(np.float64) / L >= ddim_after


def check_sampling(temperature=1.0, xt_temperature=1.0, ddim_after=None, ddim_xt_scale=1.0) -> None:
    """Raises ``ValueError`` unless the temperatures and scales are numbers ``>= 0`` and
    ``ddim_after`` is None or in ``[0, 1]``."""
    for name, v in (("temperature", temperature), ("xt_temperature", xt_temperature),
                    ("ddim_xt_scale", ddim_xt_scale)):
        if not (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if ddim_after is not None and not (isinstance(ddim_after, (int, float, np.floating, np.integer))
                                       and not isinstance(ddim_after, bool) and 0 <= ddim_after <= 1):
        raise ValueError(f"ddim_after must be None (off) or a visible fraction in [0, 1], got {ddim_after!r}")


def sample_latents(
    model: UniPic,
    input_ids,
    attention_mask,
    *,
    grid: tuple[int, int],
    seed: int = 0,
    num_iter: int = 32,
    cfg: float = 3.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    xt_temperature: float = 1.0,
    ddim_after: float | None = None,
    ddim_xt_scale: float = 1.0,
    source_latents=None,
    progress: bool = False,
    record: Sequence[int] = (),
):
    """Generated latents ``(B, h, w, C)`` for prompts ``input_ids (N, T)`` (``N = 2B``:
    ``[cond; uncond]`` when ``cfg != 1``, else ``N = B``) on a token ``grid = (h, w)``.
    ``source_latents (B, h, w, C)``: the source images for editing (their ``L + S``
    ``<image>`` slots must be in the prompts).

    ``temperature`` scales the diffusion head's per-step DDPM noise, ``xt_temperature`` its
    starting noise ``x_T``; steps whose visible fraction is ``≥ ddim_after`` (None: none)
    decode with DDIM ``η = 0`` from ``x_T = ddim_xt_scale·N(0, I)`` (module docstring). The
    defaults are the release's sampler.

    ``record``: MAR steps whose diffusion paths are kept (GRPO's rollouts,
    :mod:`unipic_jax.rl.rollout`); then returns ``(latents, record)`` with ``record =
    {"orders": (B, L), "masked": (K+1,), "scales": (K,), "steps": {k: (path, idx)}}`` (the
    path and token slots of ``_step``). Recording does not change the samples."""
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask, bool)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal (N, T)")
    guided = cfg != 1.0
    N = input_ids.shape[0]
    if guided and N % 2:
        raise ValueError(f"With cfg={cfg} the prompts are [cond; uncond], an even number of rows; got {N}")
    B = N // 2 if guided else N
    check_sampling(temperature, xt_temperature, ddim_after, ddim_xt_scale)
    vocab = model.config.llm.vocab_size
    if input_ids.max(initial=0) >= vocab or input_ids.min(initial=0) < 0:
        raise ValueError(f"Token ids must lie in [0, {vocab}) for this model; got up to {input_ids.max()}. "
                         "Is the tokenizer the one the model was trained with?")
    h, w = grid
    L, C = h * w, model.config.mar.token_dim
    masked, clamped = mask_schedule(L, num_iter)
    scales = cfg_scales(cfg, cfg_schedule, L, clamped)
    n_max = int(np.max(masked[:-1] - masked[1:]))
    ddim = ddim_steps(masked, ddim_after)
    record = sorted({int(k) for k in record})
    if record and not (0 <= record[0] and record[-1] < num_iter):
        raise ValueError(f"record holds MAR steps {record}; they must lie in [0, num_iter={num_iter})")
    if any(ddim[k] for k in record):
        raise ValueError(f"MAR steps {[k for k in record if ddim[k]]} are recorded but decode with DDIM "
                         f"(ddim_after={ddim_after}): a deterministic step has no log-probability")
    if source_latents is not None:
        source_latents = jnp.asarray(source_latents, jnp.float32)
        if source_latents.shape != (B, h, w, C):
            raise ValueError(f"source_latents {source_latents.shape} must be (B, h, w, C) = {(B, h, w, C)}")
        if guided:
            source_latents = jnp.concatenate([source_latents, source_latents])
    key = jax.random.key(seed)
    k_order, k_sample = jax.random.split(key)
    orders = mar_lib.random_orders(k_order, B, L)
    if guided:
        orders = jnp.concatenate([orders, orders])

    graphdef, state = nnx.split(model)
    state = sharding.pure(state)  # num_iter calls of _step: plain arrays flatten fast

    def run():
        cache, x_con = _prefill(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                source_latents, grid=(h, w))
        tokens = jnp.zeros((N, L, C), jnp.float32)
        steps = range(num_iter)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"sampling {h}x{w} tokens", unit="step")
        kept = {}
        for k in steps:
            out = _step(graphdef, state, cache, x_con, tokens, orders, jnp.int32(k), jnp.asarray(masked),
                        jnp.asarray(scales), jnp.float32(temperature), k_sample, jnp.asarray(ddim),
                        jnp.float32(xt_temperature), jnp.float32(ddim_xt_scale), grid=(h, w), n_max=n_max,
                        guided=guided, record=k in record)
            tokens, kept[k] = (out[0], out[1:]) if k in record else (out, None)
        latents = tokens[:B].reshape(B, h, w, C)
        if not record:
            return latents
        return latents, {"orders": orders[:B], "masked": masked, "scales": scales,
                         "steps": {k: kept[k] for k in record}}

    return sharding.on_params_mesh(state, run)


def decode(model: UniPic, latents) -> np.ndarray:
    """Latents ``(B, h, w, C)`` → uint8 images ``(B, 16h, 16w, 3)``."""
    graphdef, state = nnx.split(model)
    return image_lib.to_uint8(sharding.on_params_mesh(state, _decode, graphdef, state, jnp.asarray(latents)))


def encode(model: UniPic, images, height: int, width: int, mode: str = "crop") -> jax.Array:
    """Images (PIL, arrays or paths) → scaled VAE latents ``(B, h, w, C)`` (see ``image.fit``)."""
    pixels = image_lib.vae_pixels([_load(im) for im in images], height, width, mode)
    graphdef, state = nnx.split(model)
    return sharding.on_params_mesh(state, _encode, graphdef, state, jnp.asarray(pixels))


def _load(image):
    return image_lib.load_image(image) if isinstance(image, (str, os.PathLike)) else image


def _size(model: UniPic, size) -> tuple[int, int, tuple[int, int]]:
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    f = model.config.vae.downsample
    if H % f or W % f or H <= 0 or W <= 0:
        raise ValueError(f"Image size {H}x{W} must be positive multiples of the VAE's downsampling factor {f}")
    return H, W, (H // f, W // f)


def _tokenize(model: UniPic, tokenizer, texts: Sequence[str], image_slots: int = 0, multiple: int = 1):
    """Right-padded ``(ids, mask)``, ``T`` rounded up to a ``multiple``."""
    image_id = model.config.image_token_id
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True).input_ids
        if image_slots:
            if tok_lib.image_token_id(tokenizer) != image_id:
                raise ValueError(f"The tokenizer's {tok_lib.IMAGE_TOKEN} id is {tok_lib.image_token_id(tokenizer)} "
                                 f"but the model's image_token_id is {image_id}")
            ids = tok_lib.expand_image_tokens(ids, image_id, image_slots)
        rows.append(ids)
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), T), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    return ids, mask


def text_to_image(model: UniPic, tokenizer, prompts: Sequence[str], *, size=256, seed: int = 0, num_iter: int = 32,
                  cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
                  xt_temperature: float = 1.0, ddim_after: float | None = None, ddim_xt_scale: float = 1.0,
                  progress: bool = False) -> np.ndarray:
    """uint8 images ``(B, H, W, 3)`` for text prompts (release template and defaults; the
    sampling arguments as :func:`sample_latents` takes them)."""
    check_sampling(temperature, xt_temperature, ddim_after, ddim_xt_scale)
    H, W, grid = _size(model, size)
    texts = [tok_lib.generation_prompt(p) for p in prompts]
    if cfg != 1.0:
        texts += [tok_lib.generation_prompt(None)] * len(prompts)
    ids, mask = _tokenize(model, tokenizer, texts, multiple=PROMPT_MULTIPLE)
    latents = sample_latents(model, ids, mask, grid=grid, seed=seed, num_iter=num_iter, cfg=cfg,
                             cfg_schedule=cfg_schedule, temperature=temperature, xt_temperature=xt_temperature,
                             ddim_after=ddim_after, ddim_xt_scale=ddim_xt_scale, progress=progress)
    return decode(model, latents)


def edit(model: UniPic, tokenizer, images, instructions: Sequence[str], *, size=256, seed: int = 0,
         num_iter: int = 32, cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 0.85,
         xt_temperature: float = 1.0, ddim_after: float | None = None, ddim_xt_scale: float = 1.0,
         progress: bool = False) -> np.ndarray:
    """Edited uint8 images ``(B, H, W, 3)``: each source image (centre-cropped to the output
    aspect and resized) changed as its instruction says (sampling arguments as
    :func:`sample_latents` takes them)."""
    check_sampling(temperature, xt_temperature, ddim_after, ddim_xt_scale)
    if len(images) != len(instructions):
        raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    H, W, grid = _size(model, size)
    source = encode(model, images, H, W, "crop")
    slots = grid[0] * grid[1] + model.config.mar.buffer_size
    texts = [tok_lib.edit_prompt(i) for i in instructions]
    if cfg != 1.0:
        texts += [tok_lib.edit_prompt(None)] * len(instructions)
    ids, mask = _tokenize(model, tokenizer, texts, image_slots=slots, multiple=PROMPT_MULTIPLE)
    latents = sample_latents(model, ids, mask, grid=grid, seed=seed, num_iter=num_iter, cfg=cfg,
                             cfg_schedule=cfg_schedule, temperature=temperature, xt_temperature=xt_temperature,
                             ddim_after=ddim_after, ddim_xt_scale=ddim_xt_scale, source_latents=source,
                             progress=progress)
    return decode(model, latents)


@functools.partial(jax.jit, static_argnums=(0,))
def _understanding_embeds(graphdef, state, input_ids, latents, pixel_values, pixel_attention_mask, spatial_shapes):
    return nnx.merge(graphdef, state).understanding_embeds(input_ids, latents, pixel_values, pixel_attention_mask,
                                                           spatial_shapes)


def describe(model: UniPic, tokenizer, images, questions: Sequence[str], *, size=256,
             max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to one question per image, through ``config.understanding``."""
    from unipic_jax.models import understanding as und

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if tok_lib.image_token_id(tokenizer) != model.config.image_token_id:
        raise ValueError(f"The tokenizer's {tok_lib.IMAGE_TOKEN} id is {tok_lib.image_token_id(tokenizer)} but the "
                         f"model's image_token_id is {model.config.image_token_id}")
    images = [_load(im) for im in images]
    latents = pv = pmask = shapes = None
    if model.config.understanding == "siglip2":
        pv, pmask, shapes = und.preprocess(model.config.vision, images)
        ids, mask, _ = und.build_prompts(tokenizer, questions, pmask)
    else:
        H, W, grid = _size(model, size)
        latents = encode(model, images, H, W, "pad")
        slots = grid[0] * grid[1] + model.config.mar.buffer_size
        ids, mask = _tokenize(model, tokenizer, [tok_lib.understanding_prompt(q) for q in questions], slots)
    graphdef, state = nnx.split(model)
    embeds = sharding.on_params_mesh(state, _understanding_embeds, graphdef, state, jnp.asarray(ids), latents,
                                     pv, pmask, shapes)
    new = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok_lib.stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in np.asarray(new)]


def save_png(images: np.ndarray, paths: Sequence[str | os.PathLike]) -> list[str]:
    """Writes uint8 ``(B, H, W, 3)`` images as PNG files (each written to a temporary name
    and renamed, so a file at ``path`` is always complete)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(paths):
        raise ValueError(f"Expected {len(paths)} uint8 (H, W, 3) images, got {images.dtype} {images.shape}")
    out = []
    for im, path in zip(images, paths, strict=True):
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.png"
        Image.fromarray(im).save(tmp, format="PNG")
        os.replace(tmp, path)
        out.append(path)
    return out
