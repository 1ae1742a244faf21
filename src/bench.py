"""`python -m src.bench {step,compile,packing,data,memory} [options]`: performance numbers.

Every result is one JSON line, printed and appended to `--out`. Timings are medians of
interleaved repeats after warm-up; MFU divides the exact model FLOPs of a step
(`src.flops`) by the FLOP/s of a jitted float32 2048x2048 matmul interleaved with the
step in the same run. Commands and recorded numbers: docs/benchmarks.md.

  step     the real train step (src.state.jit_step) on a 1-device mesh: step time,
           tokens/s, achieved FLOP/s, MFU; --packed adds rows of 3 mixed-shape examples,
           --unrolled with the layers unrolled, --per-frame packed with a time per frame (paired ratios)
  compile  trace and compile time of the train step against depth, scanned vs unrolled
  packing  benchmarks/packing.py: padding of the packed stream vs buckets
  data     clips/s of the grain pipeline (src.data.pipeline.make_iterator), synthetic source
  memory   peak host RSS of a step run, by stage
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from src import config as config_lib
from src import mesh as mesh_lib
from src import frames, optim
from src.config import Config, MeshConfig
from src.batch import PackedBatch
from src.flops import example_tokens, train_flops
from src.models.dit import dimensions
from src.models.patch import pack_rows, patchify
from src.state import init_state, jit_step
from src.tasks import make_task

log = logging.getLogger(__name__)

MATMUL_SIZE = 2048  # the peak reference: a jitted float32 [N, N] @ [N, N]
MAX_PEAK_WINDOW_S = 10.0  # longest stretch of matmuls timed per round for the peak
NUM_CLASSES = 1000  # class-conditional, as DiT on ImageNet
WARMUP_STEPS = 2  # untimed calls after compilation
DEFAULT_REPEATS = {"step": 10, "compile": 1, "data": 3, "memory": 3}


# --- the benchmarked configuration and batch --------------------------------------


def bench_config(variant: str, batch: int, latent: Sequence[int], patch: int, scan: bool = True,
                 depth: int | None = None, packed: bool = False, per_frame: bool = False) -> Config:
  """Class-conditional DiT (1000 classes, no cross-attention) on [1, H, W, C] latents; `per_frame`: packed, every
  conditioning mode in the mix (a time per frame, F = 4 slots: the longest packed shape's frames)."""
  h, w, c = latent
  overrides = [
      f"model.variant={variant}", f"model.num_classes={NUM_CLASSES}", "model.cond_dim=0",
      f"model.patch=[1,{patch},{patch}]", f"model.in_channels={c}", f"model.scan_layers={scan}",
      "data.frames=1", f"data.height={h}", f"data.width={w}", f"data.channels={c}", f"data.batch_size={batch}",
      "train.steps=100000", "train.tensorboard=false",
  ]
  if depth is not None:
    overrides.append(f"model.depth={depth}")
  if packed or per_frame:
    overrides += [f"data.seq_len={h * w // patch**2}", f"data.max_segments={len(packed_shapes(latent, patch))}"]
  if per_frame:
    overrides += ["data.frame_counts=[4]"] + [f"conditioning.{m}=1" for m in frames.MODES[1:]]
  return config_lib.load(None, overrides)


def packed_shapes(latent: Sequence[int], patch: int) -> list[tuple[int, int, int]]:
  """Three (T, H, W) latent shapes whose tokens fill exactly one unpacked row: a 4-frame
  clip (1/2 of the tokens), a 2-frame clip (1/8) and an image (3/8). For 32x32 latents
  and 2x2 patches: 4x16x8, 2x8x8 and 1x16x24, i.e. 128 + 32 + 96 = 256 tokens."""
  h, w, _ = latent
  shapes = [(4, h // 2, w // 4), (2, h // 4, w // 4), (1, h // 2, 3 * w // 4)]
  tokens = sum(t * (y // patch) * (x // patch) for t, y, x in shapes)
  if tokens != (h // patch) * (w // patch) or any(y % patch or x % patch for _, y, x in shapes):
    raise ValueError(f"latent {h}x{w} with patch {patch}: mixed shapes {shapes} do not tile a row; "
                     "use H and W divisible by 4 * patch.")
  return shapes


def make_batch(cfg: Config, packed: bool = False, seed: int = 0) -> PackedBatch:
  """A host batch of Gaussian latents: one example per row, or (packed) the three mixed
  shapes of `packed_shapes` in every row, in the same number of tokens."""
  d, m = cfg.data, cfg.model
  rng = np.random.default_rng(seed)
  shapes = packed_shapes((d.height, d.width, d.channels), m.patch[1]) if packed else [(d.frames, d.height, d.width)]
  examples, rows = [], []
  for r in range(d.batch_size):
    for shape in shapes:
      tokens, positions, grid = patchify(rng.standard_normal((*shape, d.channels), np.float32), m.patch)
      examples.append(dict(tokens=tokens, positions=positions, grid=np.asarray(grid, np.int32),
                           label=int(rng.integers(m.num_classes))))
      rows.append(r)
  seq_len = sum(len(ex["tokens"]) for ex in examples) // d.batch_size
  return pack_rows(examples, seq_len, len(shapes), num_rows=d.batch_size, rows=rows)


# --- timing --------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def rotated(names: Sequence[str], r: int) -> list[str]:
  """Round r's order: rotating, so that no one always goes first."""
  names = list(names)
  return names[r % len(names):] + names[: r % len(names)]


def interleave_with_peak(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], float]:
  """Seconds of each call, round by round in rotating order, and after each round the
  matmul peak over a window as long as the round's mean call: (seconds by name, median
  peak FLOP/s)."""
  matmul, times, peaks = PeakMatmul(), {name: [] for name in fns}, []
  for r in range(repeats):
    for name in rotated(fns, r):
      times[name].append(timed(fns[name]))
    peaks.append(matmul.rate(statistics.mean(t[-1] for t in times.values())))
  return times, statistics.median(peaks)


class PeakMatmul:
  """The peak reference: a jitted float32 [N, N] @ [N, N] on the first device.

  `rate(seconds)` repeats it for at least that long and returns FLOP/s: matched to the
  step's duration, the peak is averaged over the same kind of window as the step, so
  that bursts of load on a shared machine do not weigh on one side only."""

  def __init__(self, n: int = MATMUL_SIZE):
    ka, kb = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(ka, (n, n), jnp.float32)
    self.b = jax.random.normal(kb, (n, n), jnp.float32)
    self.flops = 2 * n**3
    self._matmul = jax.jit(jnp.matmul)
    for _ in range(WARMUP_STEPS):
      self()

  def __call__(self) -> None:
    self._matmul(self.a, self.b).block_until_ready()

  def rate(self, seconds: float = 0.0) -> float:
    start, calls = time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - start < min(seconds, MAX_PEAK_WINDOW_S):
      self()
      calls += 1
    return calls * self.flops / (time.perf_counter() - start)


class StepRunner:
  """The real train step (src.state.jit_step) on a 1-device mesh, compiled once; each call runs one
  step on a fixed batch and waits for it."""

  def __init__(self, cfg: Config, batch: dict[str, np.ndarray]):
    self.mesh = mesh_lib.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    self.rules = mesh_lib.make_rules(cfg.mesh.rules)
    task = make_task(cfg)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, self.state = init_state(task, self.mesh, self.rules, optimizer, cfg.seed)
    self.args = (mesh_lib.place_batch(self.mesh, batch, self.rules), None)  # no frozen VAE
    step = jit_step(task, self.mesh, self.rules, graphdef, self.state, optimizer, schedule)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      start = time.perf_counter()
      lowered = step.lower(self.state, *self.args)
      self.trace_s = time.perf_counter() - start
      self.compiled = lowered.compile()
      self.compile_s = time.perf_counter() - start - self.trace_s
    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, *self.args)
    jax.block_until_ready((self.state, metrics))

  def warm_up(self) -> "StepRunner":
    for _ in range(WARMUP_STEPS):
      self()
    return self


def machine() -> dict:
  """What the numbers were measured on (no JAX backend start-up); load is the 1-minute
  average at record time: above the core count, timings are provisional."""
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), load_1m=round(os.getloadavg()[0], 2))


def host() -> dict:
  return dict(machine(), backend=jax.default_backend(), jax=jax.__version__)


def emit(record: dict, out: str | None) -> dict:
  print(json.dumps(record), flush=True)
  if out:
    with open(out, "a") as f:
      f.write(json.dumps(record) + "\n")
  return record


def step_record(name: str, cfg: Config, batch: PackedBatch, seconds: list[float], peak: float, num_params: int) -> dict:
  per_example = example_tokens(batch)
  flops = train_flops(cfg.model, per_example)
  rows, row_tokens = batch.packing.segment_ids.shape
  dense = train_flops(cfg.model, [row_tokens] * rows)
  step_s = statistics.median(seconds)
  depth, width, heads = dimensions(cfg.model)
  return dict(
      bench="step", case=name, variant=cfg.model.variant, depth=depth, width=width, heads=heads,
      params=num_params, patch=list(cfg.model.patch), rows=rows,
      row_tokens=row_tokens, examples=len(per_example), scan=cfg.model.scan_layers,
      step_s=round(step_s, 5), step_s_min=round(min(seconds), 5), step_s_max=round(max(seconds), 5),
      tokens_per_s=round(sum(per_example) / step_s, 1), flops_per_step=flops,
      flops_per_step_dense_attention=dense, achieved_gflops=round(flops / step_s / 1e9, 2),
      peak_gflops=round(peak / 1e9, 2), mfu=round(flops / step_s / peak, 4),
      repeats=len(seconds), **host())


def bench_step(args) -> list[dict]:
  """The train step, unpacked (and packed with --packed), interleaved with the peak matmul."""
  wanted = dict(unpacked=True, packed=args.packed or args.per_frame, unrolled=args.unrolled, per_frame=args.per_frame)
  cases = {name: (name != "unpacked" and name != "unrolled", args.scan and name != "unrolled")  # (packed, scan)
           for name, on in wanted.items() if on}
  runners, batches, cfgs = {}, {}, {}
  for name, (packed, scan) in cases.items():
    cfgs[name] = bench_config(args.variant, args.batch, args.latent, args.patch, scan, args.depth, packed,
                              per_frame=name == "per_frame")
    batches[name] = make_batch(cfgs[name], packed)
    runners[name] = StepRunner(cfgs[name], batches[name]).warm_up()
    log.info("%s: traced in %.1fs, compiled in %.1fs", name, runners[name].trace_s, runners[name].compile_s)
  times, peak = interleave_with_peak(runners, args.repeats)
  records = [emit(step_record(n, cfgs[n], batches[n], times[n], peak, runners[n].num_params), args.out)
             for n in cases]
  by_case = dict(zip(cases, records))
  for other, base in (("packed", "unpacked"), ("unrolled", "unpacked"), ("per_frame", "packed")):
    if other in cases:  # paired per round: the steps ran next to each other
      ratios = [a / b for a, b in zip(times[other], times[base])]
      records.append(emit(dict(bench=f"step_{other}_vs_{base}", variant=args.variant, scan=args.scan,
                               time_ratio=round(statistics.median(ratios), 4),
                               mfu_ratio=round(by_case[other]["mfu"] / by_case[base]["mfu"], 4), **host()),
                          args.out))
  return records


def bench_compile(args) -> list[dict]:
  """Trace (lower) and compile time of the train step per depth, scanned vs unrolled."""
  cases = [(depth, scan) for depth in args.depths for scan in (True, False)]
  mesh = mesh_lib.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
  rules = mesh_lib.make_rules()
  steps, times = {}, {case: ([], []) for case in cases}
  for depth, scan in cases:  # scan_layers lives in the model (its graphdef): one model per case
    cfg = bench_config(args.variant, args.batch, args.latent, args.patch, scan, depth)
    batch = make_batch(cfg)
    task = make_task(cfg)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, state = init_state(task, mesh, rules, optimizer, cfg.seed)
    steps[depth, scan] = (jit_step(task, mesh, rules, graphdef, state, optimizer, schedule), state,
                          mesh_lib.place_batch(mesh, batch, rules))
  for r in range(args.repeats):
    for case in rotated(cases, r):
      step, state, placed = steps[case]
      jax.clear_caches()  # a fresh trace and compile, not a cache hit
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        start = time.perf_counter()
        lowered = step.lower(state, placed, None)
        traced = time.perf_counter()
        lowered.compile()
      times[case][0].append(traced - start)
      times[case][1].append(time.perf_counter() - traced)
      log.info("depth %d scan=%s: trace %.2fs compile %.2fs", *case, *(t[-1] for t in times[case]))
  records = []
  for depth, scan in cases:
    trace, comp = (statistics.median(t) for t in times[depth, scan])
    records.append(emit(dict(bench="compile", variant=args.variant, depth=depth, scan=scan,
                             trace_s=round(trace, 3), compile_s=round(comp, 3), total_s=round(trace + comp, 3),
                             repeats=args.repeats, **host()), args.out))
  return records


def bench_packing(args, extra: list[str]) -> int:
  from benchmarks import packing  # a script beside the package, run from the repository root

  return packing.main(extra + (["--out", args.out] if args.out else []))


def bench_data(args) -> list[dict]:
  """Clips/s of the grain pipeline on the synthetic source (one clip = one example)."""
  from src.batch import row_shape
  from src.data.pipeline import make_iterator

  cfg = bench_config(args.variant, args.batch, args.latent, args.patch)
  data = cfg.data
  if args.packed:  # mixed shapes packed into rows of 2x the largest example
    data.frame_counts, data.image_fraction = [1, 2, 4], 0.2
    data.area = data.height * data.width // 4
    data.seq_len, data.max_segments = 2 * 4 * data.area // args.patch**2, 16
  data.num_workers = args.workers
  it = make_iterator(data, cfg.model.patch, 0, cfg.seed)
  seq_len = row_shape(data, cfg.model.patch)[0]
  next(it)  # start-up: source, workers, first buffer
  rates, tokens, slots = [], 0, 0
  for _ in range(args.repeats):
    start, clips = time.perf_counter(), 0
    for _ in range(args.batches):
      seg = next(it).packing.segment_ids
      clips += sum(len(np.unique(row[row > 0])) for row in seg)
      tokens, slots = tokens + int((seg > 0).sum()), slots + seg.size
    rates.append(clips / (time.perf_counter() - start))
  shapes = dict(area=data.area, frame_counts=data.frame_counts) if args.packed else dict(
      latent=[data.frames, data.height, data.width, data.channels])
  return [emit(dict(bench="data", source=data.source, packed=args.packed, rows=data.batch_size,
                    row_tokens=seq_len, **shapes, workers=args.workers,
                    batches=args.batches, clips_per_s=round(statistics.median(rates), 1),
                    padding_fraction=round(1 - tokens / slots, 4), repeats=args.repeats, **host()), args.out)]


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(args) -> list[dict]:
  """Peak host RSS after each stage of a step run: imports, state, compile, steps."""
  stages = {"start": peak_rss_mib()}
  cfg = bench_config(args.variant, args.batch, args.latent, args.patch, args.scan, args.depth, args.packed)
  batch = make_batch(cfg, args.packed)
  runner = StepRunner(cfg, batch)
  stages["compiled"] = peak_rss_mib()
  for _ in range(args.repeats):
    runner()
  stages["steps"] = peak_rss_mib()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.state))
  analysis = runner.compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None)
  return [emit(dict(bench="memory", variant=args.variant, packed=args.packed, scan=args.scan,
                    params=runner.num_params, state_mib=round(state_bytes / 2**20, 1),
                    xla_temp_mib=None if temp is None else round(temp / 2**20, 1),
                    **{f"peak_rss_mib_{k}": round(v, 1) for k, v in stages.items()},
                    steps=args.repeats, **host()), args.out)]


