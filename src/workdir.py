"""A run directory's start-up checks: usable, one trainer at a time, resumed only with
a config that continues the same run.

- `check_writable`: the directory exists or can be made, is a directory, accepts a
  file, and has room for two checkpoints of the state (estimated from its size).
- `WorkdirLock`: `{workdir}/train.lock` holds the owner's host and pid, created
  exclusively (O_EXCL) by process 0. A second trainer is refused with the owner named;
  a lock whose process is gone (same host, pid not alive) is stale and taken over. On
  gs:// no exclusive create exists: the lock is written and read back, best effort.
- `check_resume`: the fields that define the model, the objective, the data order and
  the seed must equal the saved config's; the others may change (with a warning for
  the learning-rate schedule).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket

from src import storage
from src.config import ConfigError

log = logging.getLogger(__name__)

LOCK = "train.lock"
# Sections whose every field defines the run; minus the fields that may change on resume.
DEFINING = ("task", "seed", "model", "vae", "lora", "objective", "data")
MAY_CHANGE = {
    "model.attention", "model.remat", "model.scan_layers", "model.init_from",  # same math, or not read on resume
    "vae.checkpoint", "vae.checkpoint_weights", "vae.chunk_frames", "vae.dtype",
    "lora.base_dtype",  # the base's fingerprint, saved in the state, decides
    "data.num_workers", "data.prefetch", "data.log_every", "data.probe_records", "data.data_dir",
}
SCHEDULE = ("train.steps", "optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio")


class WorkdirError(ValueError):
  """A run directory that cannot be used: not a writable directory, too full, or locked."""


def check_writable(workdir, state_bytes: int = 0) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} exists and is not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
  if state_bytes and not storage.is_remote(workdir):
    free = shutil.disk_usage(str(workdir)).free
    if free < 2 * state_bytes:
      raise WorkdirError(f"workdir {workdir}: {free / 2**20:.0f} MiB free, but two checkpoints of this run need about "
                         f"{2 * state_bytes / 2**20:.0f} MiB: free space or point workdir elsewhere")


class WorkdirLock:
  """`with WorkdirLock(workdir):` one trainer at a time (process 0 takes it)."""

  def __init__(self, workdir, primary: bool = True):
    self.path, self.primary, self.held = workdir / LOCK, primary, False
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

  def __enter__(self) -> WorkdirLock:
    if not self.primary:
      return self
    for _ in range(2):  # a stale lock is removed once, then taken
      if self._create():
        self.held = True
        return self
      other = self._read()
      if not self._stale(other):
        raise WorkdirError(f"{self.path.parent} is in use by another trainer ({other.get('host')}, pid "
                           f"{other.get('pid')}): wait for it, or use another workdir. If that trainer is gone, "
                           f"delete {self.path}.")
      log.warning("taking over the stale lock %s of %s (pid %s is not running)", self.path, other.get("host"),
                  other.get("pid"))
      self.path.unlink()
    raise WorkdirError(f"could not take the lock {self.path}")

  def _create(self) -> bool:
    text = json.dumps(self.owner)
    if storage.is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return self._read() == self.owner
    try:
      fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _read(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}  # unreadable or half-written: treated as stale only on this host's terms below

  def _stale(self, other: dict) -> bool:
    if other.get("host") != self.owner["host"] or "pid" not in other:
      return not other  # another host's lock cannot be checked: only an empty one is stale
    try:
      os.kill(int(other["pid"]), 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False

  def __exit__(self, *exc) -> None:
    if self.held and self._read() == self.owner:
      self.path.unlink()
    self.held = False


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "rules" else {f"{prefix}{k}": v})
  return out


def check_resume(new: dict, saved: dict, source: str) -> None:
  """ConfigError listing every defining key whose value differs from the saved config
  (`new`, `saved`: config dicts); a warning when the schedule changes."""
  plain = lambda d: json.loads(json.dumps(d))  # tuples and lists alike, as saved
  a, b = _flat(plain(new)), _flat(plain(saved))
  keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in DEFINING and k not in MAY_CHANGE)
  differ = [f"{k}: saved {b.get(k)!r}, now {a.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
  if differ:
    raise ConfigError(f"{source}: this run was trained with another config; resuming would continue a different "
                      "run. Differing keys:\n  " + "\n  ".join(differ)
                      + "\nUse the saved values, or a new workdir (model.init_from starts a new run from pretrained "
                      "Wan weights; `src.convert export` turns this run's into such weights).")
  changed = [k for k in SCHEDULE if a.get(k) != b.get(k)]
  if changed:
    log.warning("resuming with a changed learning-rate schedule (%s): the steps already run followed the old one",
                ", ".join(f"{k} {b.get(k)} -> {a.get(k)}" for k in changed))
