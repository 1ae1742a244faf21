"""FSDP's weight-gradient reduction, one torus dimension at a time.

A kernel split over `fsdp` gets its gradient from every device's tokens: partial sums to be
reduce-scattered over the fsdp axis. On TPU slices from 8 v5p chips on (a 3D torus), and on the
2D tori of v5e-16 and v6e-256, the compiler lowers that reduce-scatter -- made by GSPMD from a sharding
constraint or asked for with shard_map's psum_scatter alike -- as collective-permutes or an
all-reduce of the whole gradient and a slice: about twice the ideal bytes. One reduce-scatter per
torus dimension, over the chips that differ only in that coordinate, it keeps as reduce-scatters
at the ideal volume (benchmarks/reduce_scatter.py; docs/pod.md section 3).

The compiler's choice is not a mistake by its own cost model: a ring along one torus dimension
uses that dimension's links only, where its all-reduce spans all of them, and it prices the
per-dimension form 4-8% slower for a step (docs/pod.md section 3). So the TPU compiler's form
stays the default; `model.gradient_reduce=torus` (`reduction`) asks for this one, to measure
on a real pod.

`dot` is a Dense layer's tensordot with that reduction: asked for, and where the mesh's fsdp
axis spans more than one torus dimension, it runs inside shard_map (manual over the batch
axes, tensor and sequence splits left to GSPMD), gathering the kernel's shards explicitly, and the gather's
custom VJP scatters the gradient back over `fsdp` one dimension at a time (the transpose sums
it over `data`). The matmul stays a plain dot_general, so remat policies see it as before.
Elsewhere (CPU, GPU, one torus dimension, a kernel split otherwise, rows the batch devices do
not divide) it is the plain tensordot of the gathered kernel (`mesh.gather_for_use`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from src.mesh import BATCH_AXES, TOKEN_AXES, current_rules, gather_for_use, logical_to_spec

_MODE = contextvars.ContextVar("gradient_reduce", default="compiler")


@contextlib.contextmanager
def reduction(mode: str):
  """`dot`s traced inside reduce their kernels' gradients as `mode` says (model.gradient_reduce:
  compiler | torus)."""
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


Plan = tuple[tuple[tuple[tuple[int, ...], ...], ...], tuple[int, ...]]  # (groups per torus step, held blocks)


def device_coords(device) -> tuple[int, ...] | None:
  """A device's chip coordinates in its slice's torus (TPU), None elsewhere."""
  coords = getattr(device, "coords", None)
  return tuple(coords) if coords is not None else None


def torus_steps(coords: np.ndarray) -> Plan | None:
  """For the chips of one mesh axis (`coords` [n, dims], in axis order), filling a grid: per
  varying torus dimension, fastest-varying along the axis first, the groups of axis indices that
  differ only in it (each in coordinate order: a chip's place in its group is its coordinate's
  rank); and `held`, the block of the scattered array that chip i keeps at the end (the first
  dimension's rank the most significant digit). None unless the chips fill the grid once each."""
  n = len(coords)
  dims = [d for d in range(coords.shape[1]) if len(set(coords[:, d])) > 1]
  dims.sort(key=lambda d: int(np.argmax(coords[:, d] != coords[0, d])))
  sizes = [len(set(coords[:, d])) for d in dims]
  if int(np.prod(sizes)) != n or len({tuple(c) for c in coords}) != n:
    return None
  ranks = {d: np.unique(coords[:, d], return_inverse=True)[1] for d in dims}
  steps = []
  for d in dims:
    others = [k for k in dims if k != d]
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(n), key=lambda i: ranks[d][i]):
      groups.setdefault(tuple(coords[i][others]), []).append(i)
    steps.append(tuple(tuple(g) for g in groups.values()))
  held = sum(ranks[d] * int(np.prod(sizes[k + 1:])) for k, d in enumerate(dims))
  return tuple(steps), tuple(int(h) for h in held)


