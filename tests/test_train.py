"""The training loop: first step, 8 devices == 1 device, exact resume, learning."""

import io
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import mesh as M
from src import optim
from src.data.pipeline import make_iterator
from src.state import abstract_state, compile_step, init_state
from src.tasks import make_task
from src.train import train

TINY = [
    "model.variant=tiny", "model.num_classes=10", "model.cond_dim=16", "model.patch=[1,2,2]",
    "data.frames=2", "data.height=8", "data.width=8", "data.channels=4", "data.batch_size=8",
    "data.text_len=4", "optim.warmup_steps=5", "optim.lr=2e-3", "train.log_every=5",
    "train.tensorboard=false",
]


def tiny(tmp_path, *overrides):
  return C.load(None, TINY + [f"workdir={tmp_path}", *overrides])


def compiled(cfg, mesh):
  """(task, rules, graphdef, fresh state, the compiled step) of `cfg` on `mesh`."""
  rules, task = M.make_rules(cfg.mesh.rules), make_task(cfg)
  optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  graphdef, state = init_state(task, mesh, rules, optimizer, cfg.seed)
  return task, rules, graphdef, state, compile_step(task, mesh, rules, graphdef, state, optimizer, schedule)


def one_step(cfg, mesh):
  """(loss, params before, params after) of one train step on `mesh`."""
  task, rules, graphdef, state, step = compiled(cfg, mesh)
  before = jax.tree.map(np.asarray, state.params)
  batch = next(task.batches())
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    state, metrics = step(state, M.place_batch(mesh, batch, rules), None)
  return float(metrics["loss"]), graphdef, before, state.params, batch


