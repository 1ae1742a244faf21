"""Run directories on local disk or object stores (gs://, s3://): paths and file writes.

Paths go through `etils.epath` (Orbax's own path type), so `gs://bucket/run` works
wherever a local directory does. An object store has no append: a local run appends
each metrics line to `metrics.jsonl`; a remote one keeps this session's lines and
rewrites one object per session, `metrics-<first step>.jsonl`, at most every
`REMOTE_FLUSH_S` seconds and on close. `read_metrics` reads either layout back.

gs:// needs a GCS backend for epath (`gcsfs`, or TensorFlow's gfile) and, for
TensorBoard event files, `google-cloud-storage`: the `gcs` extra installs both.
"""

from __future__ import annotations

import json
import time

from etils import epath

REMOTE_FLUSH_S = 60.0  # a remote metrics object is rewritten at most this often


def is_remote(path: str | epath.Path) -> bool:
  return "://" in str(path)


def run_path(path: str | epath.Path) -> epath.Path:
  """An epath.Path for a run directory: absolute if local, as given if remote."""
  p = epath.Path(path)
  return p if is_remote(path) else epath.Path(p.expanduser().absolute())


class JsonLines:
  """Append-only JSON lines at `directory`: `metrics.jsonl` locally (appended and
  flushed per line), `metrics-<first_step>.jsonl` per session remotely (rewritten)."""

  def __init__(self, directory: epath.Path, first_step: int, name: str = "metrics"):
    self.remote = is_remote(directory)
    self.lines: list[str] = []
    self.last_flush = 0.0
    if self.remote:
      self.path = directory / f"{name}-{first_step:09d}.jsonl"
      self.file = None
    else:
      self.path = directory / f"{name}.jsonl"
      self.file = open(self.path, "a")

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
      return
    self.lines.append(line)
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


def copy_tree(src: str, dst: epath.Path) -> None:
  """Copy the files of local directory `src` into `dst` (local or remote)."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in sorted(epath.Path(src).iterdir()):
    (dst / f.name).write_bytes(f.read_bytes())


def read_metrics(directory: str | epath.Path, name: str = "metrics") -> list[dict]:
  """Every record of a run, oldest session first: the local file, then any remote
  session objects in step order."""
  directory = epath.Path(directory)
  files = [directory / f"{name}.jsonl"] + sorted(directory.glob(f"{name}-*.jsonl"))
  records: list[dict] = []
  for f in files:
    if f.exists():
      records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
  return records
