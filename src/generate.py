"""Generation: noise packed like a batch, denoised by a sampler, decoded to videos.

`Sampler` compiles a generator for a fixed list of `Spec`s (latent shapes, labels,
captions of any sizes, packed into rows like training batches, so one call makes
them all); the trainer keeps one for its periodic samples, `src.sample` makes one per
command. A VAE (`state.Frozen`), when given, decodes the latents to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from src import samplers
from src.config import Config
from src.data.sources import caption_tokens
from src.models.patch import first_fit, pack_rows, patchify, unpack, unpatchify


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
  drop = np.zeros(batch.packing.labels.shape, bool)
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
    packing = jax.tree.map(jnp.asarray, self.packed.packing)
    rows = self.packed.rows

    def run(params, key):
      def denoise(x, t, extra_drop):  # guidance calls it on [cond; null] = 2x the rows
        reps = x.shape[0] // rows
        p = jax.tree.map(lambda a: jnp.concatenate([a] * reps), packing)
        return nnx.merge(graphdef, params)(x, t, p, extra_drop | jnp.concatenate([jnp.asarray(drop)] * reps))

      k_noise, k_sample = jax.random.split(key)
      noise = jax.random.normal(k_noise, self.packed.tokens.shape)
      num_tokens = jnp.prod(packing.grid, axis=-1)
      return samplers.sample(denoise, cfg.objective, noise, packing.segment_ids, num_tokens, steps=steps,
                             method=method, guidance=guidance, key=k_sample)

    self._run = jax.jit(run)
    if vae is not None:  # the DiT works on normalised latents: denormalise, then decode
      self._decode = jax.jit(lambda p, z: (lambda m: m.decode_chunked(m.denormalize(z)))(nnx.merge(vae.graphdef, p)))

  def __call__(self, params, seed: int = 0) -> list[np.ndarray]:
    """Videos [T, H, W, C], in the order of the specs: decoded pixels with a VAE, else latents."""
    tokens = np.asarray(self._run(params, jax.random.key(seed)))
    videos = [None] * len(self.specs)
    for i, ex in zip(self.order, unpack(self.packed.replace(tokens=tokens))):  # unpack is row-major
      videos[i] = unpatchify(ex["tokens"], ex["grid"], self.cfg.model.patch, self.cfg.model.in_channels)
      if self.vae is not None:
        videos[i] = np.asarray(self._decode(self.vae.params, jnp.asarray(videos[i])[None]))[0]
    return videos


def generate(graphdef, params, cfg: Config, specs: list[Spec], *, steps: int, guidance: float = 1.0,
             method: str | None = None, seed: int = 0, vae=None) -> list[np.ndarray]:
  """Videos [T, H, W, C] for `specs`, in order (several sizes in one call); decoded to
  pixels when a VAE (`state.Frozen`) is given, else latents."""
  return Sampler(graphdef, cfg, specs, steps=steps, guidance=guidance, method=method, vae=vae)(params, seed)