def test_first_step_moves_the_zero_output(tmp_path):
  cfg = tiny(tmp_path)
  mesh = M.make_mesh(cfg.mesh, jax.devices()[:1])
  loss, graphdef, before, after, batch = one_step(cfg, mesh)
  assert np.isfinite(loss)
  t = np.full(batch.packing.grid.shape[:2], 500.0, np.float32)
  out0 = nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, before))(batch.tokens, t, batch.packing)
  out1 = nnx.merge(graphdef, after)(batch.tokens, t, batch.packing)
  assert not np.any(np.asarray(out0))
  assert float(np.abs(np.asarray(out1)).max()) > 0


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_eight_devices_match_one_device(tmp_path, kind):
  cfg = tiny(tmp_path, f"objective.kind={kind}", "model.width=128")
  single = one_step(cfg, M.make_mesh(C.MeshConfig(fsdp=1), jax.devices()[:1]))
  cfg8 = tiny(tmp_path, f"objective.kind={kind}", "model.width=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  sharded = one_step(cfg8, M.make_mesh(cfg8.mesh))
  assert abs(single[0] - sharded[0]) <= 1e-5 * max(1.0, abs(single[0]))
  for a, b in zip(jax.tree.leaves(single[3]), jax.tree.leaves(sharded[3])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  kernel = sharded[3]["blocks"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")


def _final(workdir):
  from src.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step()
  data_state = sorted((workdir / "checkpoints" / str(step) / "data").glob("process_*.json"))
  ckpt.close()
  return step, [p.read_bytes() for p in data_state]


def test_resume_is_exact(tmp_path, monkeypatch):
  n = 6
  straight = tiny(tmp_path / "a", f"train.steps={2 * n}", f"train.ckpt_every={2 * n}")
  train(straight)
  # Same schedule (train.steps), but the first invocation stops halfway, as a
  # preempted or time-sliced job would.
  first = tiny(tmp_path / "b", f"train.steps={2 * n}", f"train.run_steps={n}", f"train.ckpt_every={2 * n}")
  train(first)
  assert (tmp_path / "b" / "config.yaml").is_file()
  assert _final(tmp_path / "b")[0] == n
  second = tiny(tmp_path / "b", f"train.steps={2 * n}", f"train.ckpt_every={2 * n}")
  with monkeypatch.context() as m:  # a resume restores into shapes: no state is initialised to be overwritten
    m.setattr("src.train.init_state", None)
    train(second)

  def params(workdir):
    cfg = tiny(workdir, f"train.steps={2 * n}")
    mesh = M.make_mesh(cfg.mesh)
    rules = M.make_rules()
    graphdef, like = abstract_state(make_task(cfg), mesh, rules, optim.make_optimizer(cfg.optim, cfg.train.steps)[0])
    from src.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir)
    state = ckpt.restore(like)
    cfg_saved = ckpt.restore_config()
    ckpt.close()
    return state, cfg_saved

  a, cfg_a = params(tmp_path / "a")
  b, cfg_b = params(tmp_path / "b")
  assert int(a.step) == int(b.step) == 2 * n
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.ema)), jax.tree.leaves((b.params, b.opt_state, b.ema))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _final(tmp_path / "a") == _final(tmp_path / "b")  # same data position
  assert cfg_a["train"]["steps"] == 2 * n and cfg_a["model"]["variant"] == "tiny"
  logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  straight_log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in logged] == [r["loss"] for r in straight_log]  # same batches, same order
  assert {"step", "loss", "grad_norm", "lr", "steps_per_s", "tokens_per_s"} <= set(logged[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", [("flow", []), ("diffusion", ["objective.prediction=eps"])])
def test_both_objectives_learn(tmp_path, kind, extra):
  cfg = tiny(tmp_path, f"objective.kind={kind}", "train.steps=150", "train.ckpt_every=1000",
             "train.log_every=10", "model.width=96", "model.heads=4", *extra)
  train(cfg)
  losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # At init the output is zero: the loss is E[target^2], the loss of predicting zero.
  # Predicting the per-position mean is no better than ~that for eps/v targets on
  # centred noise; the learned model must do far better.
  assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_mixed_shapes_compile_the_step_once(tmp_path):
  """A stream of clips and images of many sizes trains through one compiled program."""
  cfg = tiny(tmp_path, "data.area=48", "data.frame_counts=[1,2,3]", "data.image_fraction=0.3",
             "data.seq_len=160", "data.max_segments=6", "train.steps=8", "train.log_every=8",
             "train.ckpt_every=100", "objective.shift_base_tokens=16", "objective.loss_reduction=example")
  seen = set()
  it = make_iterator(cfg.data, cfg.model.patch, cfg.model.cond_dim, cfg.seed)
  for _ in range(8):
    batch = next(it)
    seen |= {tuple(g) for g in batch.packing.grid.reshape(-1, 3) if g.any()}
  assert len(seen) >= 5  # the stream really mixes shapes, images included
  assert any(g[0] == 1 for g in seen)
  metrics = train(cfg)  # the step is compiled once, from the config's shapes: see the test below
  assert np.isfinite(metrics["loss"]) and 0 < metrics["padding_fraction"] < 0.5


def test_the_step_compiles_from_the_config_and_refuses_other_shapes(tmp_path):
  """The step is compiled before any batch exists, from `task.batch_shapes()`; a batch of
  another shape is an error, never a silent recompile."""
  cfg = tiny(tmp_path)
  mesh = M.make_mesh(cfg.mesh, jax.devices()[:1])
  task, rules, _, state, step = compiled(cfg, mesh)
  batch = next(task.batches())
  assert jax.tree.map(lambda x: x.shape, batch) == jax.tree.map(lambda x: x.shape, task.batch_shapes())
  longer = next(make_task(tiny(tmp_path, "data.seq_len=40")).batches())  # rows of 40 tokens, not 32
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    with pytest.raises((TypeError, ValueError)):
      step(state, M.place_batch(mesh, longer, rules), None)
    state, metrics = step(state, M.place_batch(mesh, batch, rules), None)
  assert np.isfinite(float(metrics["loss"]))


def test_optimizer_moments_are_sharded_like_their_parameters(tmp_path):
  """Adam's moments must not be replicated: they are 2x the parameters' memory."""
  cfg = tiny(tmp_path, "model.width=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  mesh = M.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.optim, cfg.train.steps)
  _, state = init_state(make_task(cfg), mesh, M.make_rules(), optimizer, cfg.seed)
  param_specs = [p.sharding.spec for p in jax.tree.leaves(state.params)]
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
  assert len(moments) == 2 * len(param_specs)
  assert [m.sharding.spec for m in moments] == param_specs * 2
  assert any(spec != jax.P() for spec in param_specs)


def test_a_non_finite_step_changes_nothing_but_the_counts(tmp_path):
  """A batch that makes the loss NaN: parameters, optimizer state and EMA stay bitwise
  as they were, the step and the count of bad steps in a row move; a finite step then
  trains and resets the count."""
  cfg = tiny(tmp_path)
  mesh = M.make_mesh(cfg.mesh, jax.devices()[:1])
  task, rules, _, state, step = compiled(cfg, mesh)
  good = next(task.batches())
  poisoned = good.replace(tokens=np.where(np.arange(good.tokens.size).reshape(good.tokens.shape) == 7, np.nan,
                                          good.tokens).astype(np.float32))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    state, metrics = step(state, M.place_batch(mesh, poisoned, rules), None)
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["bad_steps"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state, state.ema))):
      np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == 1 and int(state.bad_steps) == 1
    state, metrics = step(state, M.place_batch(mesh, good, rules), None)
  assert int(state.bad_steps) == 0 and int(metrics["bad_steps"]) == 0
  assert any(np.any(a != np.asarray(b)) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state.params)))


