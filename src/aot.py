"""`python -m src.aot --config C --topology v5p-256 [--slices N] [key.sub=value ...]`

Compiles the exact train step of a config for a TPU topology from a CPU host, with
libtpu's compile-only devices (`jax.experimental.topologies.get_topology_desc`), and
prints one JSON line: per-chip memory (device and host), FLOPs per step, XLA's own cost
analysis (and with --step-time its estimate of the step's time, every layer counted), the
collectives in the optimised HLO, the attention kernel and how many Mosaic (Pallas) kernels
the step holds, and whether the step fits in the chip's HBM. Nothing is allocated:
the model, optimizer state and batch exist only as shapes and shardings. This is
MaxText's `train_compile.py` idea: find out on a laptop whether a run fits a pod.

Exit status: 0 fits, 1 does not fit (or the TPU compiler ran out of memory), 2 bad
arguments or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys

# Compile-only use of libtpu needs no TPU: skip its one-process-per-host lock, so
# several compiles (or another program holding the lock) can run side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh

from src import comms, executables
from src import config as config_lib
from src import hlo
from src import mesh as mesh_lib
from src import optim
from src.config import Config
from src.flops import umt5_flops
from src.models.attention import compiling_for, resolve_impl
from src.models.dit import dimensions
from src.state import abstract_state, jit_step
from src.models.umt5 import UMT5Config
from src.tasks import make_task
from src.text_encoder import abstract_umt5, read_umt5_config

GIB = 2**30
# HBM per chip, by generation (Cloud TPU system architecture pages).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Peak dense bf16 matmul throughput per chip, TFLOP/s (Cloud TPU system architecture pages).
PEAK_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}
# HBM bandwidth per chip, GB/s (Cloud TPU system architecture pages).
HBM_GBPS = {"v4": 1228, "v5e": 819, "v5p": 2765, "v6e": 1640}
# v4 and v5p names count TensorCores (two per chip, one megacore device); v5e and
# v6e names count chips.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# Slices of this many chips or more are full tori on v4/v5p (wraparound links).
TORUS_MIN_CHIPS = 64


class AotError(ValueError):
  """A topology name or mesh that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str  # v4 | v5e | v5p | v6e
  shape: tuple[int, ...]  # chips along each physical axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape for a chip count: 2D (v5e/v6e) or 3D (v4/v5p) powers of two,
  as balanced as possible, small axes first (v5p-256 -> 4x4x8, v6e-32 -> 4x8)."""
  if chips < 1 or chips & (chips - 1):
    raise AotError(f"{chips} chips: expected a power of two")
  shape = [1] * dims
  for _ in range(int(math.log2(chips))):
    shape[shape.index(min(shape))] *= 2
  shape = sorted(shape)
  if dims == 3 and shape[0] == 1:  # 2x2x1, 2x4x1 ...: the 1 goes last, as Cloud TPU writes it
    shape = shape[1:] + [1]
  return tuple(shape)


def parse_topology(spec: str) -> Topology:
  """'v5p-256' (Cloud TPU accelerator type) or 'v5p:4x4x8' (explicit chip grid)."""
  m = re.fullmatch(r"(v\d+[a-z]*?)(?:pod)?[-:](\S+)", spec.strip().lower())
  gen = m and GENERATION_ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in HBM_GIB:
    raise AotError(f"unknown TPU topology '{spec}'; expected e.g. v4-8, v5e-16, v5p-256, v6e-64 or v5p:4x4x8 "
                   f"(generations: {', '.join(HBM_GIB)})")
  dims = 3 if CORES_PER_CHIP[gen] == 2 else 2
  if ":" in spec:
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != dims:
      raise AotError(f"topology '{spec}': {gen} chip grids have {dims} axes")
    return Topology(gen, shape)
  if not m.group(2).isdigit() or int(m.group(2)) % CORES_PER_CHIP[gen]:
    raise AotError(f"topology '{spec}': the size must be a number of {'cores' if dims == 3 else 'chips'}")
  return Topology(gen, _chip_grid(int(m.group(2)) // CORES_PER_CHIP[gen], dims))


def topology_devices(topo: Topology, slices: int = 1) -> list:
  """Compile-only devices of `slices` copies of the slice (needs libtpu, not a TPU)."""
  kwargs = {}
  if slices > 1:
    kwargs["num_slices"] = slices
  if len(topo.shape) == 3 and topo.chips >= TORUS_MIN_CHIPS:
    kwargs["wrap"] = tuple(s >= 4 for s in topo.shape)
  if len(topo.shape) == 2 and topo.chips < 4:  # v5e-1, v6e-1, v6e-2: smaller than libtpu's default 2x2 host
    kwargs["chips_per_host_bounds"] = (*topo.shape, 1)
  try:
    return topologies.get_topology_desc(topo.name, "tpu", **kwargs).devices
  except jax.errors.JaxRuntimeError as e:
    raise AotError(f"libtpu cannot build the topology {topo.name}: {str(e).splitlines()[0]}") from None


def batch_shapes(batch) -> dict[str, list[int]]:
  """Per-row shapes of a batch, by field path (e.g. 'packing.segment_ids')."""
  flat = jax.tree_util.tree_flatten_with_path(batch)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="."): list(x.shape[1:]) for path, x in flat}


def memory_report(compiled, hbm_bytes: int) -> dict:
  """Per chip, from `compiled.memory_analysis()`. `total` adds the parts, which can exceed what the
  TPU compiler's buffer assignment packs (docs/pod.md); `host_*` are what a remat policy offloads
  to host memory (pinned_host), outside the HBM total."""
  m = compiled.memory_analysis()
  # Donated state: outputs alias arguments, so they are counted once.
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  gib = lambda b: round(b / GIB, 3)
  return dict(arguments_gib=gib(m.argument_size_in_bytes), outputs_gib=gib(m.output_size_in_bytes),
              aliased_gib=gib(m.alias_size_in_bytes), temp_gib=gib(m.temp_size_in_bytes),
              code_gib=gib(m.generated_code_size_in_bytes), total_gib=gib(total),
              host_argument_gib=gib(m.host_argument_size_in_bytes),
              host_temp_gib=gib(m.host_temp_size_in_bytes), hbm_gib=gib(hbm_bytes), fits=total <= hbm_bytes)


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of the compiled program on one chip, as compiled: `optimal_seconds` is the
  TPU cost model's time of the step (each op at its compute or memory-bandwidth bound); a loop body
  (a scanned layer) is counted once, and Mosaic kernels (splash attention) get no FLOPs or time."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  keys = ("optimal_seconds", "flops", "bytes accessed", "transcendentals")
  return {k.replace(" ", "_"): float(cost[k]) for k in keys if k in cost}


def flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def lower_step(task, mesh: Mesh, rules):
  """The train step of `src.train` (`state.jit_step`), lowered for abstract inputs:
  the state, the frozen models and the batch exist only as shapes and shardings."""
  cfg = task.cfg
  optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  graphdef, state = abstract_state(task, mesh, rules, optimizer)
  frozen = task.abstract_frozen(mesh, rules)
  step = jit_step(task, mesh, rules, graphdef, state, optimizer, schedule, frozen)
  # Kernels traced for the mesh's platform (splash is Mosaic on TPU, interpreted on CPU).
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), compiling_for(mesh.devices.flat[0].platform):
    return step.lower(state, task.batch_shapes(), frozen), state, frozen


def step_flops(task, rules, compiled, chips: int, recompute: bool = True) -> float:
  """FLOPs of one step on all chips; without `recompute`, the model's FLOPs (no rematerialised
  forward: what MFU divides by). XLA's cost analysis counts a loop body once, so a scanned model
  (and the model without remat) is costed from its unrolled twin, lowered (not compiled) for one
  CPU device: the global program, every layer counted."""
  cfg = task.cfg
  if recompute and not task.scans_layers:
    return flops(compiled.cost_analysis()) * chips
  one = config_lib.MeshConfig(data=1, fsdp=1, sequence=1, tensor=1)
  # XLA attention without context parallelism in the twin: the same attention FLOPs as a
  # one-clip row, where an interpreted splash kernel's loops (or ring attention's tile loops)
  # would be costed once.
  model = dataclasses.replace(cfg.model, scan_layers=False, attention="xla", remat=cfg.model.remat if recompute
                              else "none", context_parallel="ulysses", ulysses_degree=0)
  cpu = mesh_lib.make_mesh(one, jax.devices("cpu")[:1])
  return flops(lower_step(make_task(dataclasses.replace(cfg, model=model, mesh=one)), cpu, rules)[0].cost_analysis())


def step_seconds(task, mesh: Mesh, rules, compiled, topo: Topology, flops_per_chip: float,
                 model_flops_per_chip: float) -> dict:
  """XLA's time of a step on one chip with every layer counted, plus what it cannot cost. A scanned
  model's body is costed once, so the step is also compiled unrolled with 2 and 3 layers (or all of
  them, if no more) for the same chips and XLA's `optimal_seconds` extrapolated linearly to the
  depth (a 1-layer program can be compiled differently: measured). What XLA leaves out, the Mosaic
  kernels (splash), the bodies after the first of loops it builds itself (collective matmuls) and
  of ring attention's hop and tile loops,
  is added as its FLOPs (`flops_per_chip`, the twin's count, minus XLA's) at the chip's bf16 peak:
  a lower bound, as XLA's own figure is. `mfu`: the model's FLOPs (no recomputation) over that
  time at the chip's peak, an upper bound on the MFU a run can reach."""
  cost = [] if task.scans_layers else [xla_cost(compiled)]  # a scanned model's `compiled` is not read
  if task.scans_layers:
    cfg, depth = task.cfg, dimensions(task.cfg.model)[0]
    unrolled = lambda d: make_task(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=d,
                                                                                      scan_layers=False)))
    cost = [xla_cost(lower_step(unrolled(d), mesh, rules)[0].compile()) for d in ((2, 3) if depth > 3 else (depth,))]
    seconds = [c["optimal_seconds"] for c in cost]
    if min(seconds) <= 0 or seconds != sorted(seconds):
      # the compiler priced 3 layers below 2 (dit_14b, v6e-256) or a program at a negative time (dit_8b,
      # v5e-16, offload): no per-layer slope to extrapolate; say so instead of reporting a negative time
      logging.warning("step time: the compiler's estimates of the 2- and 3-layer programs (%s s) give no "
                      "per-layer slope: no estimate", seconds)
      return dict(xla=None, total=None, mfu=None, unrolled_optimal_seconds=[c["optimal_seconds"] for c in cost])
    if len(cost) == 2:
      cost = [{k: v + (depth - 2) * (cost[1][k] - v) for k, v in cost[0].items()}]
  peak = PEAK_TFLOPS[topo.generation] * 1e12
  kernel_flops = max(flops_per_chip - cost[0]["flops"], 0.0)
  total = cost[0]["optimal_seconds"] + kernel_flops / peak
  # The analysis has no per-op split; the program-wide roofline bounds say which side XLA's ops lean to.
  return dict(xla=cost[0]["optimal_seconds"], kernels_at_peak=kernel_flops / peak, total=total,
              xla_flops_per_chip=cost[0]["flops"], kernel_flops_per_chip=kernel_flops,
              xla_compute_bound=cost[0]["flops"] / peak,
              xla_memory_bound=cost[0].get("bytes_accessed", 0.0) / (HBM_GBPS[topo.generation] * 1e9),
              mfu=model_flops_per_chip / total / peak if total else None)


