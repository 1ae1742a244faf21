"""Run directories on local disk or object stores (gs://, s3://): paths and file writes.

Paths go through `etils.epath` (Orbax's own path type), so `gs://bucket/run` works
wherever a local directory does. An object store has no append: a local run appends
each metrics line to `metrics.jsonl`; a remote one keeps this session's lines and
rewrites one object, `metrics-<first step>.jsonl`, at most every `REMOTE_FLUSH_S`
seconds and on close; once that object reaches `REMOTE_PART_BYTES` it is sealed and
the next line starts a new one named by its own step, so a long run never rewrites
more than one part's bytes. `read_metrics` reads either layout back.

gs:// needs a GCS backend for epath (`gcsfs`, or TensorFlow's gfile) and, for
TensorBoard event files, `google-cloud-storage`: the `gcs` extra installs both.
"""

from __future__ import annotations

import json
import logging
import math
import time

from etils import epath

log = logging.getLogger(__name__)
REMOTE_FLUSH_S = 60.0  # a remote metrics object is rewritten at most this often
REMOTE_PART_BYTES = 1 << 20  # ... and sealed at this size (~5k records of a dozen metrics)


def is_remote(path: str | epath.Path) -> bool:
  return "://" in str(path)


def run_path(path: str | epath.Path) -> epath.Path:
  """An epath.Path for a run directory: absolute if local, as given if remote."""
  p = epath.Path(path)
  return p if is_remote(path) else epath.Path(p.expanduser().absolute())


class JsonLines:
  """Append-only JSON lines at `directory`: `metrics.jsonl` locally (appended and
  flushed per line); remotely `metrics-<step>.jsonl` parts, the current one rewritten
  (see the module docstring). Records carry a "step" (remote part names use it)."""

  def __init__(self, directory: epath.Path, first_step: int, name: str = "metrics"):
    self.remote, self.directory, self.name = is_remote(directory), directory, name
    self.lines: list[str] = []
    self.size = 0  # bytes in self.lines
    self.last_flush = -math.inf  # the first record flushes at once, whatever the clock's origin (boot)
    self._drop_after(first_step)
    if self.remote:
      self.path = self._part(first_step)
      self.file = None
    else:
      self.path = directory / f"{name}.jsonl"
      self.file = open(self.path, "a")

  def _drop_after(self, step: int) -> None:
    """A resume at `step` re-runs what came after it: records past it (written after the
    last checkpoint, before a crash) are removed, so every step appears once. A torn
    last line (a crash mid-write) goes too."""
    files = [self.directory / f"{self.name}.jsonl"] + sorted(self.directory.glob(f"{self.name}-*.jsonl"))
    for f in (f for f in files if f.exists()):
      lines = f.read_text().splitlines(keepends=True)
      kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
      if len(kept) == len(lines):
        continue
      log.warning("%s: dropping %d record(s) past step %d (the run resumes there)", f, len(lines) - len(kept), step)
      if kept or not self.remote:
        f.write_text("".join(kept))
      else:
        f.unlink()

  def _part(self, step: int) -> epath.Path:
    return self.directory / f"{self.name}-{step:09d}.jsonl"

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
      return
    if self.lines and self.size + len(line) > REMOTE_PART_BYTES:  # seal this part, start the next
      self.flush()
      self.lines, self.size, self.path = [], 0, self._part(int(record["step"]))
    self.lines.append(line)
    self.size += len(line)
    if time.monotonic() - self.last_flush >= REMOTE_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    if self.remote and self.lines:
      self.path.write_text("".join(self.lines))
      self.last_flush = time.monotonic()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    else:
      self.flush()


def _step_of(line: str) -> int | None:
  """The step of a JSON-lines record, or None for a torn or foreign line."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def copy_tree(src: str, dst: epath.Path) -> None:
  """Copy the files of local directory `src` into `dst` (local or remote)."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in sorted(epath.Path(src).iterdir()):
    (dst / f.name).write_bytes(f.read_bytes())


def read_metrics(directory: str | epath.Path, name: str = "metrics") -> list[dict]:
  """Every record of a run, oldest first: the local file, then any remote parts in
  step order."""
  directory = epath.Path(directory)
  files = [directory / f"{name}.jsonl"] + sorted(directory.glob(f"{name}-*.jsonl"))
  records: list[dict] = []
  for f in files:
    if f.exists():
      records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
  return records