def _all_checkpoints_finite(workdir) -> list[int]:
  from src.checkpoint import Checkpointer

  cfg = tiny(workdir)
  mesh = M.make_mesh(cfg.mesh)
  graphdef, like = abstract_state(make_task(cfg), mesh, M.make_rules(), optim.make_optimizer(cfg.optim, 100)[0])
  ckpt = Checkpointer(workdir)
  steps = sorted(ckpt.manager.all_steps())
  for s in steps:
    state = ckpt.restore(like, step=s)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((state.params, state.ema))), s
  ckpt.close()
  return steps


def test_a_bad_learning_rate_stops_the_run_and_keeps_checkpoints_finite(tmp_path, capsys):
  """A good run, resumed with optim.lr=1e8: its steps turn non-finite, max_bad_steps in a
  row stop it with exit status 1 and a message, and every checkpoint left is finite."""
  from src.train import main

  train(tiny(tmp_path, "train.steps=4", "train.ckpt_every=2"))
  overrides = [f"{k}={v}" for k, v in (("workdir", tmp_path), ("train.steps", 40), ("train.ckpt_every", 1),
                                        ("train.keep_checkpoints", 3), ("optim.lr", 1e8), ("train.max_bad_steps", 3),
                                        ("train.log_every", 1))]
  assert main(TINY + overrides) == 1
  assert "non-finite" in capsys.readouterr().err
  steps = _all_checkpoints_finite(tmp_path)
  assert len(steps) == 3 and max(steps) < 40  # it stopped early; what is on disk is finite


def test_a_restart_loads_the_step_from_the_compilation_cache(tmp_path):
  """With train.compile_cache, the second start of a run (a time-sliced job resuming)
  finds its step in the persistent cache and compiles nothing for it."""
  import subprocess
  import sys
  from pathlib import Path

  cache = tmp_path / "cache"
  argv = [sys.executable, "-m", "src.train", *TINY, f"workdir={tmp_path / 'run'}", "train.steps=4",
          "train.run_steps=2", "train.ckpt_every=2", f"train.compile_cache={cache}"]
  logs = []
  for _ in range(2):
    r = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    logs.append(next(line for line in r.stderr.splitlines() if "compiled the train step" in line))
  assert f"compilation cache {cache}: miss" in logs[0], logs
  assert f"compilation cache {cache}: hit, nothing compiled" in logs[1], logs
  assert re.search(r"train step 4/4 \(100%\)  [0-9.]+ steps/s  ETA 0s  ", r.stderr), r.stderr  # progress
  assert any(cache.iterdir())
  steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 4


def test_progress_shows_step_of_total_rate_and_eta():
  from src import hooks

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  assert hooks.Progress(0, 10).status(4, rate=2.0) == "4/10 (40%)  2 steps/s  ETA 3s"
  assert hooks.Progress(100, 9100).status(100, rate=2.0) == "100/9100 (1%)  2 steps/s  ETA 1h15m"
  assert [hooks.duration(s) for s in (59.4, 250, 3600)] == ["59s", "4m10s", "1h00m"]
  term = Terminal()
  bar = hooks.Progress(0, 10, term)
  bar.tick(5)
  assert term.getvalue().startswith("\r\033[K[############            ] 5/10 (50%)") and "ETA" in term.getvalue()
  bar.clear()
  assert term.getvalue().endswith("\r\033[K")
  piped = io.StringIO()
  hooks.Progress(0, 10, piped).tick(10)  # not a terminal: the log lines carry the progress, nothing is drawn
  assert piped.getvalue() == ""


def test_weights_and_biases_offline_logs_metrics_samples_and_continues_on_resume(tmp_path, monkeypatch):
  """train.wandb with wandb_mode=offline: the W&B run under {workdir}/wandb holds the
  metrics and the sample grid; a resumed run continues the same W&B run id."""
  pytest.importorskip("wandb")  # the project's `wandb` extra
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # nothing written outside the test's files
  wandb_keys = ["train.wandb=spacetime-test", "train.wandb_mode=offline", "train.sample_every=4",
                "train.sample_steps=2", "train.sample_count=2"]
  train(tiny(tmp_path, "train.steps=4", *wandb_keys))
  run_id = (tmp_path / "wandb_id").read_text().strip()
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 1
  events = (runs[0] / f"run-{run_id}.wandb").read_bytes()
  first_loss = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
  assert b"train/loss" in events and repr(first_loss)[:6].encode() in events  # the logged values
  assert list((runs[0] / "files" / "media" / "images").rglob("ema_*.png"))  # the sample grid
  train(tiny(tmp_path, "train.steps=6", *wandb_keys))  # resumed: the same W&B run, continued
  assert (tmp_path / "wandb_id").read_text().strip() == run_id
  assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_weights_and_biases_without_the_package_is_an_error_before_anything_starts(tmp_path, monkeypatch, capsys):
  import importlib.util

  from src.train import main

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  assert main([*TINY, f"workdir={tmp_path}", "train.wandb=proj"]) == 2
  assert "pip install -e '.[wandb]'" in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists()
