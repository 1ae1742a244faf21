"""launch/: every script's --dry-run prints the gcloud commands it would run; bad
arguments fail with a message; shellcheck finds nothing."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create.sh", "setup.sh", "train.sh", "logs.sh", "stop.sh", "delete.sh", "run.sh", "gpu_multinode.sh"]
TPU = ["--name", "dit-test", "--zone", "us-east5-a"]
CONFIG = "configs/smoke.yaml"


def launch(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The printed commands, as argument vectors."""
  return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def gcloud(result) -> list[list[str]]:
  return [c for c in commands(result) if c[0] == "gcloud"]


def remote(cmd: list[str]) -> str:
  """The shell command a `gcloud ... ssh --command=...` runs on the workers."""
  return next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = launch(script, "--help").stdout
  assert out.startswith("usage:") and "--dry-run" in out


def test_create_one_slice_is_a_tpu_vm():
  (cmd,) = gcloud(launch("create.sh", *TPU, "--type", "v6e-8", "--spot", "--dry-run"))
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert cmd[5] == "dit-test"
  assert {"--zone=us-east5-a", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"} <= set(cmd)


@pytest.mark.parametrize("tpu_type, accelerator, runtime", [
    ("v5p-256", "v5p-256", "v2-alpha-tpuv5"),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
])
def test_create_multislice_is_a_queued_resource(tpu_type, accelerator, runtime):
  create, describe = gcloud(launch("create.sh", *TPU, "--type", tpu_type, "--slices", "2", "--project", "p",
                                   "--dry-run"))
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", "--node-count=2",
          "--node-prefix=dit-test", "--zone=us-east5-a", "--project=p"} <= set(create)
  assert describe[4] == "describe"  # waits for ACTIVE


def test_setup_installs_on_every_worker():
  result = launch("setup.sh", *TPU, "--dry-run")
  scp, ssh = gcloud(result)
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
  assert "tar xzf" in remote(ssh) and "python3.11 -m venv" in remote(ssh)
  assert 'pip install -q -e ".[tpu,gcs]"' in remote(ssh)


def test_setup_clones_a_repository_on_every_slice():
  (ssh,) = gcloud(launch("setup.sh", *TPU, "--slices", "2", "--repo", "https://example.org/dit.git",
                         "--branch", "main", "--dry-run"))
  assert ssh[3:5] == ["queued-resources", "ssh"] and {"--node=all", "--worker=all"} <= set(ssh)
  assert "git clone --depth 1 --branch main https://example.org/dit.git ~/spacetime-dit" in remote(ssh)


def test_train_starts_the_same_command_everywhere_and_follows_the_log():
  result = launch("train.sh", *TPU, "--config", CONFIG, "--dry-run", "workdir=gs://bucket/run", "--",
                  "train.steps=10")
  start, follow = gcloud(result)
  assert "--worker=all" in start
  words = shlex.split(remote(start).split("&&")[-1])
  i = words.index("python")
  assert words[i:i + 5] == ["python", "-m", "src.train", "--config", CONFIG]
  assert {"workdir=gs://bucket/run", "train.steps=10", "mesh.distributed=true"} <= set(words)
  assert not any(w.startswith("mesh.data=") for w in words)
  assert "--worker=0" in follow and "tail -n +1 -F ~/dit-train.log" == remote(follow)


def test_train_over_slices_splits_the_data_axis():
  (start,) = gcloud(launch("train.sh", *TPU, "--slices", "4", "--config", CONFIG, "--no-follow", "--dry-run"))
  assert {"--node=all", "--worker=all"} <= set(start)
  assert "mesh.data=4 mesh.distributed=true" in remote(start)
  (start,) = gcloud(launch("train.sh", *TPU, "--slices", "4", "--config", CONFIG, "--no-follow", "--dry-run",
                           "mesh.data=8"))
  assert "mesh.data=8 mesh.distributed=true" in remote(start)


def test_delete_stops_with_sigterm_first():
  stop, delete = gcloud(launch("delete.sh", *TPU, "--dry-run"))
  assert "--worker=all" in stop and "kill -TERM" in remote(stop)
  assert delete[3:5] == ["tpu-vm", "delete"] and "dit-test" in delete
  (delete,) = gcloud(launch("delete.sh", *TPU, "--slices", "2", "--no-stop", "--dry-run"))
  assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


