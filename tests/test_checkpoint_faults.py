"""Corrupt checkpoints: the newest one that fails to load, or whose arrays do not match
their checksums, is reported, moved aside, and the previous one resumes the run."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from src import mesh as M
from src.checkpoint import checksums
from src.config import MeshConfig
from src.train import main

TINY = ["model.variant=tiny", "data.frames=2", "data.height=8", "data.width=8", "data.batch_size=8",
        "train.tensorboard=false", "train.log_every=2", "train.ckpt_every=2", "train.keep_checkpoints=3",
        "optim.warmup_steps=1", "train.async_checkpoint=false"]


def test_checksums_see_one_flipped_bit_and_ignore_the_mesh():
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  tree = {"w": jnp.asarray(x), "step": jnp.int32(5), "h": jnp.asarray(x, jnp.bfloat16)}
  flipped = x.copy()
  flipped.view(np.uint32)[3, 7] ^= 1  # the lowest mantissa bit of one value
  assert not np.array_equal(np.asarray(checksums(tree)), np.asarray(checksums({**tree, "w": jnp.asarray(flipped)})))
  mesh = M.make_mesh(MeshConfig(fsdp=8))
  sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.P()))
  sharded["w"] = jax.device_put(tree["w"], jax.sharding.NamedSharding(mesh, jax.P("fsdp")))
  np.testing.assert_array_equal(np.asarray(checksums(tree)), np.asarray(checksums(sharded)))


def _largest_file(directory: Path) -> Path:
  return max((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _truncate(step_dir: Path):
  f = _largest_file(step_dir / "state")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(step_dir: Path):
  f = _largest_file(step_dir / "state")
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated array file": _truncate,
    "metadata deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "iterator state garbled": lambda d: next((d / "data").glob("*.json")).write_text("{not json"),
    "state deleted": lambda d: shutil.rmtree(d / "state"),
    "a flipped bit": _flip,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  assert main(TINY + [f"workdir={workdir}", "train.steps=6"]) == 0
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path, name, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  CORRUPTIONS[name](workdir / "checkpoints" / "6")
  capsys.readouterr()
  assert main(TINY + [f"workdir={workdir}", "train.steps=8"]) == 0
  err = capsys.readouterr().err
  assert "checkpoint step 6" in err and "cannot be used" in err, err
  assert (workdir / "checkpoints.corrupt" / "6").is_dir()
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 8 and 6 in steps  # re-run from step 4: 6 and 8 are new
  logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged))  # no step twice


@pytest.mark.slow
def test_sampling_reads_the_newest_readable_checkpoint(trained, tmp_path, caplog):
  from src.runs import load_run

  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6" / "state")
  caplog.set_level("WARNING")
  _, _, params = load_run(workdir)
  assert "checkpoint step 6" in caplog.text and "cannot be read" in caplog.text
  assert jax.tree.leaves(params)
  assert (workdir / "checkpoints" / "6").is_dir()  # a reader moves nothing


# The real CLI, whose disk "fills up" once its first checkpoint is complete: the kernel's
# file-size limit (RLIMIT_FSIZE, inherited by every thread, tensorstore's too) makes every
# later write that grows a file past LIMIT bytes fail with EFBIG, as ENOSPC would. Python
# ignores SIGXFSZ, so the writes fail instead of killing the process; stderr is a pipe.
DISK_FILLS_UP = """
import resource, sys
from src import checkpoint, train
save, limit = checkpoint.Checkpointer.save, int(sys.argv[1])
def save_then_fill(self, step, *args, **kwargs):
  saved = save(self, step, *args, **kwargs)
  if self.in_flight == step and step == 2:
    self.manager.wait_until_finished()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return saved
checkpoint.Checkpointer.save = save_then_fill
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("limit,what", [(64 * 1024, "checkpoint step 4 could not be written"),
                                        (0, "an I/O error stopped the run")])
def test_a_write_error_mid_run_keeps_the_previous_checkpoint_in_one_line(trained, tmp_path, limit, what):
  """64 KiB: the metrics still fit, the next checkpoint's arrays do not (Orbax's asynchronous
  writer fails); 0: the metrics fail first. Either way: exit 1, one error line naming the
  newest complete checkpoint (step 2) and no traceback or background-writer flood; the
  step-2 checkpoint is untouched, and re-running the command resumes from it and ends
  exactly where the uninterrupted run ends."""
  import subprocess
  import sys

  workdir = tmp_path / "run"
  args = TINY + [f"workdir={workdir}", "train.steps=6", "train.async_checkpoint=true"]
  out = subprocess.run([sys.executable, "-c", DISK_FILLS_UP, str(limit), *args], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  ours = [line for line in out.stderr.splitlines() if not line.startswith(("E0000", "WARNING", "==="))
          and "libtpu" not in line and "TPU" not in line]
  errors = [line for line in ours if line.startswith("error") or " ERROR " in line or "Error:" in line]
  assert len(errors) == 1 and errors[0].startswith("error: " + what), "\n".join(ours)
  assert "the newest complete checkpoint is step 2" in errors[0]
  assert not any("Traceback" in line for line in ours), "\n".join(ours)
  complete = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert complete == [2]
  assert main(args) == 0  # the disk has room again
  resumed = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  reference = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
  assert resumed["step"] == reference["step"] == 6 and resumed["loss"] == reference["loss"]
