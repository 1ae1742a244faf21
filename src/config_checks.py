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

# The valid range of every numeric field (a test keeps this table complete). Interval
# notation: "[1, inf)" is >= 1; "(0, 1)" excludes both ends. Optional fields (None: the
# variant's) are checked when set; mesh sizes (-1: the rest) are checked in `check`.
POSITIVE, COUNT, FRACTION = "[1, inf)", "[0, inf)", "[0, 1]"
RANGES = {
    "seed": COUNT,
    **{f"model.{k}": POSITIVE for k in ("depth", "width", "heads", "mlp_dim", "in_channels", "text_depth")},
    "model.freq_dim": "[2, inf)", "model.mlp_ratio": "(0, inf)", "model.num_classes": COUNT, "model.cond_dim": COUNT,
    "model.ulysses_degree": COUNT,
    "model.rope_theta": "(1, inf)", "model.norm_eps": "(0, 1)",
    **{f"vae.{k}": POSITIVE for k in ("in_channels", "base_dim", "z_dim", "num_res_blocks", "chunk_frames")},
    "vae.norm_eps": "(0, 1)", "vae.l1_weight": COUNT, "vae.l2_weight": COUNT, "vae.kl_weight": COUNT,
    "lora.rank": COUNT, "lora.alpha": COUNT, "lora.dropout": "[0, 1)",
    "objective.logit_mean": "(-inf, inf)", "objective.logit_std": "(0, inf)", "objective.shift": "(0, inf)",
    "objective.shift_base_tokens": COUNT, "objective.beta_start": "(0, 1)", "objective.beta_end": "(0, 1)",
    "objective.num_train_timesteps": "[2, inf)", "objective.min_snr_gamma": COUNT, "objective.cond_dropout": FRACTION,
    **{f"conditioning.{k}": COUNT for k in ("t2v", "i2v", "continuation", "keyframes", "independent")},
    "conditioning.noise": FRACTION,
    "optim.lr": "(0, inf)", "optim.warmup_steps": COUNT, "optim.min_lr_ratio": FRACTION, "optim.weight_decay": COUNT,
    "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "(0, inf)", "optim.clip_norm": "(0, inf)",
    "optim.ema_decay": FRACTION,
    **{f"data.{k}": POSITIVE for k in ("frames", "height", "width", "channels", "batch_size", "max_segments",
                                       "text_len", "pack_max_wait", "frame_stride", "probe_records")},
    **{f"data.{k}": COUNT for k in ("seq_len", "area", "num_workers", "prefetch", "fps", "log_every")},
    "data.image_fraction": FRACTION, "data.pack_buffer": "[1, inf)", "data.token_drop": "[0, 1)",
    **{f"data.synthetic.{k}": POSITIVE for k in ("num_examples", "num_classes", "max_shapes")},
    **{f"train.{k}": POSITIVE for k in ("steps", "log_every", "ckpt_every", "keep_checkpoints", "max_bad_steps",
                                        "sample_count", "sample_steps", "eval_batches")},
    **{f"train.{k}": COUNT for k in ("run_steps", "sample_every", "eval_every", "sample_guidance")},
}


def check(cfg: Config) -> None:
  """Checks of single fields and of fields that only make sense together, whatever the
  task. Checks that depend on what is trained belong to the task (`src.tasks`)."""
  source = cfg.data.source
  if source not in DATA_SOURCES and not (source.startswith(TFDS_PREFIX) and len(source) > len(TFDS_PREFIX)):
    raise ConfigError(f"config key 'data.source' = {source!r}; expected one of {', '.join(DATA_SOURCES)}, "
                      f"{TFDS_PREFIX}<name>.")
  check_ranges(cfg)
  for group in (("data", "fsdp", "sequence", "tensor"), ("dcn_data", "dcn_fsdp")):
    sizes = [getattr(cfg.mesh, k) for k in group]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh sizes {dict(zip(group, sizes))}: each must be >= 1, and at most one may be -1.")
  _check_shapes(cfg.data, cfg.model.patch)
  if list(cfg.train.eval_times) and not all(0.0 <= t <= 1.0 for t in cfg.train.eval_times):
    raise ConfigError(f"train.eval_times={list(cfg.train.eval_times)}: each must lie in [0, 1].")
  if any(f < 1 for f in cfg.data.frame_counts):
    raise ConfigError(f"data.frame_counts={list(cfg.data.frame_counts)}: each must be >= 1.")
  speed = list(cfg.data.synthetic.speed)
  if len(speed) != 2 or not 0 < speed[0] <= speed[1]:
    raise ConfigError(f"data.synthetic.speed={speed}: must be [lo, hi] pixels a frame with 0 < lo <= hi.")
  _check_lora(cfg)
  _check_context_parallel(cfg)


def _check_context_parallel(cfg: Config) -> None:
  m, sequence = cfg.model, cfg.mesh.sequence
  if m.ulysses_degree and m.context_parallel != "usp":
    raise ConfigError(f"model.ulysses_degree={m.ulysses_degree} is read only with model.context_parallel=usp "
                      f"(it is {m.context_parallel!r}).")
  if m.ulysses_degree and sequence > 0 and sequence % m.ulysses_degree:
    raise ConfigError(f"model.ulysses_degree={m.ulysses_degree} must divide mesh.sequence={sequence}: "
                      "the sequence axis is cut into groups of that many devices.")


def in_range(value, interval: str) -> bool:
  lo, hi = (float(v) for v in interval[1:-1].split(","))
  above = value > lo if interval[0] == "(" else value >= lo
  below = value < hi if interval[-1] == ")" else value <= hi
  return above and below


def check_ranges(cfg: Config) -> None:
  """ConfigError naming the first numeric field outside its range (`RANGES`)."""
  for key, interval in RANGES.items():
    value = cfg
    for part in key.split("."):
      value = getattr(value, part)
    if value is not None and not in_range(value, interval):
      raise ConfigError(f"config key '{key}' = {value}: must lie in {interval}.")


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
  if lora.rank and not lora.targets:
    raise ConfigError(f"lora.rank={lora.rank} with no lora.targets: name some of {', '.join(GROUPS)} or give patterns.")
  try:
    target_patterns(lora.targets)
  except Exception as e:  # noqa: BLE001 - re.error, reported as the config error it is
    raise ConfigError(f"lora.targets={list(lora.targets)}: not a regular expression ({e}).") from None