def compile_for_topology(cfg: Config, topo: Topology, slices: int = 1, step_time: bool = False,
                         save_to: str = "") -> dict:
  """Lower and compile the train step for the topology; the report as a dict. `step_time`: also
  XLA's estimate of the step's time with every layer counted (two more, small, compiles).
  `save_to`: a directory to write the serialised executable into (`src.executables`)."""
  devices = topology_devices(topo, slices)
  attention = resolve_impl(cfg.model.attention, "tpu")  # what lower_step's kernels are traced as
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  rules = mesh_lib.make_rules(cfg.mesh.rules)
  task = make_task(cfg)
  batch = task.batch_shapes()
  lowered, state, frozen = lower_step(task, mesh, rules)
  report = dict(topology=f"{topo.generation}-{topo.chips * CORES_PER_CHIP[topo.generation]}", grid=topo.name,
                slices=slices, chips=len(devices), mesh=dict(mesh.shape), attention=attention, remat=cfg.model.remat,
                params=sum(x.size for x in jax.tree.leaves(state.params)), batch=cfg.data.batch_size,
                batch_shapes=batch_shapes(batch), params_replicated_over=mesh_lib.replicated_axes(mesh, state.params))
  if "sequence" in report["params_replicated_over"]:
    logging.warning("every parameter is replicated over the %d sequence devices; to shard them over it too, set "
                    "'mesh.rules={embed: [fsdp, sequence]}'", mesh.shape["sequence"])
  compiled, report = compile_or_report(lowered, report, topo)
  if compiled is None:
    return report
  if save_to:
    meta = {k: report[k] for k in ("topology", "grid", "slices", "chips", "mesh")}
    report["saved_to"] = str(executables.save(compiled, save_to, dict(meta, config=config_lib.to_dict(cfg))))
  total = step_flops(task, rules, compiled, len(devices))
  text = compiled.as_text()
  ideal = comms.step_ideal(cfg, state.params, frozen, dict(mesh.shape), cfg.data.batch_size,
                           report["batch_shapes"].get("packing.segment_ids", [0])[0])
  report = dict(report, **memory_report(compiled, HBM_GIB[topo.generation] * GIB), flops_per_step=total,
                flops_per_chip=total / len(devices), xla_cost=xla_cost(compiled),
                collectives=comms.report(text, devices, ideal), mosaic_kernels=hlo.count_mosaic_kernels(text))
  model_flops = step_flops(task, rules, compiled, len(devices), recompute=False)
  report["model_flops_per_step"] = model_flops
  if step_time:
    report["step_seconds"] = step_seconds(task, mesh, rules, compiled, topo, total / len(devices),
                                          model_flops / len(devices))
  return report


