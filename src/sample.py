"""`python -m src.sample --workdir RUN [--label N | --prompt TEXT] ... --out PATH.{mp4,gif,png}`

Generates from the newest checkpoint of a run (EMA weights unless --no-ema), writes one
video file per sample and a PNG grid of all of them (rows: samples, columns: frames).
`generate()` is the library call the trainer also uses for its periodic samples: it
packs examples of any sizes and durations into rows, so one call makes them all.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from src import config as config_lib
from src import media, samplers, storage
from src import mesh as mesh_lib
from src.checkpoint import Checkpointer, CheckpointNotFoundError
from src.config import Config
from src.data.sources import caption_tokens
from src.models.patch import first_fit, pack_rows, patchify, unpack, unpatchify

log = logging.getLogger("src.sample")


@dataclass(frozen=True)
class Spec:
  """One sample to make: latent grid size, class label (-1: none), caption (None: none)."""

  shape: tuple[int, int, int]  # (T, H, W) of the latent video
  label: int = -1
  caption: str | None = None


def pack_specs(cfg: Config, specs: list[Spec], seq_len: int | None = None):
  """Placeholder examples for `specs` packed first-fit into rows (by default as long as
  the longest). Returns (batch, drop [R, K]: the slots that get the null condition, as
  no label and no caption were asked for, order: spec indices in row-major slot order)."""
  examples = []
  for spec in specs:
    zeros = np.zeros((*spec.shape, cfg.model.in_channels), np.float32)
    tokens, positions, grid = patchify(zeros, cfg.model.patch)
    ex = dict(tokens=tokens, positions=positions, grid=np.asarray(grid, np.int32), label=np.int32(spec.label))
    if cfg.model.cond_dim:
      ex["text"] = caption_tokens({"caption": spec.caption or ""}, cfg.data.text_len, cfg.model.cond_dim,
                                  cfg.model.text_encoder)
    examples.append(ex)
  seq_len = seq_len or max(len(e["tokens"]) for e in examples)
  rows = first_fit([len(e["tokens"]) for e in examples], seq_len, len(specs))
  batch = pack_rows(examples, seq_len, len(specs), rows=rows)
  drop = np.zeros(batch["labels"].shape, bool)
  used, slots = [0] * (max(rows) + 1), []
  for spec, r in zip(specs, rows):
    drop[r, used[r]] = spec.label < 0 and spec.caption is None
    slots.append((r, used[r]))
    used[r] += 1
  return batch, drop, sorted(range(len(specs)), key=lambda i: slots[i])


class Sampler:
  """A compiled generator for a fixed list of specs: call it with parameters and a seed.
  The trainer keeps one for its periodic samples, so it compiles once."""

  def __init__(self, graphdef, cfg: Config, specs: list[Spec], *, steps: int, guidance: float = 1.0,
               method: str | None = None, vae=None):
    self.cfg, self.specs, self.vae = cfg, specs, vae
    self.packed, drop, self.order = pack_specs(cfg, specs)
    batch = {k: jnp.asarray(v) for k, v in self.packed.items()}
    rows = batch["tokens"].shape[0]

    def run(params, key):
      def denoise(x, t, extra_drop):  # guidance calls it on [cond; null] = 2x the rows
        reps = x.shape[0] // rows
        b = jax.tree.map(lambda a: jnp.concatenate([a] * reps), batch)
        return nnx.merge(graphdef, params)(x, t, b, extra_drop | jnp.concatenate([jnp.asarray(drop)] * reps))

      k_noise, k_sample = jax.random.split(key)
      noise = jax.random.normal(k_noise, batch["tokens"].shape)
      num_tokens = jnp.prod(batch["grid"], axis=-1)
      return samplers.sample(denoise, cfg.objective, noise, batch["segment_ids"], num_tokens, steps=steps,
                             method=method, guidance=guidance, key=k_sample)

    self._run = jax.jit(run)
    if vae is not None:  # the DiT works on normalised latents: denormalise, then decode
      self._decode = jax.jit(lambda p, z: (lambda m: m.decode_chunked(m.denormalize(z)))(nnx.merge(vae.graphdef, p)))

  def __call__(self, params, seed: int = 0) -> list[np.ndarray]:
    """Videos [T, H, W, C], in the order of the specs: decoded pixels with a VAE, else latents."""
    tokens = np.asarray(self._run(params, jax.random.key(seed)))
    videos = [None] * len(self.specs)
    for i, ex in zip(self.order, unpack({**self.packed, "tokens": tokens})):  # unpack is row-major
      videos[i] = unpatchify(ex["tokens"], ex["grid"], self.cfg.model.patch, self.cfg.model.in_channels)
      if self.vae is not None:
        videos[i] = np.asarray(self._decode(self.vae.params, jnp.asarray(videos[i])[None]))[0]
    return videos


def generate(graphdef, params, cfg: Config, specs: list[Spec], *, steps: int, guidance: float = 1.0,
             method: str | None = None, seed: int = 0, vae=None) -> list[np.ndarray]:
  """Videos [T, H, W, C] for `specs`, in order (several sizes in one call); decoded to
  pixels when a VAE (`tasks.Frozen`) is given, else latents."""
  return Sampler(graphdef, cfg, specs, steps=steps, guidance=guidance, method=method, vae=vae)(params, seed)


def load_run(workdir: str | Path, use_ema: bool = True):
  """(cfg, graphdef, params) from the newest checkpoint of a run directory. Only the
  weights asked for (EMA or raw) are read: no optimizer state, no second copy."""
  from src.train import abstract_model  # the trainer's model layout is what was saved

  if not (storage.run_path(workdir) / "checkpoints").is_dir():
    raise CheckpointNotFoundError(f"{workdir} is not a run directory: it has no checkpoints/ (train first)")
  ckpt = Checkpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointNotFoundError(
          f"no checkpoint in {storage.run_path(workdir) / 'checkpoints'}: train first (python -m src.train ...), "
          "or point --workdir at a run directory")
    cfg = config_lib.from_dict(ckpt.restore_config(step), f"config of {workdir} step {step}")
    cfg.mesh = config_lib.MeshConfig()  # sample on whatever devices this host has
    mesh = mesh_lib.make_mesh(cfg.mesh)
    graphdef, like = abstract_model(cfg, mesh, mesh_lib.make_rules())
    params = ckpt.restore_part("ema" if use_ema else "params", like, step=step)
  finally:
    ckpt.close()
  log.info("loaded step %d of %s (%s weights)", step, workdir, "EMA" if use_ema else "raw")
  return cfg, graphdef, params


def load_vae_for(cfg: Config):
  """The VAE that decodes a run's latents (`tasks.Frozen`), or None without one."""
  if not cfg.vae.enabled:
    return None
  from src.encode import load_vae
  from src.tasks import Frozen

  return Frozen(*load_vae(cfg))


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m src.sample", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="run directory with checkpoints/")
  p.add_argument("--label", type=int, help="class label (class-conditional models)")
  p.add_argument("--prompt", help="caption (caption-conditioned models)")
  p.add_argument("--frames", type=int, help="latent frames (default: from the run's data.frames)")
  p.add_argument("--height", type=int, help="latent height (default: from the run's data.height)")
  p.add_argument("--width", type=int, help="latent width (default: from the run's data.width)")
  p.add_argument("--num", type=int, default=4, help="samples to make")
  p.add_argument("--steps", type=int, default=50, help="sampler steps")
  p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1: none)")
  p.add_argument("--sampler", choices=samplers.FLOW_SAMPLERS + samplers.DIFFUSION_SAMPLERS,
                 help="default: euler (flow) / ddim (diffusion)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
  p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the written files")
  p.add_argument("--out", default="samples.gif", help="PATH.{mp4,gif,png}: sample i goes to PATH-i.EXT; grid PATH.grid.png")
  return p.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = Path(args.out)
  if out.suffix not in (".mp4", ".gif", ".png"):
    print(f"error: --out {out}: expected a .mp4, .gif or .png file", file=sys.stderr)
    return 2
  try:
    cfg, graphdef, params = load_run(args.workdir, use_ema=not args.no_ema)
  except (CheckpointNotFoundError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if cfg.model.cond_dim and args.label is not None and args.prompt is None:
    print("error: this model is also caption-conditioned: give --prompt too", file=sys.stderr)
    return 2
  if cfg.task != "dit":
    print(f"error: {args.workdir} trained a {cfg.task}, not a DiT: nothing to sample", file=sys.stderr)
    return 2
  vae = load_vae_for(cfg)
  shape = (args.frames or cfg.data.frames, args.height or cfg.data.height, args.width or cfg.data.width)
  if vae is not None and config_lib.pixels_to_vae(cfg):  # the run's data sizes are pixels
    from src.models.vae import latent_shape

    shape = latent_shape(cfg.vae, shape)
  label = -1 if args.label is None else args.label
  specs = [Spec(shape, label, args.prompt)] * args.num
  from tqdm import tqdm

  videos = []
  for i in tqdm(range(args.num), desc="sampling", unit="video", file=sys.stderr):
    videos += generate(graphdef, params, cfg, specs[i:i + 1], steps=args.steps, guidance=args.cfg,
                       method=args.sampler, seed=args.seed + i, vae=vae)
  out.parent.mkdir(parents=True, exist_ok=True)
  for i, video in enumerate(videos):
    media.write_video(out.with_name(f"{out.stem}-{i}{out.suffix}"), video, args.scale)
  media.write_png(out.with_name(f"{out.stem}.grid.png"), media.grid(videos, args.scale))
  log.info("wrote %d samples and %s", len(videos), out.with_name(f"{out.stem}.grid.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
