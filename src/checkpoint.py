"""Checkpoints: one Orbax CheckpointManager for everything an exact resume needs.

Each step directory under `{workdir}/checkpoints/` holds four items:
- `state`: step, parameters, optimizer state, EMA, RNG key, bad-step count (arrays; every
  host writes its own shards);
- `data`: the grain iterator position, one file per process;
- `config`: the resolved config, so a run directory says how it was made;
- `integrity`: a checksum of every array of the state (`checksums`).
Saves are asynchronous and the manager keeps the newest N.

A save that cannot be written (a full disk, a quota, an I/O error) leaves the previous
checkpoints as they were: Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it
only when every item is whole, and deletes old steps only after that. The failure
surfaces in the main thread at the next save (or at close) as one `WriteError` naming
the step and the newest complete checkpoint; the error flood of Orbax's background
writers (one record per array, "Event loop is closed" per pending write) is dropped
from the log, since that one line carries its reason.

Restores are checked: a checkpoint that fails to load (a missing or truncated file, bad
metadata, a bad iterator state) or whose arrays do not match their checksums is
reported with its step and reason, moved aside to `checkpoints.corrupt/`, and the next
older one is tried. Orbax keeps no checksum of array data (tensorstore's chunk formats
carry none), so a flipped bit would load silently: the checksum is ours, the sum of
every array's bits as uint32 words, mod 2^32. Integer addition is exact and
order-free, so it is the same on any mesh, costs one reduction per array per save, and
changes with any single flipped bit.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from src import storage
from src.mesh import with_shardings

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
  pass


class WriteError(RuntimeError):
  """A checkpoint (or another file of the run) could not be written; the checkpoints
  already complete are intact."""


# Orbax's background writers report a failed write once per array and pending future;
# the main thread re-raises it as one WriteError.
_NOISE = re.compile(r"orbax-checkpoint-tmp|_SignalingThread\.run\(\) raised|Handler Commit operations|"
                    r"Save Finalize thread|exception was never retrieved|Event loop is closed")


class _DropWriterNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and _NOISE.search(record.getMessage()):
      log.debug("background checkpoint writer: %s", record.getMessage()[:300])
      return False
    return True


def _quiet_background_writers() -> None:
  """Install (once) the filter on the loggers Orbax's threads use, and an unraisable
  hook that drops the closed-event-loop errors of writes still pending after a failure."""
  if getattr(sys.unraisablehook, "_drops_writer_noise", False):
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_DropWriterNoise())
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  hook._drops_writer_noise = True
  sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
  """The OS's words for a failed write (tensorstore wraps them in a long message)."""
  text = str(e)
  os_error = re.search(r"Failed to write [^:]*: (.*?) \[os_error_code='(\d+)'\]", text)
  if os_error:
    return f"{os_error.group(1)} (errno {os_error.group(2)})"
  return (text.strip().splitlines() or [type(e).__name__])[0][:300]


def _words(x: jax.Array) -> jax.Array:
  """An array's bits as uint32 words (narrower types widened first, wider ones split)."""
  if x.dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if x.dtype.itemsize < 4:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., itemsize // 4]


@jax.jit
def checksums(tree) -> jax.Array:
  """[n] uint32: per array of `tree`, the sum of its bits as uint32 words, mod 2^32."""
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]  # the state's keys are raw uint32 (PRNGKey)
  return jnp.stack([jnp.sum(_words(x), dtype=jnp.uint32) for x in leaves])


