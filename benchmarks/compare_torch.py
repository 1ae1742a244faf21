"""Train-step time of the PyTorch reference DiT vs the JAX steps, in one run, side by side.

    python -m benchmarks.compare_torch [--variant S] [--batch 8] [--rounds 8] [--threads 2] [--out FILE]

Four persistent worker processes, each built and warmed up once, then timed in
interleaved rounds (the order rotating each round, one worker running at a time):

  torch_eager    benchmarks/torch_dit.py, DiT-S/2 (or B/2) as in the paper, eager
  torch_compile  the same model through torch.compile (inductor)
  jax_mirror     `MirrorDiT` below: the same architecture in Flax NNX, parameter for
                 parameter (checked against the torch model in tests/test_bench.py)
  jax_project    the project's own DiT train step (src.train via src.bench) at the same
                 width/depth: RoPE, qk-norm and one shared time projection make it a
                 different model of nearly the same cost, so it is shown for reference

Every step is the same work: flow-matching loss, backward, global-norm clipping,
AdamW, EMA, float32, batch 8 of 32x32x4 latents (256 tokens each). After each step a
worker repeats a 2048x2048 float32 matmul of its own framework for as long as the step
took (at most 10 s): MFU is the exact model FLOPs of the step over that same-run peak. Reported: per-framework medians and
the median of the per-round (paired) ratios torch_time / jax_time.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# The paper's table (same sizes as torch_dit.VARIANTS, checked in tests): importing
# torch_dit would load torch into the JAX workers.
from src.models.dit import VARIANTS

WORKERS = ("torch_eager", "torch_compile", "jax_mirror", "jax_project")
INPUT_SIZE, IN_CHANNELS, PATCH = 32, 4, 2  # 32x32x4 latents, 2x2 patches: 256 tokens
NUM_CLASSES = 1000  # plus one null class
FREQ_DIM = 256  # as benchmarks.torch_dit.FREQ_DIM
MAX_PERIOD = 10000.0
NORM_EPS = 1e-6
log = logging.getLogger("benchmarks.compare_torch")
SETTLE_S = 0.2  # pause between turns, so no thread of the previous worker still spins
MAX_PEAK_WINDOW_S = 10.0  # as src.bench: matmuls timed per turn for at most this long
REMAT_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable  # as src.models.dit's default
xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


# --- the paper's DiT in Flax NNX, module for module as benchmarks/torch_dit.py ----------


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """The fixed position table of torch_dit.sincos_2d (kept here so that the JAX workers
  never load torch; tests check the two are equal)."""
  def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
    angles = np.outer(pos.reshape(-1), 1.0 / MAX_PERIOD ** (np.arange(dim // 2) / (dim / 2.0)))
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  return np.concatenate([one_axis(width // 2, cols), one_axis(width // 2, rows)], axis=1).astype(np.float32)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + NORM_EPS)


def linear(n_in: int, n_out: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, kernel_init=zeros if zero else xavier, bias_init=zeros, rngs=rngs)


class MirrorBlock(nnx.Module):
  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv, self.proj = linear(width, 3 * width, rngs), linear(width, width, rngs)
    self.fc1, self.fc2 = linear(width, 4 * width, rngs), linear(4 * width, width, rngs)
    self.adaLN = linear(width, 6 * width, rngs, zero=True)

  def attention(self, x):
    """Softmax attention written out as src.models.attention does: heads-major, the
    normalisation after the product with V (faster on CPU than a softmax over
    token-major einsums or jax.nn.dot_product_attention's XLA path, measured)."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).transpose(2, 0, 3, 1, 4)  # [3, B, heads, N, Dh]
    q, k, v = qkv[0] * (d // self.heads) ** -0.5, qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)  # [B, heads, N, N]
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v) / jnp.sum(weights, axis=-1, keepdims=True)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))

  def __call__(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN(jax.nn.silu(c)), 6, axis=-1)  # [B, D] each
    x = x + gate1[:, None] * self.attention(modulate(layer_norm(x), shift1, scale1))
    h = jax.nn.gelu(self.fc1(modulate(layer_norm(x), shift2, scale2)), approximate=True)
    return x + gate2[:, None] * self.fc2(h)


