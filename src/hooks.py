"""What the training loop does around the step, as small objects it calls after each
step: metrics to the console, `metrics.jsonl`, TensorBoard and W&B (`MetricsWriter`,
`StepMeter`), the validation loss (`Evaluator`), periodic samples (the task's sampler,
written by `MetricsWriter`), and checkpoints with preemption and time slices (`Saver`).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils
import numpy as np

from src import media, storage
from src import mesh as mesh_lib
from src.state import merged
from src.checkpoint import Checkpointer
from src.config import TrainConfig

log = logging.getLogger("src.train")

EVAL_SEED = 1234  # fixed validation noise: the curve moves only with the model


def due(done: int, every: int, last: int) -> bool:
  """Whether something that runs every `every` steps (0: never) runs after step `done`;
  it always runs after the last step."""
  return bool(every) and (done % every == 0 or done == last)


def duration(seconds: float) -> str:
  """3h05m, 4m10s, 12s: an ETA at the precision it has."""
  s = int(round(seconds))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
  """Step `done`/`total`, steps/s and ETA: in every train log line, and on a terminal a
  status line redrawn at most twice a second (cleared before each log line)."""

  def __init__(self, start: int, total: int, stream=None):
    self.start, self.total, self.stream = start, total, stream or sys.stderr
    self.primary = jax.process_index() == 0
    self.tty = self.primary and hasattr(self.stream, "isatty") and self.stream.isatty()
    self.tic, self.drawn, self.shown = time.perf_counter(), 0.0, False

  def status(self, done: int, rate: float | None = None) -> str:
    rate = rate or (done - self.start) / max(time.perf_counter() - self.tic, 1e-9)
    eta = duration((self.total - done) / rate) if rate > 0 else "?"
    return f"{done}/{self.total} ({100 * done / max(self.total, 1):.0f}%)  {rate:.3g} steps/s  ETA {eta}"

  def tick(self, done: int) -> None:
    now = time.perf_counter()
    if self.tty and (now - self.drawn > 0.5 or done == self.total):
      bar = "#" * int(24 * done / max(self.total, 1))
      self.stream.write(f"\r\033[K[{bar:<24}] {self.status(done)}")
      self.stream.flush()
      self.drawn, self.shown = now, True

  def clear(self) -> None:
    if self.shown:
      self.stream.write("\r\033[K")
      self.stream.flush()
      self.shown = False


WANDB_ID = "wandb_id"  # in the workdir: the W&B run a resumed run continues


def check_wandb(t: TrainConfig) -> None:
  """Before anything starts: train.wandb needs the package (the `wandb` extra)."""
  if t.wandb and importlib.util.find_spec("wandb") is None:
    raise ValueError(f"train.wandb={t.wandb!r} needs the wandb package: pip install -e '.[wandb]' (or set "
                     "train.wandb='' to log to metrics.jsonl and TensorBoard only)")


def open_wandb(t: TrainConfig, workdir, config: dict):
  """The W&B run of this workdir: a new id on the first start (saved as WANDB_ID), the
  same run on every resume. Files go under {workdir}/wandb (a gs:// workdir: ./wandb,
  as W&B writes locally); offline mode keeps them there for `wandb sync`."""
  import wandb

  id_file = workdir / WANDB_ID
  run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
  id_file.write_text(run_id + "\n")
  local = not str(workdir).startswith("gs://")
  where = Path(str(workdir)) if local else Path.cwd()
  run = wandb.init(project=t.wandb, mode=t.wandb_mode, dir=str(where), id=run_id, resume="allow",
                   name=Path(str(workdir)).name, config=config)
  sync = f"; sync later with: wandb sync {where / 'wandb'}/offline-run-*-{run_id}" if t.wandb_mode == "offline" else ""
  log.info("W&B: project %s, run %s (%s)%s", t.wandb, run_id, t.wandb_mode, sync)
  return run


class MetricsWriter:
  """Console, `metrics.jsonl`, TensorBoard and (with train.wandb) Weights & Biases;
  only process 0 writes."""

  def __init__(self, workdir, tensorboard: bool, first_step: int = 0, progress: Progress | None = None,
               wandb_run=None):
    self.primary, self.progress = jax.process_index() == 0, progress
    self.jsonl = storage.JsonLines(workdir, first_step) if self.primary else None
    self.tb, self.wandb = None, wandb_run if self.primary else None
    if tensorboard and self.primary:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    where = str(step)
    if self.progress:
      self.progress.clear()
      if prefix == "train":
        where = self.progress.status(step, metrics.get("steps_per_s"))
    log.info("%s step %s  %s", prefix, where, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if not self.primary:
      return
    record = metrics if prefix == "train" else {f"{prefix}/{k}": v for k, v in metrics.items()}
    self.jsonl.write({"step": step, **record})
    if self.tb:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
    if self.wandb:
      self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

  def write_samples(self, step: int, workdir, videos: list, weights: str = "ema") -> None:
    """`samples/step_NNNNNNN-{weights}.png` (the grid) and one GIF per sample: the name says which weights."""
    if not self.primary:
      return
    out, name = workdir / "samples", f"step_{step:07d}-{weights}"
    image = media.grid(videos, scale=4)
    with tempfile.TemporaryDirectory() as tmp:  # image writers want local files
      media.write_png(Path(tmp) / f"{name}.png", image)
      for i, video in enumerate(videos):
        media.write_video(Path(tmp) / f"{name}-{i}.gif", video, scale=4)
      storage.copy_tree(tmp, out)
    if self.tb:
      self.tb.add_image(f"samples/{weights}", image, step, dataformats="HWC")
    if self.wandb:
      import wandb

      self.wandb.log({f"samples/{weights}": wandb.Image(image)}, step=step)
    log.info("samples (%s weights): wrote %s", weights.upper() if weights == "ema" else weights, out / f"{name}.png")

  def close(self, strict: bool = True) -> None:
    """Flush and close; `strict=False` (the run is already failing, e.g. a full disk)
    drops a second write error instead of raising it over the first."""
    try:
      if self.jsonl:
        self.jsonl.close()
      if self.tb:
        self.tb.close()
      if self.wandb:
        self.wandb.finish(exit_code=0 if strict else 1)
    except OSError:
      if strict:
        raise
      log.debug("closing the metrics after a failure", exc_info=True)


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


class StepMeter:
  """Steps, real and total tokens since the last log: steps/s, tokens/s, padding."""

  def __init__(self):
    self._reset()

  def _reset(self) -> None:
    self.tic, self.steps, self.real, self.total = time.perf_counter(), 0, 0, 0

  def add(self, tokens: tuple[int, int]) -> None:
    self.steps, self.real, self.total = self.steps + 1, self.real + tokens[0], self.total + tokens[1]

  def read(self) -> dict[str, float]:
    elapsed = time.perf_counter() - self.tic
    out = dict(steps_per_s=self.steps / elapsed, tokens_per_s=self.real * jax.process_count() / elapsed,
               padding_fraction=1.0 - self.real / max(self.total, 1))
    self._reset()
    return out


class Evaluator:
  """Held-out batches, read once, and the task's validation losses at its levels."""

  def __init__(self, task, mesh, rules, graphdef, frozen=None):
    it = task.batches("validation", jax.process_index(), jax.process_count())
    self.batches = [mesh_lib.place_batch(mesh, next(it), rules) for _ in range(task.cfg.train.eval_batches)]
    self.levels, self.frozen = task.eval_levels(), frozen
    key = jax.random.PRNGKey(EVAL_SEED)
    self._loss = jax.jit(lambda params, batch, level, frozen: task.eval_loss(
        merged(graphdef, params, frozen), batch, level, key, frozen))
    self._metrics = jax.jit(lambda params, batch, frozen: task.eval_metrics(
        merged(graphdef, params, frozen), batch, key, frozen))

  def __call__(self, params) -> dict[str, float]:
    """The loss at each of the task's levels and their mean (`loss`); a task without levels, its `eval_metrics`."""
    if not self.levels:
      per_batch = [jax.device_get(self._metrics(params, b, self.frozen)) for b in self.batches]
      return {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
    losses = {name: float(np.mean([self._loss(params, b, level, self.frozen) for b in self.batches]))
              for name, level in self.levels.items()}
    return {"loss": float(np.mean(list(losses.values()))), **losses}


class Saver:
  """Checkpoints every `ckpt_every` steps and at the end; on SIGTERM (TPU maintenance
  or preemption) or after `run_steps` steps of this invocation, saves and asks the
  loop to stop; on Ctrl-C saves what is whole."""

  def __init__(self, ckpt: Checkpointer, data, config: dict, cfg: TrainConfig, start: int):
    self.ckpt, self.data, self.config, self.cfg, self.start = ckpt, data, config, cfg, start
    self.preempt = Preemption()

  def __call__(self, done: int, state) -> bool:
    """After step `done`: save if due; True when the loop must stop. On several
    processes a SIGTERM stops them all at the same step: every process reports whether
    it was signalled (one tiny all-gather per step) and all stop if any was, so they
    save once, together (a host signalled alone would otherwise wait forever in the
    checkpoint's barrier while the others run the next step)."""
    out_of_slice = bool(self.cfg.run_steps) and done - self.start >= self.cfg.run_steps
    requested = self.preempt.requested
    if jax.process_count() > 1:
      requested = bool(np.asarray(multihost_utils.process_allgather(np.int32(requested))).any())
      if requested and not self.preempt.requested:
        log.warning("another process was signalled (SIGTERM): saving a checkpoint at step %d", done)
    stop = requested or out_of_slice
    if due(done, self.cfg.ckpt_every, self.cfg.steps) or stop:
      self.ckpt.save(done, state, self.data, self.config, force=True)
    if stop:
      log.warning("stopping after step %d (%s)", done, "SIGTERM" if requested else "train.run_steps")
    return stop

  def interrupted(self, state) -> None:
    """Ctrl-C: keep the work done so far, if the state is whole."""
    try:
      self.ckpt.save(int(state.step), state, self.data, self.config, force=True)
      log.warning("interrupted: saved step %d", int(state.step))
    except Exception:  # noqa: BLE001 - e.g. interrupted inside the step, its inputs donated
      log.error("interrupted inside a step: the newest checkpoint is the last periodic one")


CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
cache_counts = {"hits": 0, "misses": 0}  # persistent compilation cache look-ups in this process
_listening = False


def use_compile_cache(setting: str, workdir) -> str:
  """Point JAX's persistent compilation cache at `train.compile_cache` (auto: the run
  directory's compile_cache/, except on CPU) and count its hits and misses; returns the
  directory ("" when off)."""
  global _listening
  from jax.experimental.compilation_cache import compilation_cache

  path = setting if setting != "auto" else ("" if jax.default_backend() == "cpu" else str(workdir / "compile_cache"))
  if not path:
    return ""
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()  # a process trains several runs (tests): the cache follows the run
    compilation_cache.set_cache_dir(path)
  if not _listening:
    jax.monitoring.register_event_listener(
        lambda event, **_: cache_counts.__setitem__(CACHE_EVENTS[event], cache_counts[CACHE_EVENTS[event]] + 1)
        if event in CACHE_EVENTS else None)
    _listening = True
  return path
