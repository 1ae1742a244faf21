"""`python -m src.train --config configs/smoke.yaml [key.sub=value ...]`

Trains the spacetime DiT on the device mesh of the config. The loop is `train(cfg)`,
importable; `main()` only parses the command line. A run directory (local, or gs://
through etils.epath: src.storage) holds the resolved config, `metrics.jsonl`,
TensorBoard events and Orbax checkpoints; running the same command again resumes
from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding

from src import config as config_lib
from src import mesh as mesh_lib
from src import media, optim, storage, tasks
from src.checkpoint import Checkpointer
from src.config import Config
from src.models.vae import latent_shape

log = logging.getLogger("src.train")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema: nnx.State
  rng: jax.Array  # raw uint32 key; each step folds in its step number


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` (arrays or structs) carrying `shardings`: a state
  that exists only as layout, for restores and AOT compiles."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_model(cfg: Config, mesh, rules) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs carrying their shardings): the model's
  layout without allocating it, e.g. the target of a checkpoint restore."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abs_params = nnx.split(nnx.eval_shape(lambda: tasks.build_model(cfg, nnx.Rngs(0))))
    shardings = nnx.get_named_sharding(abs_params, mesh)
  return graphdef, with_shardings(abs_params, shardings)


def create_model(cfg: Config, mesh, rules):
  """Build the task's model with every parameter born sharded: (graphdef, params)."""
  graphdef, abstract = abstract_model(cfg, mesh, rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    init = jax.jit(lambda key: nnx.split(tasks.build_model(cfg, nnx.Rngs(key)))[1], out_shardings=shardings)
    return graphdef, init(jax.random.key(cfg.seed))


def init_state(cfg: Config, mesh, rules, optimizer) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params = create_model(cfg, mesh, rules)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(optimizer.init, out_shardings=optim.state_shardings(optimizer, params, mesh))(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
        ema=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(cfg.seed + 1))
  return graphdef, state


def abstract_state(cfg: Config, mesh, rules, optimizer) -> tuple[nnx.GraphDef, TrainState]:
  """`init_state` as shapes and shardings only: what a resume restores into (nothing
  is initialised first) and what an AOT compile traces with."""
  graphdef, params = abstract_model(cfg, mesh, rules)
  opt_state = with_shardings(jax.eval_shape(optimizer.init, params), optim.state_shardings(optimizer, params, mesh))
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                              opt_state=opt_state, ema=params,
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))


def train_step(state: TrainState, batch: dict, frozen=None, *, graphdef, cfg: Config, optimizer, schedule):
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = jax.value_and_grad(tasks.loss_fn)(state.params, graphdef, cfg, batch, rng, None, frozen)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.update_ema(state.ema, params, cfg.optim.ema_decay)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


class Evaluator:
  """Held-out batches, read once, and the validation loss at cfg.train.eval_times."""

  def __init__(self, cfg: Config, mesh, graphdef, frozen=None):
    it = tasks.make_batches(cfg, "validation", jax.process_index(), jax.process_count())
    self.batches = [mesh_lib.place_batch(mesh, next(it)) for _ in range(cfg.train.eval_batches)]
    self.times = list(cfg.train.eval_times) if cfg.task == "dit" else [0.0]
    self.frozen = frozen
    self._loss = jax.jit(functools.partial(tasks.eval_loss, graphdef=graphdef, cfg=cfg,
                                           key=jax.random.PRNGKey(EVAL_SEED)))

  def __call__(self, params) -> dict[str, float]:
    losses = {f"loss_t{t:g}": float(np.mean([self._loss(params, b, t, frozen=self.frozen) for b in self.batches]))
              for t in self.times}
    return {"loss": float(np.mean(list(losses.values()))), **losses}


def compile_step(cfg: Config, mesh, graphdef, state: TrainState, optimizer, example_batch: dict, frozen=None):
  """jit with explicit shardings: the state keeps its own, batches are split by row,
  a frozen model (on-the-fly VAE) is replicated, metrics are replicated. The state is
  donated: its buffers become the new state's."""
  step_fn = functools.partial(train_step, graphdef=graphdef, cfg=cfg, optimizer=optimizer,
                              schedule=optim.make_schedule(cfg.optim, cfg.train.steps))
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shardings = {k: NamedSharding(mesh, mesh_lib.batch_spec(v.ndim)) for k, v in example_batch.items()}
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


EVAL_SEED = 1234  # fixed validation noise: the curve moves only with the model


