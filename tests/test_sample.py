"""Sampling from a trained run: the CLI, packed generation, and samples that look like data."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src.data.sources import make_source, value_histogram
from src.models.dit import DiT
from src.generate import Spec, generate, pack_specs
from src.quality import Ask, judge, pass_fraction
from src.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


def test_sampling_a_run_without_checkpoint_is_a_clear_error(tmp_path):
  for workdir in (tmp_path / "missing", tmp_path):
    r = subprocess.run([sys.executable, "-m", "src.sample", "--workdir", str(workdir), "--out", str(tmp_path / "x.gif")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no checkpoints" in r.stderr.replace("no checkpoint ", "no checkpoints "), r.stderr
    assert "Traceback" not in r.stderr
  assert not (tmp_path / "missing").exists()  # nothing created by a failed look-up


def test_load_run_reads_only_the_weights_asked_for(tmp_path, monkeypatch):
  from src import mesh as mesh_lib
  from src import optim
  from src.checkpoint import Checkpointer
  from src.state import init_state
  from src.tasks import make_task

  cfg = C.load(None, ["model.variant=tiny", "model.num_classes=5", "data.channels=4"])
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.optim, cfg.train.steps)
  _, state = init_state(make_task(cfg), mesh, mesh_lib.make_rules(), optimizer, cfg.seed)
  state = state.replace(ema=jax.tree.map(lambda x: x + 1.0, state.params))  # EMA != raw weights
  ckpt = Checkpointer(tmp_path)
  ckpt.save(7, state, None, C.to_dict(cfg), force=True)
  ckpt.close()

  monkeypatch.setattr("src.state.init_state", None)  # sampling must not build a train state
  monkeypatch.setattr("src.state.create_model", None)
  for use_ema, want in ((True, state.ema), (False, state.params)):
    _, graphdef, params = load_run(tmp_path, use_ema=use_ema)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert isinstance(nnx.merge(graphdef, params), DiT)


def test_one_call_generates_several_sizes():
  cfg = C.load(None, ["model.variant=tiny", "model.num_classes=5", "model.cond_dim=8", "data.channels=4"])
  graphdef, params = nnx.split(DiT(cfg.model, rngs=nnx.Rngs(0)))
  specs = [Spec((2, 8, 6), 1, "a red disc"), Spec((1, 4, 8), -1, None), Spec((3, 4, 4), 2, "two blue squares")]
  batch, drop, order = pack_specs(cfg, specs)
  assert batch.tokens.shape[1] == max(2 * 4 * 3, 1 * 2 * 4, 3 * 2 * 2)
  assert drop.sum() == 1  # only the spec with neither label nor caption is unconditional
  videos = generate(graphdef, params, cfg, specs, steps=3, guidance=2.0)
  assert [v.shape for v in videos] == [(2, 8, 6, 4), (1, 4, 8, 4), (3, 4, 4, 4)]
  assert all(np.all(np.isfinite(v)) for v in videos)


@pytest.mark.slow
def test_samples_resemble_the_data_after_a_smoke_run(tmp_path):
  from src.train import train

  cfg = C.load(ROOT / "configs" / "smoke.yaml", [
      f"workdir={tmp_path}", "train.steps=240", "train.log_every=60", "train.ckpt_every=1000",
      "train.tensorboard=false", "train.sample_every=240", "train.sample_count=2", "train.sample_steps=10",
      "train.eval_every=120", "train.eval_batches=1", "optim.ema_decay=0.95",
  ])
  train(cfg)
  assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_0000240-ema.png"]
  metrics = (tmp_path / "metrics.jsonl").read_text()
  assert '"val/loss_t0.5"' in metrics

  cfg, graphdef, params = load_run(tmp_path)
  source = make_source(cfg.data, cfg.seed, spatial_multiple=2, split="validation")
  real = [source[i] for i in range(16)]
  specs = [Spec(tuple(ex["video"].shape[:3]), ex["label"], ex["caption"]) for ex in real]
  samples = generate(graphdef, params, cfg, specs, steps=25, guidance=3.0, seed=1)
  noise = [np.random.default_rng(i).standard_normal(v.shape) for i, v in enumerate(samples)]
  data_hist = value_histogram([ex["video"] for ex in real])
  d_samples = np.abs(value_histogram(samples) - data_hist).sum()
  d_noise = np.abs(value_histogram(noise) - data_hist).sum()
  assert d_samples < 0.5 * d_noise, (d_samples, d_noise)
  # What each sample was asked for (src.quality): the asked colour and shape, and motion where it can be seen.
  asks = [Ask.of(ex["label"], ex["caption"]) for ex in real]
  passed, judged = pass_fraction(samples, asks), [judge(v, a) for v, a in zip(samples, asks)]
  colour = np.mean([j["colour_error"] < 0.45 for j in judged])
  print(f"sample_pass {passed:.2f}, colour {colour:.2f}; noise {pass_fraction(noise, asks):.2f}")
  assert passed >= 0.25 and colour >= 0.75 and pass_fraction(noise, asks) == 0.0, (passed, colour)

  out = tmp_path / "cli" / "s.gif"
  r = subprocess.run([sys.executable, "-m", "src.sample", "--workdir", str(tmp_path), "--label", "1", "--prompt",
                      "a red disc moving left", "--num", "2", "--steps", "4", "--out", str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (out.parent / "s-0.gif").is_file() and (out.parent / "s-1.gif").is_file() and (out.parent / "s.grid.png").is_file()
