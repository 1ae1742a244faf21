"""The causal video VAE as a task: L1/L2 reconstruction plus a KL term, on fixed-shape
clips. Perceptual (LPIPS) and adversarial terms need pretrained networks that cannot
be downloaded here, so they are not part of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from src.batch import ClipBatch
from src.config import ConfigError
from src.data.clips import make_clip_iterator
from src.models.vae import VideoVAE
from src.tasks.base import Task


class VAETask(Task):
  def check(self) -> None:
    d, v = self.cfg.data, self.cfg.vae
    if d.channels != v.in_channels:
      raise ConfigError(f"data.channels={d.channels} but vae.in_channels={v.in_channels}.")
    error = v.clip_error((d.frames, d.height, d.width))
    if error:
      raise ConfigError(f"data clip (data.frames, data.height, data.width): {error}.")

  def build_model(self, rngs: nnx.Rngs) -> VideoVAE:
    return VideoVAE(self.cfg.vae, rngs=rngs)

  def batches(self, split: str = "train", process_index: int = 0, process_count: int = 1):
    c = self.cfg
    return make_clip_iterator(c.data, 0, c.seed, process_index, process_count, split,
                              spatial_multiple=c.vae.compression()[1])

  def batch_shapes(self, rows: int | None = None) -> ClipBatch:
    return ClipBatch.shapes(self.cfg, rows, text=False)

  def loss(self, model: VideoVAE, batch: ClipBatch, rng: jax.Array, frozen=None) -> jax.Array:
    """L1/L2 reconstruction of the clip from a posterior sample, plus KL to N(0, I)."""
    v, x = self.cfg.vae, batch.video
    mean, logvar = model.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    diff = model.decode(z, clip=False).astype(jnp.float32) - x
    recon = v.l1_weight * jnp.mean(jnp.abs(diff)) + v.l2_weight * jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return recon + v.kl_weight * kl

  def eval_levels(self) -> dict[str, float]:
    return {"loss_t0": 0.0}  # the noise level is irrelevant: the held-out loss with fixed noise

  def eval_loss(self, model, batch, level, key, frozen=None) -> jax.Array:
    return self.loss(model, batch, key)

  def count_tokens(self, batch: ClipBatch) -> tuple[int, int]:
    pixels = batch.video[..., 0].size
    return pixels, pixels