def test_run_does_everything_in_order():
  result = launch("run.sh", *TPU, "--type", "v5p-128", "--config", CONFIG, "--dry-run", "train.steps=5")
  verbs = [" ".join(c[3:5]) for c in gcloud(result)]
  assert verbs == ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh",
                   "tpu-vm delete"]
  setup, train, logs, stop = [remote(c) for c in gcloud(result)[2:6]]
  assert "pip install" in setup and "src.train --config configs/smoke.yaml train.steps=5" in train
  assert "tail" in logs and "kill -TERM" in stop


def test_gpu_multinode_passes_the_cluster_through_the_config():
  env = dict(COORDINATOR_ADDRESS="10.0.0.1:12355", NUM_PROCESSES="4", PROCESS_ID="3")
  (cmd,) = commands(launch("gpu_multinode.sh", "--config", CONFIG, "--dry-run", "train.steps=3", env=env))
  assert cmd[1:5] == ["-m", "src.train", "--config", CONFIG]
  assert cmd[5:] == ["train.steps=3", "mesh.distributed=true", "mesh.coordinator_address=10.0.0.1:12355",
                     "mesh.num_processes=4", "mesh.process_id=3"]


def test_slurm_gives_each_task_its_rank(tmp_path):
  # Stand-ins for SLURM's tools: two nodes, and srun running its command as each rank.
  (tmp_path / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
  (tmp_path / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\n'
                                 'for r in 0 1; do SLURM_PROCID=$r "$@"; done\n')
  for tool in ("scontrol", "srun"):
    (tmp_path / tool).chmod(0o755)
  env = dict(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="2",
             SLURM_SUBMIT_DIR=str(ROOT))
  result = launch("gpu_slurm.sbatch", CONFIG, "train.steps=3", "--dry-run", env=env)
  ranks = [c[-1] for c in commands(result)]
  assert ranks == ["mesh.process_id=0", "mesh.process_id=1"]
  assert all("mesh.coordinator_address=node-a:12355" in c and "mesh.num_processes=2" in c
             for c in commands(result))


@pytest.mark.parametrize("script, args, message", [
    ("create.sh", ["--zone", "z", "--type", "v5p-8"], "--name is required"),
    ("create.sh", ["--name", "a", "--type", "v5p-8"], "--zone is required"),
    ("create.sh", ["--name", "a", "--zone", "z"], "--type is required"),
    ("create.sh", ["--name", "a", "--zone", "z", "--type", "v9-8"], "--type 'v9-8'"),
    ("create.sh", [*TPU, "--type", "v5p-8", "--slices", "two"], "--slices must be a positive integer"),
    ("create.sh", ["--name", "Bad_Name", "--zone", "z", "--type", "v5p-8"], "--name 'Bad_Name'"),
    ("train.sh", TPU, "--config is required"),
    ("train.sh", [*TPU, "--config", "configs/nope.yaml"], "not found"),
    ("train.sh", [*TPU, "--config", CONFIG, "--frobnicate"], "unknown option '--frobnicate'"),
    ("train.sh", [*TPU, "--config", CONFIG, "stray"], "unexpected argument 'stray'"),
    ("logs.sh", [*TPU, "--worker", "x"], "--worker must be"),
    ("run.sh", [*TPU, "--type", "v6e-8"], "--config is required"),
    ("gpu_multinode.sh", ["--config", CONFIG], "COORDINATOR_ADDRESS"),
])
def test_bad_arguments_fail_with_a_message(script, args, message):
  result = launch(script, *args, "--dry-run", check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not gcloud(result), "nothing may be created after a bad argument"


def test_gpu_multinode_checks_the_rank():
  env = dict(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES="2", PROCESS_ID="2")
  result = launch("gpu_multinode.sh", "--config", CONFIG, "--dry-run", env=env, check=False)
  assert result.returncode != 0 and "PROCESS_ID=2 must be below NUM_PROCESSES=2" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
  files = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
  result = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
