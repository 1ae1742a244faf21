"""Low-rank adapters (LoRA, Hu et al. 2021) on any DiT, the Wan family included.

An adapted `Dense` with kernel W [*in, *out] computes x W + b + s (x A) B, with
A [*in, r] (random, as Dense kernels are) and B [r, *out] (zero), s = alpha / r: at
initialisation the adapted model is the base model exactly. Adapters are `LoRAParam`
variables (an `nnx.Param` subclass) created where the layer is made, so they carry
logical axis names and, inside the stacked blocks, the scanned layer axis; a filter
separates them from the base (`nnx.state(model, LoRAParam)`).

Which layers: `lora.targets`, each a group name of `GROUPS` or a regular expression
matched in full against a layer's dotted path (`blocks.attn.q`, `time_proj`, ...).

A LoRA run trains only the adapters: the train state's `params` are the adapters (so
the optimizer state, the EMA and the checkpoints hold nothing base-sized), and the
base is a frozen part of the task (`frozen["base"]`, optionally bf16), read from
`model.init_from` or initialised from the seed at every start. Its fingerprint
(`fingerprint`) is saved in the state and checked at resume, so adapters are never
silently resumed on another base.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# lora.targets group -> the layer paths it covers (regular expressions).
GROUPS = {
    "attn": r"blocks\.attn\.(q|k|v|out)",  # self-attention
    "cross": r"blocks\.cross\.(q|k|v|out)",  # cross-attention to the text
    "ffn": r"blocks\.fc[12]",
    "time": r"time_(in|out|proj)",  # the timestep MLP and the shared modulation projection
    "text": r"cond_(in|out)",  # the caption projection
}
RANK_AXIS = "lora_rank"  # logical name of the rank axis (replicated: it is small)


class LoRAParam(nnx.Param):
  """An adapter matrix: trained in a LoRA run, while every other Param is the frozen base."""


def target_patterns(targets) -> list[re.Pattern]:
  """The compiled patterns of `lora.targets` (group names expanded)."""
  return [re.compile(GROUPS.get(t, t)) for t in targets]


def rank_for(cfg, path: str) -> int:
  """The adapter rank of the layer at dotted `path` under LoRAConfig `cfg`; 0: none."""
  if not cfg.rank:
    return 0
  return cfg.rank if any(p.fullmatch(path) for p in target_patterns(cfg.targets)) else 0


def scale(cfg) -> float:
  """s = alpha / rank (alpha 0 means alpha = rank: s = 1)."""
  return (cfg.alpha or cfg.rank) / cfg.rank


def is_adapter(path: tuple) -> bool:
  return bool(path) and path[-1] in ("lora_a", "lora_b")


def fingerprint(base: nnx.State) -> jax.Array:
  """[n, 2] float32: the sum and the sum of squares of every base array, in path
  order. Cheap (one pass over the weights on their devices) and sensitive to any
  real change of the weights; two meshes may differ in the last bits (reduction
  order), so compare with a tolerance (`check_fingerprint`)."""
  leaves = [v.get_value() for _, v in sorted(nnx.to_flat_state(base), key=lambda kv: kv[0])]
  stats = [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in leaves]
  return jnp.stack(stats) if stats else jnp.zeros((0, 2), jnp.float32)


def check_fingerprint(saved, current, source: str) -> None:
  """ValueError unless the base the adapters were trained on is the one loaded now."""
  saved, current = np.asarray(saved, np.float64), np.asarray(current, np.float64)
  if saved.shape != current.shape or not np.allclose(saved, current, rtol=1e-4, atol=1e-6):
    raise ValueError(f"the LoRA base ({source}) is not the base this run's adapters were trained on: its weights' "
                     "fingerprint differs from the one saved in the checkpoint. Point model.init_from at the "
                     "same weights (and lora.base_dtype at the same dtype), or start a new run directory.")


def merged_kernels(base: Mapping[tuple, np.ndarray], adapters: Mapping[tuple, np.ndarray],
                   s: float) -> dict[tuple, np.ndarray]:
  """Base parameters with every adapted kernel replaced by W + s A B (host arrays by
  path; stacked layers keep their leading axis). The result is a plain model."""
  out = dict(base)
  for path in adapters:
    if path[-1] != "lora_a":
      continue
    layer = path[:-1]
    a, b, w = adapters[path], adapters[layer + ("lora_b",)], base[layer + ("kernel",)]
    # a [(L,) *in, r], b [(L,) r, *out], w [(L,) *in, *out]: a stacked layer axis shows as one dim too many
    stacked = a.ndim + b.ndim - 2 - w.ndim == 1
    if stacked:
      delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
    else:
      delta = np.tensordot(a, b, axes=1)
    out[layer + ("kernel",)] = (w.astype(np.float32) + s * delta.astype(np.float32)).astype(w.dtype)
  return out