def compile_or_report(lowered, report: dict, topo: Topology):
  """(compiled, report), or (None, the report saying it does not fit): the TPU compiler
  itself refuses programs that overflow HBM."""
  try:
    return lowered.compile(), report
  except Exception as e:  # noqa: BLE001 - re-raised unless it is the compiler's out-of-memory
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    return None, dict(report, hbm_gib=HBM_GIB[topo.generation], fits=False, error=str(e).strip().splitlines()[0])


def compile_text_encoder(cfg: Config, topo: Topology, slices: int = 1) -> dict:
  """The frozen umT5 encoding `data.batch_size` captions of `data.text_len` tokens, as
  the train step or `src.encode` runs it: parameters sharded by the rules table, the
  captions split by the batch rule. The sizes are `text.checkpoint`'s config.json, or
  umT5-XXL's (the Wan 2.1 text encoder) without one."""
  devices = topology_devices(topo, slices)
  mesh, rules = mesh_lib.make_mesh(cfg.mesh, devices), mesh_lib.make_rules(cfg.mesh.rules)
  umt5 = read_umt5_config(cfg.text.checkpoint) if cfg.text.checkpoint else UMT5Config()
  umt5 = dataclasses.replace(umt5, dtype=cfg.text.dtype)
  graphdef, params = abstract_umt5(umt5, mesh, rules)
  rows, length = cfg.data.batch_size, cfg.data.text_len
  ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=mesh_lib.batch_shardings(
      mesh, jax.ShapeDtypeStruct((rows, length), jnp.int32), rules))
  encode = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    lowered = encode.lower(params, ids, ids)
  report = dict(topology=f"{topo.generation}-{topo.chips * CORES_PER_CHIP[topo.generation]}", grid=topo.name,
                slices=slices, chips=len(devices), mesh=dict(mesh.shape), program="umt5_encode",
                params=sum(x.size for x in jax.tree.leaves(params)), captions=rows, text_len=length,
                dtype=cfg.text.dtype)
  compiled, report = compile_or_report(lowered, report, topo)
  if compiled is None:
    return report
  total = umt5_flops(umt5, rows, length)
  ideal = comms.parameter_ideal(params, dict(mesh.shape), jnp.dtype(cfg.text.dtype).itemsize, trained=False,
                                gathers=1)
  return dict(report, **memory_report(compiled, HBM_GIB[topo.generation] * GIB), flops_per_step=total,
              flops_per_chip=total / len(devices), collectives=comms.report(compiled.as_text(), devices, ideal))


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m src.aot",
      description="Compile the train step of a config for a TPU topology on this (CPU) host and report "
      "per-chip memory, FLOPs and collectives as one JSON line. Needs libtpu (pip install -e '.[tpu]'), "
      "not a TPU. Exit status 1 when the step does not fit in HBM.",
      epilog="example: python -m src.aot --config configs/dit_3b.yaml --topology v5p-256 data.batch_size=128")
  parser.add_argument("--config", help="YAML preset (only the keys that differ from the defaults)")
  parser.add_argument("--topology", required=True, help="v4-8, v5e-16, v5p-256, v6e-64, ... or v5p:4x4x8")
  parser.add_argument("--slices", type=int, default=1, help="number of slices (multislice over DCN)")
  parser.add_argument("--step-time", action="store_true",
                      help="also estimate the step's time from XLA's cost model with every layer counted (compiles "
                      "the step with 2 and 3 layers unrolled too)")
  parser.add_argument("--text-encoder", action="store_true",
                      help="compile the frozen umT5 encoding data.batch_size captions of data.text_len tokens "
                      "(text.checkpoint's sizes, or umT5-XXL's) instead of the train step")
  parser.add_argument("--save-compiled", metavar="DIR", default="",
                      help="write the compiled train step (serialised executable) into DIR, local or gs://, for "
                      "src.executables.load on a pod of this topology with the same jax and libtpu")
  parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
  return parser.parse_intermixed_args(argv)  # flags may follow the overrides


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, args.overrides)
    topo = parse_topology(args.topology)
    if args.slices < 1:
      raise AotError(f"--slices={args.slices}: must be >= 1")
    if args.text_encoder:
      report = compile_text_encoder(cfg, topo, args.slices)
    else:
      report = compile_for_topology(cfg, topo, args.slices, step_time=args.step_time, save_to=args.save_compiled)
  except (config_lib.ConfigError, AotError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      print("error: libtpu is not installed: pip install -e '.[tpu]'", file=sys.stderr)
      return 2
    raise
  print(json.dumps(report))
  if not report["fits"]:
    what = f"the {report.get('program', 'train step')} does not fit"
    if "total_gib" in report:
      why = f"in {report['hbm_gib']:g} GiB of HBM per chip on {report['topology']}: needs {report['total_gib']} GiB"
    else:  # the compiler's message names the memory: HBM, or e.g. a kernel's scalar memory (smem)
      why = f"on {report['topology']}: the TPU compiler ran out of memory: {report['error']}"
    print(f"error: {what} {why}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