class Checkpointer:
  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = storage.run_path(workdir) / "checkpoints"  # local or gs://
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config", "integrity"))
    self.in_flight: int | None = None  # the step of the last save started
    self.failed = False
    _quiet_background_writers()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None, config: dict, force=False) -> bool:
    sums = [int(v) for v in np.asarray(jax.device_get(checksums(state)))]
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                integrity=ocp.args.JsonSave({"state_checksums": sums}))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:  # also where the previous asynchronous save's failure surfaces
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - any write failure: the complete checkpoints stay
      raise self._write_error(e, step) from e
    if saved:
      self.in_flight = step
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, like_state: Any, data_iter: grain.DatasetIterator | None = None, step: int | None = None):
    """Restore into the shapes/shardings of `like_state`, the data iterator in place: the
    newest checkpoint that loads whole and matches its checksums (or `step`)."""
    return self._first_good(lambda s: self._restore(s, like_state, data_iter), step)

  def _restore(self, step: int, like_state: Any, data_iter):
    args = dict(state=ocp.args.StandardRestore(with_shardings(like_state)))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))["state"]
    self._verify(step, restored)
    log.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored

  def _verify(self, step: int, state: Any) -> None:
    """ValueError when the restored arrays differ from the checksums saved with them."""
    if not (self.directory / str(step) / "integrity").exists():
      log.warning("checkpoint step %d has no checksums (written by an older version): not verified", step)
      return
    saved = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]
    now = [int(v) for v in np.asarray(jax.device_get(checksums(state)))]
    bad = [i for i, (a, b) in enumerate(zip(saved["state_checksums"], now)) if a != b]
    if bad or len(now) != len(saved["state_checksums"]):
      paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
      raise ValueError(f"array data differ from their checksums (flipped bits?): {', '.join(paths[i] for i in bad[:5])}")

  def _first_good(self, restore, step: int | None = None):
    """`restore(step)` of `step`, else of the newest checkpoint that restores, newest
    first; each one that fails is reported and moved aside."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    for s in steps:
      try:
        return restore(s)
      except Exception as e:  # noqa: BLE001 - any failure to load means this checkpoint is unusable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        log.warning("checkpoint step %d in %s cannot be used (%s: %s); trying the previous one", s, self.directory,
                    type(e).__name__, reason)
        if step is None:
          self._move_aside(s)
    raise CheckpointNotFoundError(f"no usable checkpoint under {self.directory} (tried steps {steps})")

  def _move_aside(self, step: int) -> None:
    """A corrupt step leaves `checkpoints/` (so it is neither resumed nor overwritten by
    the next save of that step) for `checkpoints.corrupt/`, kept for inspection."""
    if jax.process_index() == 0:
      aside = self.directory.parent / "checkpoints.corrupt"
      aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside / f"{step}")
    self.manager.reload()

  def restore_part(self, name: str, like: Any, step: int | None = None):
    """One field of the saved state (e.g. `ema`) into the shapes/shardings of `like`
    (arrays or ShapeDtypeStructs); nothing else of the state is read or allocated.
    The newest checkpoint that has it readable (or `step`)."""
    def restore(s):
      target = {name: with_shardings(like)}
      args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True)
      restored = self.manager.restore(s, args=ocp.args.Composite(state=args))
      log.info("checkpoint: restored %s of step %d from %s", name, s, self.directory)
      return restored["state"][name]

    return self.first_readable(restore, step)

  def first_readable(self, restore, step: int | None):
    """As `_first_good`, for readers (sampling, export): nothing is moved aside."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    for s in steps:
      try:
        return restore(s)
      except Exception as e:  # noqa: BLE001
        log.warning("checkpoint step %d in %s cannot be read (%s); trying the previous one", s, self.directory,
                    (str(e).strip().splitlines() or [type(e).__name__])[0][:300])
    raise CheckpointNotFoundError(f"no readable checkpoint under {self.directory} (tried steps {steps})")

  def restore_config(self, step: int | None = None) -> dict:
    """The saved config of `step`, else of the newest checkpoint whose config reads."""
    return self.first_readable(
        lambda s: self.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], step)

  def _write_error(self, e: BaseException, step: int) -> WriteError:
    self.failed = True
    newest = self.newest()  # reloads the step list: a step that failed is not in it
    failed = self.in_flight if self.in_flight is not None and self.in_flight not in self.manager.all_steps() else step
    return WriteError(f"checkpoint step {failed} could not be written to {self.directory}: {_reason(e)}; "
                      f"{newest}")

  def newest(self) -> str:
    """Which complete checkpoint a re-run resumes from, for error messages."""
    self.manager.reload()
    steps = self.manager.all_steps()
    return (f"the newest complete checkpoint is step {max(steps)}; free space and re-run the same command to "
            "resume from it" if steps else "no checkpoint is complete")

  def close(self) -> None:
    """Wait for the pending save (WriteError if it failed), then release the manager.
    After a failure already raised, only releases."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if not self.failed:
        raise self._write_error(e, self.in_flight or 0) from e
      log.debug("closing after a failed save", exc_info=True)
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001
      if not self.failed:
        raise
      log.debug("closing after a failed save", exc_info=True)
