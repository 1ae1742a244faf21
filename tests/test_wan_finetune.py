"""Fine-tuning an imported Wan transformer: model.init_from on a fresh run, the loss
goes down, the resume is exact and never reads init_from again, and the export loads
in diffusers with the fine-tuned outputs."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import convert, wan
from src.runs import load_run
from src.train import train

pytestmark = pytest.mark.slow

# The tiny_wan fixture's sizes (tests/conftest.py TINY_WAN), as our config.
WAN_TINY = [
    "model.depth=2", "model.width=48", "model.heads=4", "model.mlp_dim=48", "model.freq_dim=32",
    "model.cond_dim=24", "model.in_channels=4", "model.patch=[1,2,2]", "data.frames=2", "data.height=8",
    "data.width=8", "data.channels=4", "data.batch_size=8", "data.text_len=5", "objective.timestep_sampling=uniform",
    "objective.shift=3.0", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.ema_decay=0.5", "train.log_every=2",
    "train.tensorboard=false",
]
STEPS = 16


def _cfg(workdir, init_from, *extra):
  return C.load(None, WAN_TINY + [f"workdir={workdir}", f"model.init_from={init_from}", f"train.steps={STEPS}",
                                  f"train.ckpt_every={STEPS}", *extra])


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_resume_and_export(tiny_wan, tmp_path):
  import torch
  from diffusers import WanTransformer3DModel

  root, torch_model = tiny_wan
  train(_cfg(tmp_path / "a", root))
  losses = _losses(tmp_path / "a")
  assert np.mean(losses[-2:]) < 0.8 * losses[0], losses

  # The same run in two invocations; the second cannot read init_from (it is gone).
  train(_cfg(tmp_path / "b", root, f"train.run_steps={STEPS // 2}"))
  train(_cfg(tmp_path / "b", tmp_path / "deleted"))
  assert _losses(tmp_path / "b") == losses
  _, _, a = load_run(tmp_path / "a", use_ema=False)
  _, _, b = load_run(tmp_path / "b", use_ema=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # A fresh run with a missing init_from says so.
  with pytest.raises(FileNotFoundError, match="neither a diffusers Wan transformer"):
    train(_cfg(tmp_path / "c", tmp_path / "deleted"))

  convert.main(["export", "--workdir", str(tmp_path / "a"), "--dst", str(tmp_path / "export")])
  cfg, graphdef, params = load_run(tmp_path / "a", use_ema=False)
  ours = nnx.merge(graphdef, params)
  exported = WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
  rng = np.random.default_rng(3)
  latents = rng.normal(size=(2, 4, 2, 8, 8)).astype(np.float32)
  timestep = np.array([100.0, 800.0], np.float32)
  text = rng.normal(size=(2, 5, 24)).astype(np.float32)
  with torch.no_grad():
    args = (torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text))
    theirs = exported(*args, return_dict=False)[0].numpy()
    before = torch_model(*args, return_dict=False)[0].numpy()
  mine = np.asarray(wan.wan_forward(ours, latents, timestep, text))
  np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
  assert np.abs(mine - before).max() > 1e-2  # the export carries the fine-tune, not the original weights
