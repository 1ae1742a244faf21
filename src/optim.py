"""Optimizer: AdamW, linear warmup into cosine (or constant) decay, global-norm
clipping, and an exponential moving average of the parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from src.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate by the optimizer's step count (0 at the first update): linear
  warmup from 0 to `lr` over `warmup_steps`, then cosine down to `lr * min_lr_ratio`
  at `total_steps` (or `lr` held, for decay=constant). Evaluated at count + 1, so the
  first update already moves (lr / warmup_steps) rather than spending a step at
  lr = 0, and the last (count total_steps - 1) is at the end value. The warmup is cut
  to total_steps - 1 when longer, so a short run still reaches its peak."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if cfg.decay == "constant":
    base = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup])
  else:
    base = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
  return lambda count: base(count + 1)


def decay_mask(params):
  """Which parameters take weight decay: those created with `decay=True`
  (`layers.param`), i.e. projection and conv kernels, not biases, norm scales,
  embedding or modulation tables. An explicit mark rather than a rule on names, so
  renaming an attribute cannot silently change what decays.

  `params` is an nnx State (or a tree shaped like it: gradients, updates, abstract
  states); the result has a bool at each Variable, a prefix of `params`, which is
  what optax's `mask` takes. A leaf outside any Variable has no mark to read, so it
  is an error rather than silently undecayed."""
  def marked(v) -> bool:
    if not isinstance(v, nnx.Variable):
      raise TypeError(f"decay_mask needs nnx Variables (an nnx.split State), got {type(v).__name__}")
    return bool(v.get_metadata().get("decay", False))

  return jax.tree.map(marked, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, its learning-rate schedule): the schedule is built once and returned,
  so what the trainer logs is the very function the optimizer steps with."""
  schedule = make_schedule(cfg, total_steps)
  optimizer = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
  )
  return optimizer, schedule


def ema_decay_at(count, decay: float, warmup: bool):
  """The decay of the EMA update after optimizer update `count` (0 first): `decay`, or
  with warm-up min(decay, (1 + count) / (10 + count)) (the usual schedule: 0.1 at the
  first update, 0.5 at the 8th, 0.99 near the 900th), so the average of a short run is
  not still mostly its random init: 0.9999 alone needs ~10k steps to forget it."""
  if not warmup:
    return decay
  count = jnp.asarray(count, jnp.float32)
  return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def update_ema(ema, params, decay):
  """One EMA step, e <- e + (1 - decay)(p - e): `decay` is the weight kept on the old
  average, so the EMA forgets with a time constant of about 1 / (1 - decay) steps."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def state_shardings(optimizer: optax.GradientTransformation, params, mesh):
  """Shardings of the optimizer state: moments like their parameters, counters
  replicated. A plain `jax.jit(optimizer.init)(params)` replicates the moments (zeros
  do not depend on the parameters' values, so no sharding propagates to them)."""
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, p: p.sharding, abstract, params,
                               transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
