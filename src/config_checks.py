"""Config checks of single fields and of fields that only make sense together,
whatever the task (checks that depend on what is trained belong to the task,
`src.tasks`), and the error every config problem raises. `src.config` calls `check`
on every config it loads and re-exports these names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from src.config import Config, DataConfig


class ConfigError(ValueError):
  """A config that cannot be used: unknown key, wrong type, bad value."""


TFDS_PREFIX = "tfds:"  # data.source=tfds:<name>: any prepared tfds dataset
DATA_SOURCES = ("synthetic", "folder", "mixture", "latents")  # and tfds:<name>


def check(cfg: Config) -> None:
  """Checks of single fields and of fields that only make sense together, whatever the
  task. Checks that depend on what is trained belong to the task (`src.tasks`)."""
  source = cfg.data.source
  if source not in DATA_SOURCES and not (source.startswith(TFDS_PREFIX) and len(source) > len(TFDS_PREFIX)):
    raise ConfigError(f"config key 'data.source' = {source!r}; expected one of {', '.join(DATA_SOURCES)}, "
                      f"{TFDS_PREFIX}<name>.")
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.sequence, cfg.mesh.tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, and at most one may be -1.")
  _check_shapes(cfg.data, cfg.model.patch)
  if cfg.train.max_bad_steps < 1:
    raise ConfigError(f"train.max_bad_steps={cfg.train.max_bad_steps} must be >= 1.")
  if not 0.0 <= cfg.objective.cond_dropout <= 1.0:
    raise ConfigError(f"objective.cond_dropout={cfg.objective.cond_dropout} must lie in [0, 1].")
  _check_lora(cfg)


def _check_shapes(d: DataConfig, patch) -> None:
  pt = patch[0]
  if d.pack_buffer < 1.0:
    raise ConfigError(f"data.pack_buffer={d.pack_buffer}: the buffer must hold at least one batch (>= 1).")
  if not 0.0 <= d.image_fraction <= 1.0 or not 0.0 <= d.token_drop < 1.0:
    raise ConfigError("data.image_fraction must lie in [0, 1] and data.token_drop in [0, 1).")
  if d.area <= 0:
    return
  if d.seq_len <= 0:
    raise ConfigError("data.area > 0 (mixed shapes) needs a fixed row length: set data.seq_len.")
  frames = list(d.frame_counts) or [d.frames]
  if any(f % pt for f in frames) or (d.image_fraction > 0 and pt != 1):
    raise ConfigError(f"data.frame_counts={frames} (and images) must be multiples of patch pt={pt}.")
  if not d.aspect_ratios or min(d.aspect_ratios) <= 0:
    raise ConfigError("data.aspect_ratios must be a non-empty list of positive W/H ratios.")


def _check_lora(cfg: Config) -> None:
  from src.lora import GROUPS, target_patterns

  lora = cfg.lora
  if lora.rank < 0 or lora.alpha < 0 or not 0.0 <= lora.dropout < 1.0:
    raise ConfigError(f"lora.rank={lora.rank} and lora.alpha={lora.alpha} must be >= 0, lora.dropout={lora.dropout} "
                      "in [0, 1).")
  if lora.rank and not lora.targets:
    raise ConfigError(f"lora.rank={lora.rank} with no lora.targets: name some of {', '.join(GROUPS)} or give patterns.")
  try:
    target_patterns(lora.targets)
  except Exception as e:  # noqa: BLE001 - re.error, reported as the config error it is
    raise ConfigError(f"lora.targets={list(lora.targets)}: not a regular expression ({e}).") from None
