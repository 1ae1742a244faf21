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


def test_every_numeric_field_has_a_range():
  """A new numeric field cannot slip in unchecked: it needs an entry in RANGES."""
  import dataclasses
  import typing

  from src.config_checks import RANGES

  def numeric(node, prefix=""):
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
      default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
      if dataclasses.is_dataclass(default):
        yield from numeric(type(default), f"{prefix}{f.name}.")
      elif hints[f.name] in (int, float, typing.Optional[int], typing.Optional[float]):
        yield prefix + f.name

  mesh = {f"mesh.{k}" for k in ("data", "fsdp", "sequence", "tensor", "dcn_data", "dcn_fsdp", "num_processes",
                                "process_id")}  # -1 means "the rest" / "detect": checked apart
  assert set(numeric(C.Config)) - mesh == set(RANGES)
  C.load(None)


@pytest.mark.parametrize("override, key", [
    ("train.steps=-5", "train.steps"), ("data.batch_size=0", "data.batch_size"),
    ("data.max_segments=0", "data.max_segments"), ("train.ckpt_every=0", "train.ckpt_every"),
    ("train.log_every=0", "train.log_every"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("optim.clip_norm=0", "optim.clip_norm"), ("optim.clip_norm=-1", "optim.clip_norm"),
    ("optim.ema_decay=2.0", "optim.ema_decay"), ("model.depth=0", "model.depth"), ("optim.eps=0", "optim.eps"),
    ("mesh.dcn_fsdp=0", "mesh sizes"), ("train.eval_times=[0.5,1.5]", "train.eval_times"),
    ("data.synthetic.speed=[2,1]", "data.synthetic.speed"), ("data.synthetic.speed=[0,1]", "data.synthetic.speed"),
])
def test_a_bad_value_exits_2_naming_the_key(override, key, capsys):
  from src.train import main

  assert main(["--config", "configs/smoke.yaml", override]) == 2
  err = capsys.readouterr().err
  assert key in err and len(err.strip().splitlines()) == 1, err


def test_a_yaml_syntax_error_says_file_line_and_column(tmp_path, capsys):
  from src.train import main

  f = tmp_path / "bad.yaml"
  f.write_text("train:\n  steps: 7\n  log_every: [1, 2\nmodel:\n  variant: tiny\n")
  assert main(["--config", str(f)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"{f}:" in err and "YAML syntax error" in err, err


def test_help_config_lists_every_key_with_its_type_default_and_meaning(capsys):
  from src import train

  assert train.main(["--help-config"]) == 0
  lines = capsys.readouterr().out.splitlines()
  leaves = {line.split()[0]: line for line in lines if line.startswith("  ")}
  sections = {line.split(":")[0] for line in lines if line and not line.startswith(" ")}
  assert set(leaves) | sections == set(C.valid_keys())
  for key, line in leaves.items():
    meaning = line.split("): ", 1)[1]
    assert len(meaning) > 8, f"{key} has no meaning in src/schema.py: {line}"
  assert leaves["train.steps"].startswith("  train.steps (int, default 1000): total steps")
  assert "(flow|diffusion, default flow)" in leaves["objective.kind"]
  assert "(int or null, default null)" in leaves["model.depth"]


def test_print_config_prints_the_resolved_config_and_exits(capsys, tmp_path):
  from src import train

  assert train.main(["--config", str(ROOT / "configs/smoke.yaml"), "--print-config", "train.steps=7",
                     f"workdir={tmp_path}/never"]) == 0
  out = capsys.readouterr().out
  (tmp_path / "printed.yaml").write_text(out)
  assert C.load(tmp_path / "printed.yaml") == C.load(ROOT / "configs/smoke.yaml", ["train.steps=7",
                                                                                  f"workdir={tmp_path}/never"])
  assert not (tmp_path / "never").exists()