class MetricsWriter:
  """Console, `metrics.jsonl` and TensorBoard; only process 0 writes files."""

  def __init__(self, workdir, tensorboard: bool, first_step: int = 0):
    self.primary = jax.process_index() == 0
    self.jsonl = storage.JsonLines(workdir, first_step) if self.primary else None
    self.tb = None
    if tensorboard and self.primary:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    log.info("%s step %d  %s", prefix, step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if not self.primary:
      return
    record = metrics if prefix == "train" else {f"{prefix}/{k}": v for k, v in metrics.items()}
    self.jsonl.write({"step": step, **record})
    if self.tb:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{prefix}/{k}", v, step)

  def write_samples(self, step: int, workdir, videos: list) -> None:
    if not self.primary:
      return
    out = workdir / "samples"
    image = media.grid(videos, scale=4)
    with tempfile.TemporaryDirectory() as tmp:  # image writers want local files
      media.write_png(Path(tmp) / f"step_{step:07d}.png", image)
      for i, video in enumerate(videos):
        media.write_video(Path(tmp) / f"step_{step:07d}-{i}.gif", video, scale=4)
      storage.copy_tree(tmp, out)
    if self.tb:
      self.tb.add_image("samples", image, step, dataformats="HWC")
    log.info("samples: wrote %s", out / f"step_{step:07d}.png")

  def close(self) -> None:
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


class Preemption:
  """SIGTERM (TPU maintenance/preemption): finish the step, save, exit cleanly."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
      pass

  def _handle(self, *_):
    log.warning("SIGTERM: saving a checkpoint at the end of this step")
    self.requested = True


def train(cfg: Config) -> dict:
  """Train to `cfg.train.steps`, resuming from the newest checkpoint. Returns the last metrics."""
  mesh_lib.initialize_distributed(cfg.mesh)
  workdir = storage.run_path(cfg.workdir)  # local, or gs://... (etils.epath)
  workdir.mkdir(parents=True, exist_ok=True)
  cfg_dict = config_lib.to_dict(cfg)
  if jax.process_index() == 0:
    (workdir / "config.yaml").write_text(config_lib.to_yaml(cfg))

  mesh = mesh_lib.make_mesh(cfg.mesh)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.data.batch_size % batch_devices:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} rows cannot be split over the {batch_devices} devices "
                     "of the mesh's data and fsdp axes: make it a multiple, or change mesh sizes.")
  rules = mesh_lib.make_rules(cfg.mesh.rules)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  data = tasks.make_batches(cfg, "train", jax.process_index(), jax.process_count())
  frozen = tasks.load_frozen(cfg)
  if frozen is not None:
    frozen = jax.device_put(frozen, NamedSharding(mesh, jax.sharding.PartitionSpec()))

  ckpt = Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
  if ckpt.latest_step() is not None:  # resume: restore into shapes, never initialise a state to overwrite
    graphdef, like = abstract_state(cfg, mesh, rules, optimizer)
    state = ckpt.restore(like, data)
  else:
    graphdef, state = init_state(cfg, mesh, rules, optimizer)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("model: %.2fM parameters", n_params / 1e6)
  start = int(state.step)
  step_fn = None
  writer = MetricsWriter(workdir, cfg.train.tensorboard, start)
  evaluator = Evaluator(cfg, mesh, graphdef, frozen) if cfg.train.eval_every else None
  sampler = None
  if cfg.train.sample_every and cfg.task == "dit":
    from src.sample import Sampler

    sampler = Sampler(graphdef, cfg, tasks.sample_specs(cfg, cfg.train.sample_count),
                      steps=cfg.train.sample_steps, guidance=cfg.train.sample_guidance, vae=frozen)
  preempt = Preemption()
  last = {}
  tic, real_tokens, total_tokens, steps_timed = time.perf_counter(), 0, 0, 0
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      for step in range(start, cfg.train.steps):
        local = next(data)
        step_fn = step_fn or compile_step(cfg, mesh, graphdef, state, optimizer, local, frozen)
        real, total = tokens_in(local, cfg)
        real_tokens, total_tokens = real_tokens + real, total_tokens + total
        state, metrics = step_fn(state, mesh_lib.place_batch(mesh, local), frozen)
        steps_timed += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - tic
          last = dict(metrics, steps_per_s=steps_timed / elapsed,
                      tokens_per_s=real_tokens * jax.process_count() / elapsed,
                      padding_fraction=1.0 - real_tokens / max(total_tokens, 1),
                      compiled_programs=step_fn._cache_size())  # stays 1: shapes never recompile
          if hasattr(data, "skip_counts"):  # bad records skipped by the loader, by reason
            last.update({f"skipped_{k}": float(v) for k, v in data.skip_counts().items()})
          writer.write(done, last)
          tic, real_tokens, total_tokens, steps_timed = time.perf_counter(), 0, 0, 0
        if evaluator and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
          writer.write(done, evaluator(state.params), prefix="val")
        if sampler and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
          writer.write_samples(done, workdir, sampler(state.ema, seed=cfg.seed))
        out_of_slice = cfg.train.run_steps and done - start >= cfg.train.run_steps
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or preempt.requested or out_of_slice:
          ckpt.save(done, state, data, cfg_dict, force=True)
        if preempt.requested or out_of_slice:
          log.warning("stopping after step %d (%s)", done, "SIGTERM" if preempt.requested else "train.run_steps")
          break
  except KeyboardInterrupt:  # Ctrl-C: keep the work done so far, if the state is whole
    try:
      ckpt.save(int(state.step), state, data, cfg_dict, force=True)
      log.warning("interrupted: saved step %d", int(state.step))
    except Exception:  # noqa: BLE001 - e.g. interrupted inside the step, its inputs donated
      log.error("interrupted inside a step: the newest checkpoint is the last periodic one")
    raise
  finally:
    ckpt.close()
    writer.close()
  return last


def tokens_in(local: dict, cfg: Config) -> tuple[int, int]:
  """(real, total) tokens of a host batch: packed tokens, or latent tokens (DiT on
  pixels), or pixels (VAE)."""
  if "segment_ids" in local:
    return int((local["segment_ids"] > 0).sum()), local["segment_ids"].size
  if cfg.task == "vae":
    return local["video"][..., 0].size, local["video"][..., 0].size
  t, h, w = latent_shape(cfg.vae, local["video"].shape[1:4])
  n = len(local["video"]) * t * h * w // math.prod(cfg.model.patch)
  return n, n


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="python -m src.train",
      description="Train a spacetime DiT. Settings come from the dataclass defaults in "
      "src/config.py, then the YAML file, then key.sub=value overrides. Re-running with the "
      "same workdir resumes from its newest checkpoint.",
      epilog="example: python -m src.train --config configs/smoke.yaml train.steps=500 mesh.fsdp=-1",
  )
  parser.add_argument("--config", help="YAML preset (only the keys that differ from the defaults)")
  parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    train(cfg)
  except (ValueError, FileNotFoundError) as e:  # bad mesh, data or weights: say it, no traceback
    log.debug("start-up failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
