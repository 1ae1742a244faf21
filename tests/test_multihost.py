"""Multi-host training on one machine: 2 processes x 2 CPU devices == 1 process x 4.

Each process is a real `python -m src.train` that joins the other through
jax.distributed (mesh.distributed=true with an explicit coordinator, as on a GPU
cluster); cross-process collectives on CPU go through gloo, jax's default. Both write
checkpoints to the same workdir (every process its own shards and data-iterator
state), and a second 2-process run resumes from them.

The data pipeline gives each host its own slice of the dataset, so a 1-process run
would see other examples. The reference process therefore reads both hosts' slices
and concatenates them into the same global batch: rows of process 0 first, as the
mesh over (process 0's devices, process 1's devices) lays them out.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.variant=tiny", "data.frames=2", "data.height=8", "data.width=8", "data.channels=4",
    "model.in_channels=4", "data.batch_size=8", "train.tensorboard=false", "train.log_every=1",
    "optim.warmup_steps=2", "optim.lr=1e-3",
]
FIRST_STEPS, TOTAL_STEPS = 3, 5
TIMEOUT = 900  # seconds per run: the machine is small and shared

# The reference: one process that reads what hosts 0 and 1 of 2 would read.
AS_TWO_HOSTS = """
import json, sys
import jax
import numpy as np
from src import train
from src.tasks import DiTTask

host_batches = DiTTask.batches

class TwoHosts:
  def __init__(self, task, split):
    self.hosts = [host_batches(task, split, i, 2) for i in range(2)]
  def __iter__(self):
    return self
  def __next__(self):
    parts = [next(h) for h in self.hosts]
    return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)
  def skip_counts(self):
    return {}
  def get_state(self):
    return json.dumps([h.get_state() for h in self.hosts]).encode()
  def set_state(self, state):
    for h, s in zip(self.hosts, json.loads(state)):
      h.set_state(s)
  def start_prefetch(self):
    pass

DiTTask.batches = lambda task, split="train", process_index=0, process_count=1: TwoHosts(task, split)
sys.exit(train.main(sys.argv[1:]))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return e


def start(argv: list[str], devices: int, log: Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env(devices), stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
  try:
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    assert code == 0, f"{log.name} exited {code}:\n" + "\n".join(log.read_text().splitlines()[-30:])


def two_processes(workdir: Path, tag: str, *overrides: str) -> list[Path]:
  port = free_port()
  logs = [workdir.parent / f"{tag}-process{i}.log" for i in range(2)]
  procs = [
      start(["-m", "src.train", *TINY, f"workdir={workdir}", *overrides, "mesh.distributed=true",
             f"mesh.coordinator_address=localhost:{port}", "mesh.num_processes=2", f"mesh.process_id={i}"],
            devices=2, log=logs[i])
      for i in range(2)
  ]
  finish(procs, logs)
  return logs


def losses(workdir: Path) -> dict[int, float]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r and not any(k.startswith("val/") for k in r)}


def test_two_processes_match_one_and_resume(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  reference = start(["-c", AS_TWO_HOSTS, *TINY, f"workdir={single}", f"train.steps={TOTAL_STEPS}"],
                    devices=4, log=tmp_path / "single.log")
  # The first run stops early (as a time-sliced job would): same schedule, fewer steps.
  two_processes(multi, "first", f"train.steps={TOTAL_STEPS}", f"train.run_steps={FIRST_STEPS}")
  # Both processes wrote one checkpoint together: their shards and their data positions.
  step_dir = multi / "checkpoints" / str(FIRST_STEPS)
  assert (step_dir / "data" / "process_0-of-2.json").is_file()
  assert (step_dir / "data" / "process_1-of-2.json").is_file()
  logs = two_processes(multi, "resumed", f"train.steps={TOTAL_STEPS}")
  assert f"restored step {FIRST_STEPS}" in logs[0].read_text()
  finish([reference], [tmp_path / "single.log"])

  got, want = losses(multi), losses(single)
  assert sorted(got) == sorted(want) == list(range(1, TOTAL_STEPS + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}: 2 processes {got[step]}, 1 process {want[step]}"


SIGTERM_STEPS = ["train.steps=10", "train.ckpt_every=100", "train.async_checkpoint=false"]
# Trials per case: 1 in the suite; PREEMPTION_TRIALS=5 for the 5-of-5 (docs/reliability.md).
TRIALS = int(os.environ.get("PREEMPTION_TRIALS", "1"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted 2-process run the preempted ones must end equal to."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  two_processes(workdir, "straight", *SIGTERM_STEPS)
  return losses(workdir)


@pytest.mark.parametrize("signalled", [[1], [0, 1]], ids=["one host", "both hosts"])
def test_sigterm_stops_both_hosts_at_one_step_and_resumes_exactly(tmp_path, straight, signalled):
  """A TPU preemption signals hosts at different moments: here process 1 alone, or both,
  each at its own random moment after step 2. Both must agree on the step, save one
  checkpoint together and exit 0; the resumed run logs exactly the losses of an
  uninterrupted one. TRIALS times, each with fresh random moments."""
  import random
  import signal
  import time

  rng = random.Random()
  for trial in range(TRIALS):
    run = tmp_path / f"trial{trial}"
    port = free_port()
    logs = [tmp_path / f"trial{trial}-signalled-process{i}.log" for i in range(2)]
    procs = [start(["-m", "src.train", *TINY, f"workdir={run}", *SIGTERM_STEPS, "mesh.distributed=true",
                    f"mesh.coordinator_address=localhost:{port}", "mesh.num_processes=2", f"mesh.process_id={i}"],
                   devices=2, log=logs[i]) for i in range(2)]
    deadline = time.time() + TIMEOUT
    while "train step 2/" not in logs[0].read_text() and time.time() < deadline and procs[0].poll() is None:
      time.sleep(0.2)
    t0 = time.time()
    for at, i in sorted((rng.uniform(0.0, 1.0), i) for i in signalled):
      time.sleep(max(0.0, t0 + at - time.time()))
      procs[i].send_signal(signal.SIGTERM)
    finish(procs, logs)
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] < 10, (trial, saved)  # one common checkpoint, before the end
    assert (run / "checkpoints" / str(saved[0]) / "data" / "process_1-of-2.json").is_file()
    two_processes(run, f"trial{trial}-resumed", *SIGTERM_STEPS)
    assert losses(run) == straight, f"trial {trial}"
