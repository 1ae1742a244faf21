"""`python -m src.train --config configs/smoke.yaml [key.sub=value ...]`

Trains what the config asks for (a `src.tasks` task: the DiT, or the VAE) on the
device mesh of the config. The loop is `train(cfg)`, importable; `main()` only parses
the command line. A run directory (local, or gs:// through etils.epath: src.storage)
holds the resolved config, `metrics.jsonl`, TensorBoard events and Orbax checkpoints;
running the same command again resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import jax
from flax import nnx

from src import config as config_lib
from src import hooks, optim, storage, tasks
from src import mesh as mesh_lib
from src.checkpoint import Checkpointer, WriteError
from src.config import Config
from src.lora import check_fingerprint
from src.state import abstract_state, compile_step, fingerprint_of, init_state
from src.workdir import WorkdirLock, check_resume, check_writable

log = logging.getLogger("src.train")


def train(cfg: Config) -> dict:
  """Train to `cfg.train.steps`, resuming from the newest checkpoint. Returns the last logged metrics."""
  task = tasks.make_task(cfg)
  hooks.check_wandb(cfg.train)
  mesh_lib.initialize_distributed(cfg.mesh)
  workdir = storage.run_path(cfg.workdir)  # local, or gs://... (etils.epath)
  check_writable(workdir)
  with WorkdirLock(workdir, primary=jax.process_index() == 0):
    ckpt = Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    try:
      open_workdir(cfg, workdir, ckpt)
      return run(cfg, task, workdir, ckpt)
    finally:
      ckpt.close()


def run(cfg: Config, task, workdir, ckpt: Checkpointer) -> dict:
  """The loop of `train`, in a checked and locked run directory."""
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.make_rules(cfg.mesh.rules)
  check_batch_split(cfg.data.batch_size, mesh, rules)
  optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  data = task.batches("train", jax.process_index(), jax.process_count())
  frozen = task.load_frozen(mesh, rules)
  graphdef, state = restore_or_init(task, mesh, rules, optimizer, ckpt, data, frozen)
  check_writable(workdir, sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count())
  cache = hooks.use_compile_cache(cfg.train.compile_cache, workdir)
  step_fn = timed_compile(cache, task, mesh, rules, graphdef, state, optimizer, schedule, frozen)
  start, t = int(state.step), cfg.train
  progress = hooks.Progress(start, t.steps)
  wandb_run = hooks.open_wandb(t, workdir, config_lib.to_dict(cfg)) if t.wandb and jax.process_index() == 0 else None
  writer, meter = hooks.MetricsWriter(workdir, t.tensorboard, start, progress, wandb_run), hooks.StepMeter()
  evaluator = hooks.Evaluator(task, mesh, rules, graphdef, frozen) if t.eval_every else None
  sampler = task.make_sampler(graphdef, task.with_decoder(frozen, mesh), t.sample_count) if t.sample_every else None
  saver, last = hooks.Saver(ckpt, data, config_lib.to_dict(cfg), t, start), {}
  finished = False
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      for step in range(start, t.steps):
        local = next(data)
        meter.add(task.count_tokens(local))
        state, metrics = step_fn(state, mesh_lib.place_batch(mesh, local, rules), frozen)
        done = step + 1
        progress.tick(done)
        if hooks.due(done, t.log_every, t.steps):
          last = log_metrics(writer, done, metrics, meter, data)
        if hooks.due(done, min(t.log_every, t.max_bad_steps), t.steps):
          check_finite(done, metrics, t.max_bad_steps)
        if evaluator and hooks.due(done, t.eval_every, t.steps):
          writer.write(done, evaluator(state.params), prefix="val")
        if sampler and hooks.due(done, t.sample_every, t.steps):
          write_samples(writer, done, workdir, task, sampler, state, cfg)
        if saver(done, state):
          break
    finished = True
  except KeyboardInterrupt:
    saver.interrupted(state)
    raise
  except OSError as e:  # metrics, samples (a full disk, a quota) or a data read: stop, the checkpoints are whole
    ckpt.failed = True
    raise WriteError(f"an I/O error stopped the run in {workdir} ({e}); {ckpt.newest()}") from e
  finally:
    writer.close(strict=finished)
  return last


def write_samples(writer: hooks.MetricsWriter, done: int, workdir, task, sampler, state, cfg: Config) -> None:
  """The periodic samples of `train.sample_weights`, and how many show what they were asked for (synthetic data)."""
  videos = sampler(state.ema if cfg.train.sample_weights == "ema" else state.params, seed=cfg.seed)
  writer.write_samples(done, workdir, videos, cfg.train.sample_weights)
  quality = task.sample_quality(sampler, videos)
  if quality is not None:
    writer.write(done, {"sample_pass": quality}, prefix="val")


def open_workdir(cfg: Config, workdir, ckpt: Checkpointer) -> None:
  """A resume must continue the same run (`workdir.check_resume` against the newest
  checkpoint's config); then process 0 writes the resolved config. A rejected config
  never overwrites the saved one."""
  step = ckpt.latest_step()
  if step is not None:
    check_resume(config_lib.to_dict(cfg), ckpt.restore_config(), f"{workdir} (step {step})")
  if jax.process_index() == 0:
    (workdir / "config.yaml").write_text(config_lib.to_yaml(cfg))


def check_batch_split(batch_size: int, mesh, rules) -> None:
  ways = mesh_lib.batch_devices(mesh, rules)
  if batch_size % ways:
    raise ValueError(f"data.batch_size={batch_size} rows cannot be split over the {ways} devices the batch is "
                     "sharded over (the act_batch rule: data x fsdp by default): make it a multiple, or change "
                     "mesh sizes.")


def restore_or_init(task, mesh, rules, optimizer, ckpt: Checkpointer, data, frozen: dict | None = None):
  """The newest checkpoint's state, restored into shapes (nothing initialised first,
  the data iterator repositioned), or a fresh state. A LoRA run's adapters resume only
  on the base they were trained on (its fingerprint, saved in the state)."""
  if ckpt.latest_step() is None:
    graphdef, state = init_state(task, mesh, rules, optimizer, task.cfg.seed, frozen)
  else:
    graphdef, like = abstract_state(task, mesh, rules, optimizer)
    state = ckpt.restore(like, data)
    if task.trains_adapters:
      with jax.set_mesh(mesh):
        current = jax.jit(fingerprint_of)(frozen)
      check_fingerprint(state.base_fingerprint, current, task.cfg.model.init_from or f"random, seed {task.cfg.seed}")
  log.info("model: %.2fM parameters", sum(x.size for x in jax.tree.leaves(state.params)) / 1e6)
  return graphdef, state


def timed_compile(cache: str, *args):
  """`compile_step`, timed and, with a persistent compilation cache, whether it came from it."""
  tic, before = time.perf_counter(), dict(hooks.cache_counts)
  step_fn = compile_step(*args)
  hits, misses = (hooks.cache_counts[k] - before[k] for k in ("hits", "misses"))
  how = f" (compilation cache {cache}: {'hit, nothing compiled' if hits and not misses else 'miss'})" if cache else ""
  log.info("compiled the train step in %.1f s%s", time.perf_counter() - tic, how)
  return step_fn


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite loss or gradients (each was skipped)."""


