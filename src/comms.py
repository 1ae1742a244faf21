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
- Ring attention (`model.context_parallel: ring`) passes, per layer, each chip's key and value
  slice n - 1 hops around the n devices of the ring (and its segment ids) in the forward (again
  in a recomputed forward), and in the backward k and v n - 1 hops plus their gradients n hops
  (home; float32 while accumulating, the last hop in the compute dtype): collective-permutes.
  The compiler hoists the segment ids' hops out of the layer loop (the same ids every layer), so
  the program moves a little less than this ideal. USP (ring across groups of u) adds, per pass, 4 all-to-alls
  (q, k, v in, the output back) over each group; cross-attention moves nothing (queries stay split,
  the caption is whole).

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


def ring_ideal(tokens_per_chip: float, width: int, depth: int, dtype_bytes: float, hops: int,
               remat: bool, group: int = 1) -> float:
  """Ideal collective-permute bytes per chip of ring attention over `hops` devices (or USP
  groups of `group`): a chip's k and v (tokens_per_chip x width each) and the int32 segment
  ids of the group's tokens per hop."""
  if hops <= 1:
    return 0.0
  kv = 2 * tokens_per_chip * width * dtype_bytes + 4 * tokens_per_chip * group
  # dk, dv travel in float32 while they accumulate; the last hop home carries them in the dtype of k
  grads = 2 * tokens_per_chip * width * (4 * (hops - 1) + dtype_bytes)
  forwards = 2 if remat else 1
  return depth * ((forwards + 1) * (hops - 1) * kv + grads)


def context_parallel_ideal(model, tokens_per_chip: float, width: int, depth: int, dtype_bytes: float,
                           sequence: int, heads: int) -> dict:
  """Ideal all-to-all and collective-permute bytes per chip of model.context_parallel."""
  from src.models.ring import ulysses_group

  remat = model.remat != "none"
  if model.context_parallel == "ulysses":
    return {"all-to-all": ulysses_ideal(tokens_per_chip, width, depth, dtype_bytes, sequence, remat)}
  u = 1 if model.context_parallel == "ring" else model.ulysses_degree or ulysses_group(sequence, heads)
  passes = 3 if remat else 2
  a2a = depth * passes * 4 * tokens_per_chip * width * dtype_bytes * (u - 1) / u
  return {"all-to-all": a2a, "collective-permute": ring_ideal(tokens_per_chip, width, depth, dtype_bytes,
                                                              sequence // u, remat, u)}


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
  context parallelism's all-to-alls and collective-permutes over `rows` x `tokens_per_row` tokens of
  the global batch."""
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
  depth, width, heads = dimensions(cfg.model)
  chips = math.prod(mesh_shape[a] for a in TOKEN_AXES)
  sequence, tensor = mesh_shape.get("sequence", 1), mesh_shape.get("tensor", 1)
  ideal.update(context_parallel_ideal(cfg.model, rows * tokens_per_row / chips, width // tensor, depth, compute,
                                      sequence, heads // tensor))
  return ideal
