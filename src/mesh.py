"""Device mesh, logical-axis rules and batch placement.

One mesh with axes (data, fsdp, sequence, tensor), outermost first, covers a laptop
CPU, a GPU node and a TPU pod. Model code names only logical axes (`embed`, `mlp`,
`act_batch`, ...); the rules table below maps them to mesh axes, as in MaxText's
`logical_axis_rules` and the Flax NNX GSPMD guide.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from src.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")
TOKEN_AXES = ("data", "fsdp", "sequence")  # a step's tokens are split over these: FSDP gathers over them

# Logical name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "act_batch": BATCH_AXES,
    "act_seq": "sequence",
    "act_cond_seq": None,
    "act_embed": None,
    # Inside attention, tokens are whole and heads split over tensor x sequence
    # (Ulysses context parallelism); with sequence = 1 this is plain tensor parallelism.
    "act_attn_seq": None,
    "act_attn_heads": ("tensor", "sequence"),
    # Ring attention and USP (model.context_parallel: ring | usp) leave tokens split over
    # `sequence` inside attention (act_seq) and split heads over tensor only.
    "act_ring_heads": "tensor",
    "act_mlp": "tensor",
    "act_height": None,  # VAE activations' rows; map to "sequence" to shard large frames
    # parameters. Every parameter has an `embed` axis (or is tiny), so this rule decides whose
    # devices split the model: FSDP. With mesh.sequence > 1 they are otherwise copied on every
    # sequence device; 'mesh.rules={embed: [fsdp, sequence]}' splits them over both (one long
    # clip over a slice, as MaxDiffusion's Wan 2.1 recipe does).
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "patch": None,
    "cond_embed": None,
    "freq": None,
    "modulation": None,
    "classes": None,
    "layers": None,
    # VAE convolutions: kernels [kt, kh, kw, conv_in, conv_out]. The VAE is small
    # (~127M parameters at Wan 2.1 sizes) and frozen in DiT training: replicated.
    "conv_in": None,
    "conv_out": None,
    # Text encoder (umT5). The token table [vocab, embed] is already split over fsdp by
    # its embed axis; splitting the vocab too would turn the lookup into a one-hot
    # matmul or a masked all-reduce. The relative-position bias tables [rel_buckets,
    # heads] are tiny (32 x 64 per layer) and split by heads like the attention.
    "vocab": None,
    "rel_buckets": None,
    # LoRA adapters A [*in, r], B [r, *out]: the rank axis is small, the other axis is
    # split like the kernel's.
    "lora_rank": None,
}


def make_rules(overrides: Mapping[str, object] = ()) -> tuple[tuple[str, object], ...]:
  """The rules table with config overrides applied, as Flax wants it."""
  rules = dict(DEFAULT_RULES)
  for name, axes in dict(overrides).items():
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise ValueError(f"mesh.rules.{name}: unknown mesh axis {bad}; mesh axes are {MESH_AXES}.")
    rules[name] = axes
  return tuple(rules.items())


def logical_to_spec(names: Sequence[str | None], rules=None) -> P:
  """PartitionSpec for logical names; a mesh axis is used at most once per array."""
  table = dict(rules if rules is not None else current_rules())
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def replicated_axes(mesh: jax.sharding.Mesh, tree) -> list[str]:
  """Mesh axes of more than one device that no array of `tree` (shapes or arrays carrying
  shardings) is split over: each device along them holds a full copy, e.g. the parameters on
  `sequence` under the default rules."""
  used = set()
  for x in jax.tree.leaves(tree):
    used |= spec_axes(x.sharding.spec)
  return [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used]


def spec_axes(spec: P) -> set[str]:
  """The mesh axes a PartitionSpec splits over."""
  return {a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}


def current_rules():
  """The rules set by the enclosing `nnx.logical_axis_rules(...)` context."""
  return spmd.get_logical_axis_rules()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not current_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def gather_for_use(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """A parameter (in its compute dtype), with logical axis `names`, gathered over the mesh axes a
  step's tokens are split over (FSDP's all-gather, made explicit) and still split over the others
  (tensor). Its gradient is constrained back to the parameter's own sharding where it is made, so
  the partial sums of the devices' tokens are reduce-scattered there. Without this, XLA on TPU
  gathered a scanned layer's attention weights twice in the backward (for the recomputed forward
  and again for the gradient's matmuls) and all-reduced whole gradients of the weights split on
  their output axis, slicing the shard out afterwards (docs/pod.md). A no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not current_rules():
    return x
  spec = logical_to_spec(names)
  keep = lambda e: tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if a not in TOKEN_AXES)
  kept = P(*[(k[0] if len(k) == 1 else k) if k else None for k in map(keep, spec)])
  return x if kept == spec else _gathered(x, spec, kept)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(x, sharded: P, gathered: P):
  return jax.lax.with_sharding_constraint(x, gathered)


