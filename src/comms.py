"""Communication of a train step: what the compiled program moves (`src.hlo`) next to the ideal
for the sharding in use, per chip and per step. `src.aot` reports both.

The ideal, from the parameters' shardings (their mesh axes) and the model's sizes, in the compute
dtype, with the wire costs of `src.hlo` (ring algorithms over a group of g devices):

- a parameter split over token axes (data, fsdp, sequence: those the tokens are split over)
  is all-gathered over them for the forward and again for the backward (FSDP); frozen weights the
  step only runs forward (the text encoder) once;
- each trained parameter's gradient is reduce-scattered over the token axes it is split over
  and all-reduced over those it is replicated on (plain data parallelism: one all-reduce);
- Ulysses context parallelism (`mesh.sequence` > 1) moves, per layer and pass, q, k, v to
  head-split and the output back for self-attention, and q and the output for cross-attention
  (the text is whole on every device): 6 all-to-alls of a chip's tokens x width, in the
  forward, the backward and (with remat) the recomputed forward.

Tensor-parallel activation all-reduces are not in the ideal (the presets use none).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from src import hlo
from src.mesh import TOKEN_AXES, spec_axes
from src.models.dit import dimensions

GIB = 2**30


def parameter_ideal(params, mesh_shape: dict[str, int], dtype_bytes: float, *, trained: bool, gathers: int) -> dict:
  """Ideal bytes per chip of the parameters `params` (ShapeDtypeStructs with NamedShardings):
  `gathers` all-gathers over their token sharded axes, and with `trained` their gradients'
  reduction."""
  out = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0}
  for x in jax.tree.leaves(params):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    used = spec_axes(x.sharding.spec)
    g = math.prod(mesh_shape[a] for a in used if a in TOKEN_AXES)
    r = math.prod(mesh_shape[a] for a in TOKEN_AXES if a not in used)
    shard = x.size / math.prod(mesh_shape[a] for a in used) * dtype_bytes  # a device's share
    out["all-gather"] += gathers * shard * (g - 1)
    if trained:
      out["reduce-scatter"] += shard * (g - 1)  # the whole gradient, g shards, less its own
      out["all-reduce"] += 2 * shard * (r - 1) / r
  return out


def ulysses_ideal(tokens_per_chip: float, width: int, depth: int, dtype_bytes: float, sequence: int,
                  remat: bool) -> float:
  """Ideal all-to-all bytes per chip of Ulysses attention over `sequence` devices."""
  if sequence <= 1:
    return 0.0
  passes = 3 if remat else 2
  return depth * passes * 6 * tokens_per_chip * width * dtype_bytes * (sequence - 1) / sequence


def report(hlo_text: str, devices: list, ideal: dict) -> dict:
  """The step's collectives by kind (executions, GiB a chip over ICI and DCN), the ideal by
  kind, and actual / ideal of the total."""
  slices = {i: getattr(d, "slice_index", 0) for i, d in enumerate(devices)}
  found, unknown = hlo.collectives(hlo_text, len(devices), slice_of=slices.get)
  actual = hlo.summarise(found)
  total = sum(v["ici_bytes"] + v["dcn_bytes"] for v in actual.values())
  ideal_total = sum(ideal.values())
  gib = lambda b: round(b / GIB, 6)
  return dict(
      by_kind={k: dict(count=v["count"], ici_gib=gib(v["ici_bytes"]), dcn_gib=gib(v["dcn_bytes"]))
               for k, v in actual.items()},
      total_gib=gib(total), ideal_gib={k: gib(v) for k, v in ideal.items()}, ideal_total_gib=gib(ideal_total),
      actual_over_ideal=round(total / ideal_total, 3) if ideal_total else None,
      loops_with_unknown_trip_count=unknown)


def step_ideal(cfg, params, frozen: dict, mesh_shape: dict[str, int], rows: int, tokens_per_row: int) -> dict:
  """The ideal of a DiT train step by kind, bytes per chip: the trained `params` and a LoRA run's
  frozen base gathered twice, the trained gradients reduced, the umT5 encoder gathered once, and
  Ulysses' all-to-alls over `rows` x `tokens_per_row` tokens of the global batch."""
  compute = jnp.dtype(cfg.model.dtype).itemsize
  ideal = parameter_ideal(params, mesh_shape, compute, trained=True, gathers=2)
  parts = []
  if "base" in frozen:
    parts.append(parameter_ideal(frozen["base"], mesh_shape, compute, trained=False, gathers=2))
  if "text" in frozen:
    parts.append(parameter_ideal(frozen["text"].params, mesh_shape, jnp.dtype(cfg.text.dtype).itemsize,
                                 trained=False, gathers=1))
  for part in parts:
    ideal = {k: v + part[k] for k, v in ideal.items()}
  depth, width, _ = dimensions(cfg.model)
  chips = math.prod(mesh_shape[a] for a in TOKEN_AXES)
  ideal["all-to-all"] = ulysses_ideal(rows * tokens_per_row / chips, width, depth, compute,
                                      mesh_shape.get("sequence", 1), cfg.model.remat != "none")
  return ideal
