"""The GRPO loop on the generator: rollouts, frozen rewards, group advantages, clipped updates.

One iteration ``i`` (everything a pure function of ``(seed, i)`` and the parameters):

1. ``P`` prompts from the prompt source, each repeated ``G = group_size`` times consecutively;
2. a :class:`~unipic_jax.rl.rollout.Plan` drawn from ``(seed, i)``: ``train_iterations`` of the
   ``num_iter`` MAR steps and ``train_steps`` of the noisy reverse steps of each (rollouts may
   use fewer diffusion steps than evaluation: ``sampling_steps``);
3. the rollout (the release's sampler, CFG ``cfg``, ``temperature``) and its images;
4. the rewards (:mod:`unipic_jax.rewards`, frozen host functions) and the advantages
   ``(r − mean_g)/(std_g + ε)`` per prompt group;
5. the reference model's means at the recorded steps (a frozen copy of the starting
   parameters, never in the optimizer), for the KL;
6. ``updates_per_batch`` optimizer steps on the clipped objective + ``kl_weight``·KL
   (:mod:`unipic_jax.rl.grpo`); the first one fixes ``log p_old``.

Only the parts named in ``trainable`` change (``optax.set_to_zero`` elsewhere); the reward
models' parameters are not parameters of the policy at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unipic_jax import rewards as rewards_lib
from unipic_jax import sample as sample_lib
from unipic_jax import tokenizer as tok_lib
from unipic_jax.rl import grpo, rollout
from unipic_jax.train import optim


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 4  # G: images a prompt
    prompts: int = 2  # P: prompts a rollout batch (per process)
    size: tuple[int, int] = (32, 32)
    num_iter: int = 16  # MAR steps of a rollout
    sampling_steps: str | None = None  # the diffusion head's respacing in rollouts (None: the model's)
    cfg: float = 3.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    train_iterations: int = 4  # MAR steps trained a trajectory
    train_steps: int = 4  # noisy reverse steps trained a MAR step
    updates_per_batch: int = 1
    clip_eps: float = 0.2
    kl_weight: float = 0.01
    adv_eps: float = 1e-4
    rewards: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"shapes": 1.0})

    def __post_init__(self):
        for name in ("group_size", "prompts", "num_iter", "train_iterations", "train_steps", "updates_per_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size={self.group_size}: a group needs at least 2 images a prompt, "
                             "or every advantage is 0")
        if self.kl_weight < 0 or self.clip_eps <= 0:
            raise ValueError(f"grpo.kl_weight ({self.kl_weight}) must be >= 0 and grpo.clip_eps ({self.clip_eps}) > 0")
        sample_lib.check_sampling(self.temperature)


def _seed(seed: int, i: int, what: int) -> int:
    return int(np.random.SeedSequence([seed, i, what]).generate_state(1)[0] & 0x7FFFFFFF)


class GRPOLoop:
    """Holds the policy's parameters, the frozen reference, the optimizer and the jitted update.

    ``prompt_source(i) → (prompts, metadata)`` gives iteration ``i``'s ``P`` prompts."""

    def __init__(self, model, tokenizer, config: GRPOConfig, prompt_source: Callable[[int], tuple[Sequence[str],
                 Sequence[dict]]], *, lr: float, steps: int, trainable: Sequence[str] = ("mar", "diffloss"),
                 seed: int = 0, clip: float = 1.0):
        self.config, self.tokenizer, self.prompt_source, self.seed = config, tokenizer, prompt_source, seed
        self.reward = rewards_lib.combine(config.rewards)
        view = rollout.with_sampling_steps(model, config.sampling_steps)
        self.graphdef, params, self.rest = nnx.split(view, nnx.Param, ...)
        self.params = jax.tree.map(jnp.copy, params)  # the update donates its buffers; the caller's model stays
        self.reference = params  # frozen: never passed to the optimizer
        self.tx = optim.make_optimizer(params, lr=lr, steps=steps * config.updates_per_batch, clip=clip,
                                       trainable=trainable)
        self.opt_state = self.tx.init(params)
        self.grid = sample_lib._size(view, config.size)[2]
        self._update = grpo.make_update(self.graphdef, self.rest, self.tx, grid=self.grid, clip_eps=config.clip_eps,
                                        kl_weight=config.kl_weight)
        self._log_probs = grpo.make_log_probs(self.graphdef, self.rest, self.grid)

    @property
    def model(self):
        """The policy with the current parameters (the rollout view: its sampling steps)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def tokenize(self, prompts: Sequence[str]):
        texts = [tok_lib.generation_prompt(p) for p in prompts]
        if self.config.cfg != 1.0:
            texts += [tok_lib.generation_prompt(None)] * len(prompts)
        return sample_lib._tokenize(self.model, self.tokenizer, texts, multiple=sample_lib.PROMPT_MULTIPLE)

    def rollout(self, i: int):
        """Iteration ``i``'s ``(batch, images, prompts, metadata)``."""
        c = self.config
        prompts, metadata = self.prompt_source(i)
        if len(prompts) != c.prompts or len(metadata) != c.prompts:
            raise ValueError(f"the prompt source gave {len(prompts)} prompts and {len(metadata)} metadata entries for "
                             f"iteration {i}; grpo.prompts is {c.prompts}")
        prompts = [p for p in prompts for _ in range(c.group_size)]
        metadata = [m for m in metadata for _ in range(c.group_size)]
        ids, mask = self.tokenize(prompts)
        model = self.model
        plan = rollout.make_plan(np.random.default_rng(_seed(self.seed, i, 0)), c.num_iter,
                                 model.diffloss.sample_schedule.num_steps, c.train_iterations, c.train_steps)
        latents, batch = rollout.rollout(model, ids, mask, plan, grid=self.grid, seed=_seed(self.seed, i, 1),
                                         num_iter=c.num_iter, cfg=c.cfg, cfg_schedule=c.cfg_schedule,
                                         temperature=c.temperature)
        return batch, sample_lib.decode(model, latents), prompts, metadata

    def step(self, i: int) -> dict:
        """One GRPO iteration; returns its metrics (host floats) and ``"images"``, ``"prompts"``."""
        c = self.config
        batch, images, prompts, metadata = self.rollout(i)
        total, parts = self.reward(prompts, images, metadata)
        adv = grpo.group_advantages(total, c.group_size, c.adv_eps)
        _, ref_mean = self._log_probs(self.reference, batch)
        old = jnp.zeros_like(batch["logp"])
        metrics = []
        for u in range(c.updates_per_batch):
            self.params, self.opt_state, before, m = self._update(self.params, self.opt_state, batch, old, ref_mean,
                                                                   jnp.asarray(adv), jnp.asarray(u == 0))
            if u == 0:
                old = before
            metrics.append(m)
        out = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
        out.update(ratio_first=float(metrics[0]["ratio"]), reward=float(total.mean()), reward_std=float(total.std()),
                   advantage_std=float(adv.std()), **{f"reward/{k}": float(v.mean()) for k, v in parts.items()})
        return {**out, "images": images, "prompts": prompts}