class MirrorDiT(nnx.Module):
  """(latents [B, H, W, C], timesteps [B], labels [B]) -> [B, H, W, 2C].

  The blocks are stacked and applied with lax.scan under the rematerialisation policy
  the project's DiT uses by default (model.remat=dots_no_batch): the backward pass
  keeps the projections' outputs and recomputes the rest. With XLA:CPU in jax 0.10
  that step ran ~2x faster than keeping every residual of the scanned blocks
  (measured), which would make the comparison unfair to JAX.
  """

  def __init__(self, depth: int, width: int, heads: int, input_size: int = INPUT_SIZE,
               in_channels: int = IN_CHANNELS, patch: int = PATCH, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
    self.patch, self.width, self.grid = patch, width, input_size // patch
    self.x_embedder = nnx.Conv(in_channels, width, (patch, patch), strides=(patch, patch), padding="VALID",
                               kernel_init=xavier, bias_init=zeros, rngs=rngs)
    self.t_fc1, self.t_fc2 = linear(FREQ_DIM, width, rngs), linear(width, width, rngs)
    self.y_embedder = nnx.Embed(num_classes + 1, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stack(rngs):
      return MirrorBlock(width, heads, rngs)

    self.blocks = stack(rngs)  # parameters stacked on a leading layer axis
    self.final_adaLN = linear(width, 2 * width, rngs, zero=True)
    self.final_linear = linear(width, patch * patch * 2 * in_channels, rngs, zero=True)

  def __call__(self, x, t, y):
    b, h, w, _ = x.shape
    pos_embed = sincos_2d(self.width, self.grid)  # fixed: a constant of the program, not a parameter
    x = self.x_embedder(x).reshape(b, -1, self.width) + pos_embed  # [B, N, D]
    half = FREQ_DIM // 2
    angles = t[:, None] * jnp.exp(-np.log(MAX_PERIOD) * jnp.arange(half) / half)
    c = self.t_fc2(jax.nn.silu(self.t_fc1(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1))))
    c = c + self.y_embedder(y)  # [B, D]
    graphdef, stacked = nnx.split(self.blocks)
    body = jax.checkpoint(lambda x, layer: (nnx.merge(graphdef, layer)(x, c), None), policy=REMAT_POLICY)
    x = jax.lax.scan(body, x, stacked)[0]
    shift, scale = jnp.split(self.final_adaLN(jax.nn.silu(c)), 2, axis=-1)
    x = self.final_linear(modulate(layer_norm(x), shift, scale))  # [B, N, p*p*2C]
    p, g = self.patch, h // self.patch
    x = x.reshape(b, g, g, p, p, -1).transpose(0, 1, 3, 2, 4, 5)  # [B, H', p, W', p, 2C]
    return x.reshape(b, h, w, -1)


# Torch parameter names -> MirrorDiT paths (everything else keeps its name).
TORCH_RENAMES = {"final_layer.adaLN_modulation.1": "final_adaLN", "final_layer.linear": "final_linear",
                 "adaLN_modulation.1": "adaLN", "mlp.0": "fc1", "mlp.2": "fc2", "attn.": "",
                 "t_embedder.0": "t_fc1", "t_embedder.2": "t_fc2"}


def load_torch_weights(model: MirrorDiT, state_dict: dict[str, np.ndarray]) -> None:
  """Copy a torch_dit.DiT state dict into `model` (for the equivalence test); block
  parameters `blocks.<i>.*` go to row i of the stacked `blocks.*`."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  per_layer: dict[tuple, dict[int, np.ndarray]] = {}
  for name, value in state_dict.items():
    for old, new in TORCH_RENAMES.items():
      name = name.replace(old, new)
    *path, leaf = name.split(".")
    if leaf == "weight" and path == ["y_embedder"]:
      leaf = "embedding"
    elif leaf == "weight":  # torch [out, in] and [out, in, kh, kw] -> flax [in, out] and [kh, kw, in, out]
      leaf, value = "kernel", value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if path[0] == "blocks":
      per_layer.setdefault(("blocks", *path[2:], leaf), {})[int(path[1])] = value
    else:
      flat[(*path, leaf)].set_value(jnp.asarray(value))
  for key, layers in per_layer.items():
    flat[key].set_value(jnp.stack([layers[i] for i in range(len(layers))]))
  nnx.update(model, nnx.from_flat_state(flat))


def paper_dit_flops(depth: int, width: int, batch: int, tokens: int, patch_dim: int, out_dim: int) -> int:
  """Matmul FLOPs of a train step (3x forward) of the paper's DiT: per token the patch
  conv, qkv, proj, MLP and decoder; per example the time MLP and the adaLN regressions
  of every block and of the final layer; per layer the attention matmuls 4 n^2 D."""
  per_token = 2 * patch_dim * width + depth * (8 * width**2 + 16 * width**2) + 2 * width * out_dim
  per_example = 2 * FREQ_DIM * width + 2 * width**2 + depth * 12 * width**2 + 4 * width**2
  return 3 * batch * (tokens * per_token + per_example + depth * 4 * tokens**2 * width)


class MirrorStep:
  """The JAX mirror of torch_dit.TrainStep, one jitted program with a donated state."""

  def __init__(self, variant: str, batch: int, input_size: int = INPUT_SIZE, in_channels: int = IN_CHANNELS,
               patch: int = PATCH, seed: int = 0, lr: float = 1e-4, ema_decay: float = 0.9999, cond_dropout: float = 0.1):
    graphdef, params = jax.jit(lambda: nnx.split(MirrorDiT(
        **VARIANTS[variant], input_size=input_size, in_channels=in_channels, patch=patch, rngs=nnx.Rngs(seed)),
        nnx.Param))()  # initialised in one program, not op by op
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    self.flops = mirror_flops(variant, batch)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    keys = jax.random.split(jax.random.key(seed), 3)
    self.x0 = jax.random.normal(keys[0], (batch, input_size, input_size, in_channels))
    self.labels = jax.random.randint(keys[1], (batch,), 0, NUM_CLASSES)
    self.state = (params, optimizer.init(params), jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))

    def step(state, x0, labels, key):
      params, opt_state, ema, count = state
      k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, count), 3)
      t = jax.nn.sigmoid(jax.random.normal(k_t, (x0.shape[0],)))
      noise = jax.random.normal(k_noise, x0.shape)
      x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
      labels = jnp.where(jax.random.uniform(k_drop, labels.shape) < cond_dropout, NUM_CLASSES, labels)  # null class

      def loss_fn(params):
        pred = nnx.merge(graphdef, params)(x_t, 1000 * t, labels)[..., :in_channels]
        return jnp.mean(jnp.square(pred - (noise - x0)))

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), ema, params)
      return (params, opt_state, ema, count + 1), loss

    self._step = jax.jit(step, donate_argnums=0)
    self.key = keys[2]

  def __call__(self) -> None:
    self.state, loss = self._step(self.state, self.x0, self.labels, self.key)
    jax.block_until_ready((self.state, loss))


# --- workers ----------------------------------------------------------------------------


def mirror_flops(variant: str, batch: int) -> int:
  dims, tokens = VARIANTS[variant], (INPUT_SIZE // PATCH) ** 2
  return paper_dit_flops(dims["depth"], dims["width"], batch, tokens, PATCH**2 * IN_CHANNELS, PATCH**2 * 2 * IN_CHANNELS)


def build(kind: str, variant: str, batch: int, threads: int):
  """(step, matmul, info) for one worker: callables that run and wait for one step /
  one 2048x2048 float32 matmul of that framework."""
  if kind.startswith("torch"):
    import torch

    from benchmarks.torch_dit import TrainStep, make_dit, trainable_params

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_dit(variant, INPUT_SIZE, IN_CHANNELS, PATCH)
    step = TrainStep(model, batch, INPUT_SIZE, compile=kind == "torch_compile")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return step, lambda: a @ b, dict(params=trainable_params(model), flops=mirror_flops(variant, batch),
                                     torch=torch.__version__, threads=torch.get_num_threads())
  from src import bench

  if kind == "jax_mirror":
    step = MirrorStep(variant, batch)
    info = dict(params=step.num_params, flops=step.flops)
  else:
    cfg = bench.bench_config(variant, batch, (INPUT_SIZE, INPUT_SIZE, IN_CHANNELS), PATCH)
    data = bench.make_batch(cfg)
    step = bench.StepRunner(cfg, data)
    info = dict(params=step.num_params, flops=bench.train_flops(cfg.model, bench.example_tokens(data)))
  return step, bench.PeakMatmul(), dict(info, jax=jax.__version__, backend=jax.default_backend())


def worker(kind: str, variant: str, batch: int, threads: int, warmup: int, conn) -> None:
  """Pin to `threads` cores (XLA sizes its thread pool by the affinity set, torch is told
  explicitly), build, warm up, report ready; then time one turn per request until told
  to stop."""
  try:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    start = time.perf_counter()
    step, matmul, info = build(kind, variant, batch, threads)
    for _ in range(warmup):
      step()
      matmul()
    conn.send(dict(info, worker_cores=len(os.sched_getaffinity(0)), startup_s=round(time.perf_counter() - start, 1)))
  except Exception as e:  # the parent is waiting: tell it, do not leave it hanging
    conn.send(dict(error=f"{kind}: {type(e).__name__}: {e}"))
    raise
  while conn.recv() == "turn":
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    start, calls = time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - start < min(wall, MAX_PEAK_WINDOW_S):  # as long as the step
      matmul()
      calls += 1
    conn.send(dict(step_s=wall, cpu_per_wall=cpu / wall, matmul_s=(time.perf_counter() - start) / calls))


def run_rounds(variant: str, batch: int, rounds: int, threads: int, warmup: int, kinds=WORKERS):
  """Start the workers one by one (start-up and compilation are not timed against each
  other), then `rounds` rounds of one turn each: (infos, turns) by worker."""
  ctx = mp.get_context("spawn")  # fresh interpreters: no framework state shared
  procs, conns, infos = {}, {}, {}
  turns = {kind: [] for kind in kinds}
  try:
    for kind in kinds:
      conns[kind], child = ctx.Pipe()
      procs[kind] = ctx.Process(target=worker, args=(kind, variant, batch, threads, warmup, child), daemon=True)
      procs[kind].start()
      infos[kind] = conns[kind].recv()
      if "error" in infos[kind]:
        raise RuntimeError(f"worker failed to start: {infos[kind]['error']}")
      log.info("%s ready: %s", kind, infos[kind])
    for r in range(rounds):
      for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
        time.sleep(SETTLE_S)
        conns[kind].send("turn")
        turns[kind].append(conns[kind].recv())
        log.info("round %d %s: %.3fs", r, kind, turns[kind][-1]["step_s"])
  finally:
    for kind, conn in conns.items():
      if procs[kind].is_alive():
        conn.send("stop")
      procs[kind].join(timeout=60)
  return infos, turns


def summarise(infos: dict, turns: dict, variant: str, batch: int, threads: int, host: dict) -> list[dict]:
  """A record per worker (medians, same-run peak, MFU) and the median paired ratios."""
  records = []
  for kind, runs in turns.items():
    step_s = statistics.median(t["step_s"] for t in runs)
    peak = 2 * 2048**3 / statistics.median(t["matmul_s"] for t in runs)
    records.append(dict(bench="compare_torch", worker=kind, variant=variant, batch=batch, **infos[kind],
                        step_s=round(step_s, 4), cpu_per_wall=round(statistics.median(t["cpu_per_wall"] for t in runs), 2),
                        peak_gflops=round(peak / 1e9, 1), mfu=round(infos[kind]["flops"] / step_s / peak, 4),
                        rounds=len(runs), **host))
  ratios = {}
  for torch_kind in [k for k in turns if k.startswith("torch")]:
    for jax_kind in [k for k in turns if k.startswith("jax")]:
      paired = [a["step_s"] / b["step_s"] for a, b in zip(turns[torch_kind], turns[jax_kind])]
      ratios[f"{torch_kind}/{jax_kind}"] = round(statistics.median(paired), 3)
  records.append(dict(bench="compare_torch_summary", variant=variant, batch=batch, threads=threads,
                      rounds=min(len(runs) for runs in turns.values()), time_ratios=ratios,
                      **{f"mfu_{r['worker']}": r["mfu"] for r in records}, **host))
  return records


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="S", choices=["S", "B"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; XLA uses the CPU affinity set")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker after start-up")
  p.add_argument("--workers", nargs="+", default=list(WORKERS), choices=WORKERS)
  p.add_argument("--out", help="append the JSON lines to this file too")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison: do not probe for TPUs
  os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  infos, turns = run_rounds(args.variant, args.batch, args.rounds, args.threads, args.warmup, tuple(args.workers))
  from src.bench import machine

  for record in summarise(infos, turns, args.variant, args.batch, args.threads, machine()):
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