# --- command line --------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--variant", default="S", help="DiT variant (src.config.VARIANTS)")
  common.add_argument("--depth", type=int, help="override the variant's depth")
  common.add_argument("--batch", type=int, default=8, help="rows per step")
  common.add_argument("--latent", type=int, nargs=3, default=[32, 32, 4], metavar=("H", "W", "C"))
  common.add_argument("--patch", type=int, default=2, help="spatial patch (1 x p x p)")
  common.add_argument("--packed", action="store_true", help="also rows of 3 mixed-shape examples")
  common.add_argument("--per-frame", action="store_true", help="step: also packed rows with a time per frame")
  common.add_argument("--unrolled", action="store_true", help="step: also the unpacked step with layers unrolled")
  common.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="model.scan_layers")
  common.add_argument("--repeats", type=int, help=f"timed repeats (defaults: {DEFAULT_REPEATS})")
  common.add_argument("--out", help="append the JSON lines to this file too")
  parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("step", parents=[common], help="train step time, tokens/s, MFU")
  compile_p = sub.add_parser("compile", parents=[common], help="trace+compile time vs depth, scan vs loop")
  compile_p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 28])
  sub.add_parser("packing", parents=[common], help="benchmarks/packing.py (other options pass through)")
  data_p = sub.add_parser("data", parents=[common], help="synthetic pipeline clips/s")
  data_p.add_argument("--batches", type=int, default=20, help="batches per timed repeat")
  data_p.add_argument("--workers", type=int, default=0, help="data.num_workers")
  sub.add_parser("memory", parents=[common], help="peak host RSS of a step run")
  args, extra = parser.parse_known_args(argv)
  if extra and args.command != "packing":
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if args.repeats is None:
    args.repeats = DEFAULT_REPEATS.get(args.command, 1)
  return args, extra


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "packing":
    return bench_packing(args, extra)
  {"step": bench_step, "compile": bench_compile, "data": bench_data, "memory": bench_memory}[args.command](args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
