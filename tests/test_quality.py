"""The sample-quality measure on the synthetic data (`src.quality`): it passes real held-out
clips, fails noise, clips judged against another clip's request, and the samples of a
model trained for a few steps."""

import json
from pathlib import Path

import numpy as np
import pytest

from src import config as C
from src.data.sources import clip_source
from src.quality import Ask, judge, pass_fraction

ROOT = Path(__file__).resolve().parents[1]


def held_out(n=120, overrides=()):
  cfg = C.load(ROOT / "configs" / "smoke.yaml", list(overrides))
  source = clip_source(cfg.data, cfg.seed, 2, "validation")
  examples = [source[i] for i in range(n)]
  return [e["video"] for e in examples], [Ask.of(e["label"], e["caption"]) for e in examples]


def test_the_readme_sampling_examples_ask_for_one_thing():
  """Each README sampling example's class label and caption name the same shape and colour."""
  import re
  import shlex

  readme = (ROOT / "README.md").read_text()
  pairs = []
  for line in readme.splitlines():
    if line.startswith("python -m src.sample --workdir runs/smoke") and "--label" in line:
      words = shlex.split(line)
      pairs.append((int(words[words.index("--label") + 1]), words[words.index("--prompt") + 1]))
  pairs += [(int(label), caption) for label, caption in re.findall(r'Spec\(\([^)]*\), (\d+), "([^"]+)"\)', readme)]
  assert len(pairs) >= 3, pairs
  for label, caption in pairs:
    from_caption, from_label = Ask.of(-1, caption), Ask.of(label, None)
    assert from_caption and (from_caption.kind, from_caption.colour) == (from_label.kind, from_label.colour), caption


def test_asks_come_from_captions_or_labels():
  assert Ask.of(-1, "two green diamonds moving up") == Ask("diamond", "green", "up")
  assert Ask.of(1, None) == Ask("disc", "red") and Ask.of(-1, None) is None
  assert Ask.of(4, "not a synthetic caption") == Ask("disc", "green")  # falls back to the label


def test_real_clips_pass_and_noise_or_the_wrong_request_fails():
  videos, asks = held_out()
  assert pass_fraction(videos, asks) >= 0.85
  rng = np.random.default_rng(0)
  assert pass_fraction([rng.uniform(-1, 1, v.shape) for v in videos], asks) <= 0.02
  assert pass_fraction(videos, asks[1:] + asks[:1]) <= 0.2  # another clip's shape, colour or direction
  assert pass_fraction([np.full_like(v, -1.0) for v in videos], asks) == 0.0  # nothing drawn


def test_each_check_catches_its_own_error():
  videos, asks = held_out(40, ["data.frame_counts=[4]", "data.image_fraction=0"])
  i = next(i for i, (v, a) in enumerate(zip(videos, asks)) if judge(v, a)["passed"])
  video, ask = videos[i], asks[i]
  other_colour = next(c for c in ("red", "green", "blue") if c != ask.colour)
  assert not judge(video, Ask(ask.kind, other_colour, ask.direction))["passed"]
  assert not judge(video[::-1], ask)["passed"]  # played backwards: the motion is the opposite
  assert judge(video, Ask(ask.kind, ask.colour, None))["passed"]


@pytest.mark.slow
def test_a_model_trained_for_a_few_steps_fails(tmp_path):
  from src.generate import Spec, generate
  from src.runs import load_run
  from src.train import train

  train(C.load(ROOT / "configs" / "smoke.yaml", [
      f"workdir={tmp_path}", "model.depth=2", "model.width=64", "train.steps=3", "train.log_every=3",
      "train.eval_every=0", "train.sample_every=3", "train.sample_count=4", "train.sample_steps=8",
      "train.tensorboard=false", "train.async_checkpoint=false"]))
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  passes = [r["val/sample_pass"] for r in logged if "val/sample_pass" in r]
  assert len(passes) == 1 and passes[0] <= 0.25, passes  # logged with the samples
  cfg, graphdef, params = load_run(tmp_path)
  videos, asks = held_out(8, ["data.frame_counts=[4]", "data.image_fraction=0"])
  specs = [Spec(v.shape[:3], a_label, caption) for v, (a_label, caption) in zip(
      videos, [(-1, f"a {a.colour} {a.kind} moving {a.direction}") for a in asks])]
  samples = generate(graphdef, params, cfg, specs, steps=8, guidance=4.0)
  assert pass_fraction(samples, asks) <= 0.15


def test_the_direction_probe_is_exactly_one_only_for_a_model_that_cannot_read_captions():
  """benchmarks/sample_quality.py's direction_loss_ratio: at init the cross-attention's
  output is zero, so reversing every caption's direction changes nothing; with random
  weights everywhere the model reads the words and the ratio moves off 1."""
  import jax

  from benchmarks.sample_quality import direction_loss_ratio
  from src import mesh as M
  from src.state import create_model
  from src.tasks import make_task

  cfg = C.load(ROOT / "configs" / "smoke.yaml", ["model.depth=1", "model.width=32", "model.heads=2"])
  task = make_task(cfg)
  graphdef, params = create_model(task, M.make_mesh(cfg.mesh, jax.devices()[:1]), M.make_rules(), cfg.seed)
  source = clip_source(cfg.data, cfg.seed, 2, "validation")
  examples = [source[i] for i in range(40)]
  assert direction_loss_ratio(cfg, task, graphdef, params, examples, seeds=1) == 1.0
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  noisy = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  ratio = direction_loss_ratio(cfg, task, graphdef, noisy, examples, seeds=1)
  assert np.isfinite(ratio) and abs(ratio - 1.0) > 1e-4, ratio
