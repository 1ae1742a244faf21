"""Run directories: one trainer at a time, resumed only with the same run's config,
usable before anything is compiled, metrics without duplicates after a resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from src import config as C
from src import storage
from src.train import main
from src.workdir import LOCK, WorkdirError, WorkdirLock, check_writable

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.variant=tiny", "data.frames=2", "data.height=8", "data.width=8", "data.batch_size=8",
        "train.tensorboard=false", "train.log_every=2", "train.ckpt_every=4", "train.steps=4", "optim.warmup_steps=1"]


def _lock(workdir, pid):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))


def test_a_second_trainer_is_refused(tmp_path):
  _lock(tmp_path, os.getpid())  # a live trainer on this host (this test process)
  r = subprocess.run([sys.executable, "-m", "src.train", *TINY, f"workdir={tmp_path}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert f"in use by another trainer ({socket.gethostname()}, pid {os.getpid()})" in r.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock(tmp_path, dead.pid)
  with WorkdirLock(tmp_path) as lock:
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid() and lock.held
    with pytest.raises(WorkdirError, match="in use by another trainer"):
      WorkdirLock(tmp_path).__enter__()
  assert not (tmp_path / LOCK).exists()


def test_resume_refuses_another_run_and_allows_a_new_learning_rate(tmp_path, capsys):
  assert main(TINY + [f"workdir={tmp_path}"]) == 0
  saved = (tmp_path / "config.yaml").read_text()
  capsys.readouterr()
  assert main(TINY + [f"workdir={tmp_path}", "model.width=96", "objective.kind=diffusion", "seed=7"]) == 2
  err = capsys.readouterr().err
  for key in ("model.width: saved None, now 96", "objective.kind: saved 'flow', now 'diffusion'", "seed: saved 0"):
    assert key in err, err
  assert "a new workdir" in err and "model.init_from" in err and "Traceback" not in err, err
  assert "Event loop is closed" not in err and err.count("\n") < 20, err  # one message, not Orbax's flood
  assert (tmp_path / "config.yaml").read_text() == saved  # the rejected config is not written
  assert main(TINY + [f"workdir={tmp_path}", "optim.lr=3e-4", "train.steps=6"]) == 0
  err = capsys.readouterr().err  # main() logs to stderr
  assert "changed learning-rate schedule" in err and "optim.lr 0.0001 -> 0.0003" in err, err


@pytest.mark.parametrize("make", ["file", "proc"])
def test_an_unusable_workdir_is_one_line(tmp_path, capsys, make):
  workdir = tmp_path / "a_file" if make == "file" else Path("/proc/no_such_dir/run")
  if make == "file":
    workdir.write_text("x")
  assert main(TINY + [f"workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(workdir) in err, err


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
  import shutil

  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2 * 2**20))  # a 2 MB filesystem
  with pytest.raises(WorkdirError, match="2 MiB free, but two checkpoints of this run need about 4 MiB"):
    check_writable(tmp_path, state_bytes=2 * 2**20)
  check_writable(tmp_path, state_bytes=2**20)  # fits


def test_metrics_past_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)) + '{"step": 11, "lo')
  writer = storage.JsonLines(tmp_path, first_step=6)
  writer.write({"step": 7, "loss": 0.5})
  writer.close()
  assert [r["step"] for r in storage.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_the_smoke_config_still_loads():
  C.load(ROOT / "configs" / "smoke.yaml")
