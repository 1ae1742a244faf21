"""Pretrained weights in the diffusers layout and our Orbax copies, and the VAE loader.

The diffusers layout: a `AutoencoderKLWan` directory (`config.json` +
`diffusion_pytorch_model.safetensors`, e.g. the `vae/` folder of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers). Every tensor maps onto `models.vae.VideoVAE`
(conv weights [Cout, Cin, *k] -> channels-last [*k, Cin, Cout], norm scales
[C, 1, 1(, 1)] -> [C]); every tensor must be used exactly once with the expected
shape, anything else is a `WeightsError` naming it. Reading it needs no PyTorch.

The Orbax layout (`save_vae`, written by `python -m src.convert vae`): two items,
`params` (the NNX parameter state) and `config` (the VAEConfig, as JSON).

`load_vae(cfg)` is the one loader of the configured VAE: the architecture comes from
the checkpoint (a config that disagrees is an error naming every differing key, not
a silently different model), the runtime fields (dtype, chunk_frames) from the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file

from src.checkpoint import Checkpointer
from src.config import ConfigError, VAEConfig
from src.models.vae import VideoVAE

log = logging.getLogger(__name__)

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"  # sharded weights
# NNX parameter path -> diffusers tensor name, applied in order.
VAE_RENAMES = (
    (r"\.kernel$", ".weight"),
    (r"\.upsampler\.", ".upsamplers.0."),  # diffusers keeps the upsampler in a 1-element list
    (r"\.resample\.", ".resample.1."),  # ... and the resampling conv after a pad/upsample layer
)
# VAEConfig fields that define the weights: always the checkpoint's, and a config that
# sets another value is refused. The latent statistics also come from the checkpoint,
# and are compared only when the config sets them (empty: take the checkpoint's).
VAE_ARCHITECTURE = ("in_channels", "base_dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample",
                    "norm_eps")
VAE_LATENT_STATS = ("latents_mean", "latents_std")


class WeightsError(ValueError):
  """Pretrained weights that do not fit the model: missing, unexpected or mis-shaped tensors."""


class CheckpointConfigError(ConfigError):
  """A config whose VAE sizes conflict with the checkpoint named by vae.checkpoint."""


# Reading the diffusers layout.


def vae_config_from_diffusers(d: dict) -> VAEConfig:
  """VAEConfig of a diffusers `AutoencoderKLWan` config.json (Wan 2.1 layout only)."""
  base, channels = d.get("base_dim", 96), d.get("in_channels", 3)
  unsupported = {  # key: (its value, whether the Wan 2.1 layout has it)
      "attn_scales": (d.get("attn_scales"), not d.get("attn_scales")),
      "is_residual": (d.get("is_residual"), not d.get("is_residual")),  # Wan 2.2 VAE
      "patch_size": (d.get("patch_size"), d.get("patch_size") in (None, 1)),  # Wan 2.2 VAE
      "decoder_base_dim": (d.get("decoder_base_dim"), d.get("decoder_base_dim") in (None, base)),
      "out_channels": (d.get("out_channels"), d.get("out_channels", channels) == channels),
  }
  for key, (value, ok) in unsupported.items():
    if not ok:
      raise ValueError(f"{DIFFUSERS_CONFIG}: {key}={value!r} is not supported (only the Wan 2.1 VAE layout is).")
  defaults = VAEConfig()
  return VAEConfig(
      enabled=True,
      in_channels=d.get("in_channels", defaults.in_channels),
      base_dim=d.get("base_dim", defaults.base_dim),
      z_dim=d.get("z_dim", defaults.z_dim),
      dim_mult=list(d.get("dim_mult", defaults.dim_mult)),
      num_res_blocks=d.get("num_res_blocks", defaults.num_res_blocks),
      temporal_downsample=list(d.get("temperal_downsample", defaults.temporal_downsample)),  # sic
      latents_mean=[float(v) for v in d.get("latents_mean") or []],
      latents_std=[float(v) for v in d.get("latents_std") or []],
  )


def read_diffusers(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json contents, tensors by name) of a diffusers model directory."""
  directory = Path(directory)
  config = json.loads((directory / DIFFUSERS_CONFIG).read_text())
  if (directory / DIFFUSERS_INDEX).is_file():
    shards = sorted(set(json.loads((directory / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
  elif (directory / DIFFUSERS_WEIGHTS).is_file():
    shards = [DIFFUSERS_WEIGHTS]
  else:
    raise FileNotFoundError(f"{directory}: no {DIFFUSERS_WEIGHTS} (or {DIFFUSERS_INDEX}) beside {DIFFUSERS_CONFIG}.")
  tensors = {}
  for shard in shards:
    tensors.update(load_file(directory / shard))
  return config, tensors


def diffusers_vae_name(path: tuple) -> str:
  """NNX parameter path, e.g. ('decoder', 'up_blocks', 0, 'upsampler', 'resample', 'kernel'),
  -> diffusers tensor name 'decoder.up_blocks.0.upsamplers.0.resample.1.weight'."""
  name = ".".join(str(p) for p in path)
  for pattern, replacement in VAE_RENAMES:
    name = re.sub(pattern, replacement, name)
  return name


def _to_channels_last(name: str, tensor: np.ndarray, target_ndim: int) -> np.ndarray:
  if name.endswith(".weight") and tensor.ndim >= 3:  # conv: [Cout, Cin, *k] -> [*k, Cin, Cout]
    return np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
  if name.endswith(".gamma") and tensor.size == tensor.shape[0] and target_ndim == 1:
    return tensor.reshape(-1)  # channel-first norm scale [C, 1, 1(, 1)] -> [C]
  return tensor


def vae_params_from_diffusers(tensors: dict[str, np.ndarray], cfg: VAEConfig) -> dict:
  """Nested dict of float32 numpy arrays in the structure of `nnx.state(VideoVAE(cfg), nnx.Param)`."""
  abstract = nnx.state(nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  params, used = {}, set()
  for path, var in nnx.to_flat_state(abstract):
    name = diffusers_vae_name(path)
    if name not in tensors:
      raise WeightsError(f"missing tensor '{name}' (for parameter {'.'.join(map(str, path))} of shape {var.shape}).")
    value = _to_channels_last(name, tensors[name], len(var.shape))
    if value.shape != var.shape:
      raise WeightsError(
          f"tensor '{name}' has shape {tensors[name].shape}; the model expects {var.shape} "
          f"(channels-last) for the configured sizes.")
    used.add(name)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.asarray(value, np.float32)
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise WeightsError(f"unexpected tensor(s) not used by the model: {', '.join(unexpected[:10])}"
                       + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
  return params


def _to_channels_first(name: str, value: np.ndarray) -> np.ndarray:
  """The inverse of `_to_channels_last`, to diffusers' shapes: a conv kernel [*k, Cin, Cout] -> [Cout, Cin, *k]; an
  RMS-norm scale [C] -> [C, 1, 1] in the attention blocks (2D norms), [C, 1, 1, 1] elsewhere (3D norms)."""
  if name.endswith(".weight") and value.ndim >= 3:
    return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
  if name.endswith(".gamma"):
    return value.reshape(-1, 1, 1) if ".attentions." in name else value.reshape(-1, 1, 1, 1)
  return value


def export_diffusers_vae(params: nnx.State, cfg: VAEConfig, dst: str | Path, dtype=np.float32) -> Path:
  """A VideoVAE's parameters as a diffusers `AutoencoderKLWan` directory (config.json +
  diffusion_pytorch_model.safetensors): what `AutoencoderKLWan.from_pretrained`, and
  vae.checkpoint, read."""
  from safetensors.numpy import save_file

  dst = Path(dst)
  if dst.exists() and any(dst.iterdir()):
    raise FileExistsError(f"{dst} exists and is not empty: export into a new directory")
  tensors = {}
  for path, var in nnx.to_flat_state(params):
    name = diffusers_vae_name(path)
    tensors[name] = np.ascontiguousarray(_to_channels_first(name, np.asarray(jax.device_get(var[...]), dtype)))
  config = dict(_class_name="AutoencoderKLWan", base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                num_res_blocks=cfg.num_res_blocks, attn_scales=[], temperal_downsample=list(cfg.temporal_downsample),
                dropout=0.0, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                latents_mean=list(cfg.latents_mean) or [0.0] * cfg.z_dim,
                latents_std=list(cfg.latents_std) or [1.0] * cfg.z_dim)
  dst.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(dst / DIFFUSERS_WEIGHTS))
  (dst / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2))
  log.info("wrote the VAE (%d tensors) as a diffusers AutoencoderKLWan to %s", len(tensors), dst)
  return dst


def build_vae(cfg: VAEConfig, params: dict) -> VideoVAE:
  """A VideoVAE of `cfg` holding `params` (no random initialisation is run: at Wan 2.1
  sizes that would cost seconds and a second copy of the weights)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


# The Orbax layout.


def save_vae(model: VideoVAE, cfg: VAEConfig, dst: str | Path, overwrite: bool = False) -> Path:
  """Write `params` and `config` items of an Orbax checkpoint to `dst`."""
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
  state = nnx.state(model, nnx.Param)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(dst, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state), config=ocp.args.JsonSave(dataclasses.asdict(cfg))), force=overwrite)
  return dst


def _read_orbax_config(path: Path) -> VAEConfig:
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    saved = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  known = {f.name for f in dataclasses.fields(VAEConfig)}
  if set(saved) - known:
    log.warning("%s: ignoring unknown VAE config keys %s", path, sorted(set(saved) - known))
  return VAEConfig(**{k: v for k, v in saved.items() if k in known})


def _restore_orbax(path: Path, cfg: VAEConfig) -> VideoVAE:
  """The saved parameters restored straight into a VideoVAE of `cfg` (no random init);
  `cfg` must have the checkpoint's architecture, its runtime fields may differ."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    state = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  return nnx.merge(graphdef, state)


# Loading either layout.


def _run_of(path: Path) -> tuple[Path, int | None] | None:
  """(run directory, step or None: the newest) when `path` is a training run: its directory, its checkpoints/,
  or one step directory in it."""
  if (path / "checkpoints").is_dir():
    return path, None
  if path.name == "checkpoints":
    return path.parent, None
  if path.parent.name == "checkpoints" and path.name.isdigit():
    return path.parent.parent, int(path.name)
  return None


def _locate(path: str | Path) -> tuple[Path, str]:
  """(directory, "orbax" | "diffusers" | "run") of a weights directory, or FileNotFoundError."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"VAE weights directory not found: {path}")
  if (path / "params").is_dir() and (path / "config").is_dir():
    return path, "orbax"
  if _run_of(path):
    return path, "run"
  if not (path / DIFFUSERS_CONFIG).is_file() and (path / "vae" / DIFFUSERS_CONFIG).is_file():
    path = path / "vae"  # a diffusers model root
  if not (path / DIFFUSERS_CONFIG).is_file():
    raise FileNotFoundError(
        f"{path} is neither an Orbax VAE checkpoint (params/ and config/), a task=vae run directory "
        f"(checkpoints/), nor a diffusers directory ({DIFFUSERS_CONFIG} + {DIFFUSERS_WEIGHTS}).")
  return path, "diffusers"


def _read_run(path: Path, cfg: VAEConfig | None = None, weights: str = "ema") -> tuple[VAEConfig, VideoVAE | None]:
  """A task=vae run's VAEConfig (the saved architecture) and, given the config to build
  it from (`cfg`), the VideoVAE holding its `weights` (ema | raw) of the newest readable
  checkpoint (or of the step directory `path` names)."""
  run, step = _run_of(path)
  ckpt = Checkpointer(run)
  try:
    saved = ckpt.restore_config(step)
    if saved.get("task") != "vae":
      raise ConfigError(f"vae.checkpoint={path} is a task={saved.get('task')} run, not a VAE: point it at a task=vae "
                        "run, a diffusers AutoencoderKLWan directory or an Orbax VAE (src.convert vae)")
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    stored = VAEConfig(**{k: v for k, v in saved["vae"].items() if k in known})
    if cfg is None:
      return stored, None
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params = ckpt.restore_part("ema" if weights == "ema" else "params", like, step=step)
  finally:
    ckpt.close()
  log.info("VAE weights: the %s weights of the task=vae run %s", "EMA" if weights == "ema" else "raw", run)
  return stored, nnx.merge(graphdef, params, rest)


def _read_config(path: Path, kind: str) -> VAEConfig:
  if kind == "orbax":
    return _read_orbax_config(path)
  if kind == "run":
    return _read_run(path)[0]
  return vae_config_from_diffusers(json.loads((path / DIFFUSERS_CONFIG).read_text()))


def read_vae_config(path: str | Path) -> VAEConfig:
  """The VAEConfig stored with the weights in `path` (either layout), reading no weights."""
  return _read_config(*_locate(path))


def _plain(value):
  """Lists (also OmegaConf's ListConfig) as plain lists, so values compare and print alike."""
  return [_plain(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else value


def vae_config_for_checkpoint(cfg: VAEConfig, saved: VAEConfig, source: str | Path = "") -> VAEConfig:
  """`cfg` with the checkpoint's architecture and latent statistics (`saved`): the config
  a VideoVAE holding the checkpoint's weights is built from. Everything else (dtype,
  chunk_frames, enabled, the loss weights, checkpoint) stays the user's.

  Raises CheckpointConfigError naming every key `cfg` sets to another value than the
  checkpoint, since the other code (shapes, config checks) reads the user's config:
  a silently different VAE would make it wrong.
  """
  compared = VAE_ARCHITECTURE + tuple(k for k in VAE_LATENT_STATS if getattr(cfg, k))
  conflicts = [f"vae.{k}: config {_plain(getattr(cfg, k))}, checkpoint {_plain(getattr(saved, k))}"
               for k in compared if _plain(getattr(cfg, k)) != _plain(getattr(saved, k))]
  if conflicts:
    raise CheckpointConfigError(
        f"vae.checkpoint={source or cfg.checkpoint} does not match the config's VAE sizes:\n  "
        + "\n  ".join(conflicts)
        + "\nSet these keys to the checkpoint's values (or leave vae.checkpoint empty for a random VAE).")
  fields = VAE_ARCHITECTURE + VAE_LATENT_STATS
  return dataclasses.replace(cfg, **{k: _plain(getattr(saved, k)) for k in fields})


def load_pretrained_vae(path: str | Path, cfg: VAEConfig | None = None) -> tuple[VideoVAE, VAEConfig]:
  """A VideoVAE holding the weights in `path`, and the VAEConfig it was built from.

  `path` is an Orbax directory written by `python -m src.convert vae`, a diffusers
  directory (`config.json` + `diffusion_pytorch_model.safetensors`; a model root whose
  `vae/` holds them works too), or a `task=vae` run directory (its newest readable
  checkpoint, or the step directory named; the weights of `cfg.checkpoint_weights`). Without `cfg` the model is the stored config's (for a
  diffusers directory the runtime fields are the VAEConfig defaults); with `cfg` it has
  the checkpoint's architecture and `cfg`'s runtime fields (`vae_config_for_checkpoint`).
  Raises FileNotFoundError for a missing or unrecognised directory, WeightsError for
  weights that do not fit, CheckpointConfigError for a `cfg` that conflicts.
  """
  path, kind = _locate(path)
  saved = _read_config(path, kind)
  cfg = saved if cfg is None else vae_config_for_checkpoint(cfg, saved, path)
  if kind == "orbax":
    model = _restore_orbax(path, cfg)
  elif kind == "run":
    model = _read_run(path, cfg, cfg.checkpoint_weights)[1]
  else:
    _, tensors = read_diffusers(path)
    model = build_vae(cfg, vae_params_from_diffusers(tensors, cfg))
  log.info("loaded VAE from %s: base_dim=%d z_dim=%d dim_mult=%s dtype=%s", path, cfg.base_dim, cfg.z_dim,
           cfg.dim_mult, cfg.dtype)
  return model, cfg


def load_vae(cfg: VAEConfig, seed: int = 0) -> VideoVAE:
  """The VAE the config names: the weights in `cfg.checkpoint` (see `load_pretrained_vae`;
  the model's `.cfg` is the config it was built from), or, with no checkpoint, a randomly
  initialised VideoVAE of `cfg` from `seed` (tests and smoke runs only)."""
  if cfg.checkpoint:
    return load_pretrained_vae(cfg.checkpoint, cfg)[0]
  log.warning("vae.checkpoint is empty: using a randomly initialised VAE (tests and smoke runs only)")
  return VideoVAE(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))  # rbg: threefry is slow on CPU
