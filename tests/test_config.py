"""Config: defaults, YAML + dotted overrides, and the errors a user sees."""

import subprocess
import sys
from pathlib import Path

import pytest

from src import config as C
from src.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


def test_required_keys_exist_with_their_names():
  keys = set(C.valid_keys())
  for key in ("workdir", "seed", "train.steps", "objective.kind", "mesh.data", "mesh.fsdp",
              "mesh.sequence", "mesh.tensor"):
    assert key in keys


def test_yaml_then_overrides(tmp_path):
  f = tmp_path / "c.yaml"
  f.write_text("train:\n  steps: 7\nmodel:\n  variant: tiny\n")
  cfg = C.load(f, ["train.steps=9", "objective.kind=diffusion", "model.patch=[1,1,1]"])
  assert cfg.train.steps == 9 and cfg.model.variant == "tiny"
  assert cfg.objective.kind == "diffusion" and cfg.model.patch == (1, 1, 1)
  assert cfg.optim.lr == C.OptimConfig().lr  # untouched keys keep the schema default


def test_every_preset_loads():
  for f in sorted((ROOT / "configs").glob("*.yaml")):
    cfg = C.load(f)
    if cfg.model.text_encoder == "umt5" and not cfg.text.checkpoint:  # the Wan presets: the user names the weights
      with pytest.raises(C.ConfigError, match="needs text.checkpoint"):
        make_task(cfg)
    elif not cfg.text.checkpoint:  # a preset naming weights is checked where a test makes them (test_captions)
      make_task(cfg)  # and passes its task's checks


@pytest.mark.parametrize("override, words", [
    (["train.stesp=3"], ["train.stesp", "train.steps"]),
    (["objectiv.kind=flow"], ["objectiv", "objective"]),
    (["train.steps=lots"], ["train.steps", "wrong type"]),
    (["mesh.data=1.5"], ["mesh.data", "wrong type"]),
    (["objective.kind=score"], ["objective.kind", "flow"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["-1"]),
    (["model.patch=[1,3,3]"], ["patch"]),
])
def test_bad_config_names_the_key(override, words):
  with pytest.raises(C.ConfigError) as e:
    make_task(C.load(None, override))  # the task adds the checks that depend on what is trained
  for w in words:
    assert w in str(e.value)


def test_bad_yaml_key_names_the_key(tmp_path):
  f = tmp_path / "c.yaml"
  f.write_text("optim:\n  learning_rate: 0.1\n")
  with pytest.raises(C.ConfigError, match="optim.learning_rate"):
    C.load(f)


@pytest.mark.parametrize("override, words", [
    ("train.stepz=5", ["train.stepz", "Did you mean 'train.steps'"]),
    ("train.steps=abc", ["train.steps"]),
])
def test_cli_exits_nonzero_and_names_the_key(override, words):
  r = subprocess.run([sys.executable, "-m", "src.train", "--config", "configs/smoke.yaml", override],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  for w in words:
    assert w in r.stderr


def test_round_trip_through_dict():
  cfg = C.load(None, ["model.patch=[1,2,2]", "mesh.rules={embed: null}"])
  assert C.from_dict(C.to_dict(cfg)) == cfg
