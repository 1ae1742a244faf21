"""src.storage: run directories on object stores (gs://) without append, read back
as one metrics stream. GCS is simulated by etils.epath's mock backend, which maps
gs://bucket onto a local directory and records how every file is opened."""

import json

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from src import storage


@pytest.fixture
def fake_gcs(tmp_path):
  """gs://bucket/... -> tmp_path/...; yields the list of (path, mode) opens."""
  opens = []

  def local(path):
    return str(path).replace("gs://bucket", str(tmp_path))

  def open_(fn, path, mode="r"):
    opens.append((str(path), mode))
    return fn(local(path), mode)

  def one_path(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def glob(fn, pattern):
    return [p.replace(str(tmp_path), "gs://bucket") for p in fn(local(pattern))]

  with epath_testing.mock_epath(open=open_, exists=one_path, isdir=one_path, makedirs=one_path, mkdir=one_path,
                                listdir=one_path, glob=glob, stat=one_path):
    yield opens


def test_local_metrics_append_across_sessions(tmp_path):
  for first, steps in ((0, [1, 2]), (2, [3])):
    lines = storage.JsonLines(storage.run_path(tmp_path), first)
    for s in steps:
      lines.write({"step": s, "loss": 1.0 / s})
    lines.close()
  assert [r["step"] for r in storage.read_metrics(tmp_path)] == [1, 2, 3]
  assert (tmp_path / "metrics.jsonl").exists() and storage.run_path(tmp_path).is_absolute()


def test_remote_metrics_never_append_and_read_back_in_order(fake_gcs, tmp_path, monkeypatch):
  run = storage.run_path("gs://bucket/run")
  assert storage.is_remote(run) and str(run) == "gs://bucket/run"
  run.mkdir(parents=True, exist_ok=True)
  monkeypatch.setattr(storage, "REMOTE_FLUSH_S", 0.0)  # rewrite on every line
  for first, steps in ((0, [1, 2, 3]), (3, [4, 5])):  # two sessions: a restart at step 3
    lines = storage.JsonLines(run, first)
    for s in steps:
      lines.write({"step": s})
      # Already readable mid-session: the object holds every line so far.
      assert storage.read_metrics(run)[-1] == {"step": s}
    lines.close()
  assert [r["step"] for r in storage.read_metrics(run)] == [1, 2, 3, 4, 5]
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics-000000000.jsonl",
                                                                  "metrics-000000003.jsonl"]
  writes = [mode for path, mode in fake_gcs if "metrics" in path and mode != "r"]
  assert writes and "a" not in "".join(writes)  # object stores cannot append


@pytest.mark.parametrize("uptime_s", [5.0, 10 * 86400.0])  # a machine booted seconds or days ago
def test_remote_metrics_are_buffered_between_flushes(fake_gcs, tmp_path, monkeypatch, uptime_s):
  run = storage.run_path("gs://bucket/run")
  run.mkdir(parents=True, exist_ok=True)
  monkeypatch.setattr(storage, "REMOTE_FLUSH_S", 3600.0)
  monkeypatch.setattr(storage.time, "monotonic", lambda: uptime_s)  # the clock counts from boot
  lines = storage.JsonLines(run, 0)
  for s in range(1, 4):
    lines.write({"step": s})
  assert [r["step"] for r in storage.read_metrics(run)] == [1]  # the first line flushes, then an hour's wait
  lines.close()  # nothing is lost at the end of a session
  assert [r["step"] for r in storage.read_metrics(run)] == [1, 2, 3]


def test_remote_metrics_roll_over_to_a_new_part_when_one_is_full(fake_gcs, tmp_path, monkeypatch):
  run = storage.run_path("gs://bucket/run")
  run.mkdir(parents=True, exist_ok=True)
  monkeypatch.setattr(storage, "REMOTE_FLUSH_S", 0.0)
  line = len(json.dumps({"step": 10, "loss": 0.5}) + "\n")
  monkeypatch.setattr(storage, "REMOTE_PART_BYTES", 3 * line)  # three records a part
  lines = storage.JsonLines(run, 10)
  for s in range(10, 18):
    lines.write({"step": s, "loss": 0.5})
  lines.close()
  parts = sorted(p.name for p in (tmp_path / "run").iterdir())
  assert parts == ["metrics-000000010.jsonl", "metrics-000000013.jsonl", "metrics-000000016.jsonl"]
  assert [len((tmp_path / "run" / p).read_text().splitlines()) for p in parts] == [3, 3, 2]
  assert [r["step"] for r in storage.read_metrics(run)] == list(range(10, 18))
  # A part only grows until sealed, so its final size bounds every rewrite of it.
  assert max((tmp_path / "run" / p).stat().st_size for p in parts) <= 3 * line


def test_copy_tree_to_remote(fake_gcs, tmp_path):
  src = tmp_path / "local"
  src.mkdir()
  (src / "a.png").write_bytes(b"png")
  (src / "b.gif").write_bytes(b"gif")
  storage.copy_tree(str(src), epath.Path("gs://bucket/run/samples"))
  assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "samples").iterdir()} == {"a.png": b"png",
                                                                                        "b.gif": b"gif"}
  assert sorted((p, m) for p, m in fake_gcs if m.startswith("w")) == [
      ("gs://bucket/run/samples/a.png", "wb"), ("gs://bucket/run/samples/b.gif", "wb")]