def _gathered_fwd(x, sharded: P, gathered: P):
  return _gathered(x, sharded, gathered), None


def _gathered_bwd(sharded: P, gathered: P, _, grad):
  # The TPU compiler fuses an all-reduce and the slice of a shard into a reduce-scatter only when
  # the shard is cut along the major dimension: a gradient split on another one (an output axis,
  # as `embed` in fc2 [mlp, embed]) is reduced with that axis moved to the front.
  axis = next(i for i, (g, s) in enumerate(zip(gathered, sharded)) if g != s)
  if axis == 0:
    return (jax.lax.with_sharding_constraint(grad, sharded),)
  moved = jax.lax.with_sharding_constraint(jnp.moveaxis(grad, axis, 0), P(sharded[axis], *sharded[:axis],
                                                                            *sharded[axis + 1:]))
  return (jax.lax.with_sharding_constraint(jnp.moveaxis(moved, 0, axis), sharded),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Resolve the -1 axis and check the product against the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.sequence, cfg.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not divide "
          f"the {num_devices} available devices."
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"but {num_devices} are available. Set one axis to -1 to fill the rest."
    )
  return tuple(sizes)


def dcn_sizes(cfg: MeshConfig, slices: int) -> tuple[int, int]:
  """(data, fsdp) slice counts for `slices` slices: -1 resolved, product checked."""
  dcn = [cfg.dcn_data, cfg.dcn_fsdp]
  if dcn.count(-1) > 1 or any(d == 0 or d < -1 for d in dcn):
    raise ValueError(f"mesh.dcn_data={cfg.dcn_data}, mesh.dcn_fsdp={cfg.dcn_fsdp}: positive, at most one -1.")
  fixed = math.prod(d for d in dcn if d != -1)
  if -1 in dcn and slices % fixed == 0:
    dcn[dcn.index(-1)] = slices // fixed
  if math.prod(dcn) != slices:
    raise ValueError(f"mesh.dcn_data={cfg.dcn_data} x mesh.dcn_fsdp={cfg.dcn_fsdp} must multiply to the "
                     f"{slices} slices of the devices.")
  return tuple(dcn)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = axis_sizes(cfg, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multislice: the dcn_* axes cross the slow data-center network
    dcn = dcn_sizes(cfg, slices) + (1, 1)  # sequence and tensor stay inside a slice
    for name, size, across in zip(MESH_AXES, sizes, dcn):
      if size % across:
        raise ValueError(f"{slices} slices: mesh.{name}={size} must be a multiple of mesh.dcn_{name}={across} "
                         "(the slices that axis spans).")
    ici = tuple(size // across for size, across in zip(sizes, dcn))
    mesh = jax.sharding.Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES, axis_types=axis_types)
  else:
    mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
  log.info("mesh %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
  return mesh


def initialize_distributed(cfg: MeshConfig) -> None:
  """jax.distributed.initialize() when the config asks for several processes."""
  if not cfg.distributed:
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d", jax.process_index(), jax.process_count())


def batch_spec(ndim: int, rules=None) -> P:
  """Batch arrays: rows as the `act_batch` rule says (data x fsdp by default), the rest
  replicated, like every activation. Rules: given, else the enclosing context's, else
  the defaults."""
  rules = rules if rules is not None else (current_rules() or tuple(DEFAULT_RULES.items()))
  return logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules)


def batch_shardings(mesh: jax.sharding.Mesh, batch, rules=None):
  """NamedShardings of a batch (any pytree of arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda v: NamedSharding(mesh, batch_spec(v.ndim, rules)), batch)


def batch_devices(mesh: jax.sharding.Mesh, rules=None) -> int:
  """How many ways a batch's rows are split: the product of the `act_batch` axes."""
  spec = batch_spec(1, rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def place_batch(mesh: jax.sharding.Mesh, local, rules=None):
  """Host-local rows (a pytree of numpy arrays) -> global arrays split by the batch rule."""
  return jax.tree.map(lambda v, s: jax.make_array_from_process_local_data(s, v), local,
                      batch_shardings(mesh, local, rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_shardings(shapes, shardings=None):
  """ShapeDtypeStructs of `shapes` (arrays or structs) carrying `shardings` (default:
  their own): a tree that exists only as layout, for restores and AOT compiles."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_module(build, mesh=None, rules=None):
  """(graphdef, parameters of the module `build()` makes, as ShapeDtypeStructs with
  their shardings): by the rules table (default DEFAULT_RULES) on `mesh`, else on the
  first device. Nothing is allocated; a loader fills them in (`src.weights`)."""
  if mesh is None:
    graphdef, state = nnx.split(nnx.eval_shape(build))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
  else:
    rules = rules if rules is not None else make_rules()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      graphdef, state = nnx.split(nnx.eval_shape(build))
      shardings = nnx.get_named_sharding(state, mesh)
  return graphdef, with_shardings(state, shardings)