def check_finite(done: int, metrics: dict, limit: int) -> None:
  """Stop the run once `limit` steps in a row were non-finite. Skipped steps leave the
  state as it was, so every checkpoint on disk stays finite; read every
  min(log_every, max_bad_steps) steps, not every step, to keep the host off the
  device's critical path."""
  bad = int(jax.device_get(metrics["bad_steps"]))
  if bad:
    log.warning("step %d: the last %d step(s) had a non-finite loss or gradients and were skipped", done, bad)
  if bad >= limit:
    raise NonFiniteError(f"{bad} steps in a row up to step {done} had a non-finite loss or gradients (each skipped; "
                         f"train.max_bad_steps={limit}): lower optim.lr, raise optim.eps, or check the data. The "
                         "checkpoints on disk are the last finite ones.")


def log_metrics(writer: hooks.MetricsWriter, done: int, metrics: dict, meter: hooks.StepMeter, data) -> dict:
  """The step's metrics, the throughput since the last log and the loader's skip counts."""
  record = {k: float(v) for k, v in jax.device_get(metrics).items()}
  record.update(meter.read())
  record.update({f"skipped_{k}": float(v) for k, v in data.skip_counts().items()})  # bad records, by reason
  writer.write(done, record)
  return record


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="python -m src.train",
      description="Train a spacetime DiT (task=dit) or its video VAE (task=vae). Settings come from the "
      "dataclass defaults in src/schema.py, then the YAML file, then key.sub=value overrides; --help-config "
      "lists every key. Re-running with the same workdir resumes from its newest checkpoint.",
      epilog="example: python -m src.train --config configs/smoke.yaml train.steps=500 mesh.fsdp=-1",
  )
  parser.add_argument("--config", help="YAML preset (only the keys that differ from the defaults)")
  parser.add_argument("--help-config", action="store_true",
                      help="list every config key with its type, default and meaning, and exit")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config (defaults <- --config <- overrides) as YAML, and exit")
  parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.help_config:
    print("\n".join(config_lib.describe()))
    return 0
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config_lib.to_yaml(cfg), end="")
    return 0
  try:
    train(cfg)
  except (ValueError, FileNotFoundError) as e:  # bad mesh, data or weights: say it, no traceback
    log.debug("start-up failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (NonFiniteError, WriteError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
