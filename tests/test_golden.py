"""A golden loss curve: the smoke config at its fixed seed, 50 steps on one CPU device,
compared with the losses stored in tests/assets/ (torchtitan keeps such curves).

Invariant tests prove properties; this catches what they miss: a changed default, a
reordered random draw, a schedule off by one, a loss reduced differently. The
tolerance is calibrated in docs/architecture.md ("Tests"): a different floating-point
reduction order (the same run on 2 devices) moved no step by more than 3e-7; the
regressions tried moved some step by 9-30%. To record a new curve on purpose, run
this test with UPDATE_GOLDEN=1 and commit the file with the reason.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "golden_smoke_losses.json"
STEPS = 50
COMMAND = ["--config", "configs/smoke.yaml", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
           "train.sample_every=0", "train.ckpt_every=1000", "train.tensorboard=false"]
STEP_RTOL = 1e-3  # relative, on every step: >3000x rounding effects, <1/50 of the smallest regression tried


def smoke_losses(workdir: Path) -> list[float]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "src.train", *COMMAND, f"workdir={workdir}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_smoke_loss_curve_matches_the_golden_one(tmp_path):
  losses = smoke_losses(tmp_path)
  assert len(losses) == STEPS
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"command": ["python", "-m", "src.train", *COMMAND], "device_count": 1,
                                  "losses": losses}, indent=1) + "\n")
  golden = np.asarray(json.loads(GOLDEN.read_text())["losses"])
  got = np.asarray(losses)
  rel = np.abs(got - golden) / np.abs(golden)
  assert rel.max() <= STEP_RTOL, f"step {int(rel.argmax()) + 1}: {got[rel.argmax()]} vs golden {golden[rel.argmax()]}"