def torus_order(g: jax.Array, held: Sequence[int]) -> jax.Array:
  """Row blocks of `g` reordered so that the scatters hand chip i its own block i: block
  held[i] of the result is block i of `g`."""
  n = len(held)
  blocks = g.reshape(n, g.shape[0] // n, *g.shape[1:])
  return blocks[np.argsort(np.asarray(held))].reshape(g.shape)


def torus_reduce(g: jax.Array, steps, held: Sequence[int], axis: str = "fsdp") -> jax.Array:
  """Inside shard_map: the sum over `axis` of each device's `g`, device i keeping row block i,
  as one reduce-scatter per torus dimension (`torus_steps`)."""
  g = torus_order(g, held)
  for groups in steps:
    g = jax.lax.psum_scatter(g, axis, scatter_dimension=0, tiled=True, axis_index_groups=[list(x) for x in groups])
  return g


@functools.lru_cache(maxsize=16)
def mesh_plan(mesh: jax.sharding.Mesh) -> Plan | None:
  """The torus steps of the mesh's fsdp axis, the same on every line of it; None if it spans
  fewer than two torus dimensions, or the devices have no coordinates, or lines differ."""
  devices = np.moveaxis(mesh.devices, mesh.axis_names.index("fsdp"), -1).reshape(-1, mesh.shape["fsdp"])
  plans = set()
  for line in devices:
    coords = [device_coords(d) for d in line]
    if any(c is None for c in coords):
      return None
    plans.add(torus_steps(np.array(coords)))
  plan = plans.pop() if len(plans) == 1 else None
  return plan if plan is not None and len(plan[0]) >= 2 else None


def _concrete_mesh():
  from jax._src import mesh as mesh_internal  # the set_mesh mesh, devices included, while tracing

  mesh = mesh_internal.get_concrete_mesh()
  return None if mesh is None or mesh.empty else mesh


def _plan_for(names: Sequence[str | None], x_shape: tuple[int, ...]):
  """(mesh, plan, the kernel's fsdp dim) when `dot` should reduce per torus dimension, else None."""
  if _MODE.get() != "torus":
    return None
  mesh = _concrete_mesh()
  if mesh is None or not current_rules() or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] < 2:
    return None
  spec = logical_to_spec(names)
  entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
  token_dims = [i for i, e in enumerate(entries) if set(e) & set(TOKEN_AXES)]
  if len(token_dims) != 1 or entries[token_dims[0]] != ("fsdp",):
    return None
  if tuple(logical_to_spec(("act_batch",)))[0] != BATCH_AXES:
    return None
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  plan = mesh_plan(mesh)
  if plan is None or not x_shape or x_shape[0] % rows:
    return None
  return mesh, plan, token_dims[0]


def dot(x: jax.Array, kernel: jax.Array, names: Sequence[str | None], n_in: int) -> jax.Array:
  """tensordot(x, kernel, n_in), the kernel (logical axes `names`) gathered for use; its gradient
  reduced one torus dimension at a time where that applies (module docstring)."""
  found = _plan_for(names, x.shape)
  if found is None:
    return jnp.tensordot(x, gather_for_use(kernel, names), axes=n_in)
  mesh, plan, dim = found
  split = P(*[("fsdp" if i == dim else None) for i in range(kernel.ndim)])

  def local(x, w):  # one device's rows; the kernel's own shard, gathered here
    return jnp.tensordot(x, _torus_gather(w, plan, dim), axes=n_in)

  # Manual over the batch axes only: tensor (and sequence) splits stay GSPMD's. Without check_vma
  # the gathered kernel's cotangent reaches `_torus_gather` as each device's partial sum, and the
  # transpose sums the kernel's over `data` (its spec does not name it).
  return jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES), split), out_specs=P(BATCH_AXES),
                       axis_names=set(BATCH_AXES), check_vma=False)(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _torus_gather(w, plan, dim):
  """Inside shard_map: the kernel's fsdp shards all-gathered; the gradient torus-reduced back."""
  return jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True)


def _torus_gather_fwd(w, plan, dim):
  return _torus_gather(w, plan, dim), None


def _torus_gather_bwd(plan, dim, _, g):
  return (jnp.moveaxis(torus_reduce(jnp.moveaxis(g, dim, 0), *plan), 0, dim),)


_torus_gather.defvjp(_torus_gather_fwd, _torus_gather_bwd)
