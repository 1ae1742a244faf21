"""The causal video VAE as a task: L1/L2 reconstruction plus a KL term, on fixed-shape
clips, with held-out reconstruction metrics and input | reconstruction samples.
Perceptual (LPIPS) and adversarial terms need pretrained networks that cannot be
downloaded here, so they are not part of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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

  def terms(self, model: VideoVAE, batch: ClipBatch, rng: jax.Array) -> dict[str, jax.Array]:
    """The loss and its parts: L1/L2 reconstruction of the clip from a posterior sample, KL to N(0, I)."""
    v, x = self.cfg.vae, batch.video
    mean, logvar = model.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    diff = model.decode(z, clip=False).astype(jnp.float32) - x
    l1, l2 = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    loss = v.l1_weight * l1 + v.l2_weight * l2 + v.kl_weight * kl
    # PSNR of pixels in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)
    return dict(loss=loss, l1=l1, mse=l2, kl=kl, psnr_db=10.0 * jnp.log10(4.0 / jnp.maximum(l2, 1e-10)))

  def loss(self, model: VideoVAE, batch: ClipBatch, rng: jax.Array, frozen=None) -> jax.Array:
    return self.terms(model, batch, rng)["loss"]

  def eval_levels(self) -> dict[str, float]:
    return {}  # no noise levels: `eval_metrics` gives the held-out reconstruction's terms

  def eval_loss(self, model, batch, level, key, frozen=None) -> jax.Array:
    return self.loss(model, batch, key)

  def eval_metrics(self, model, batch, key, frozen=None) -> dict[str, jax.Array]:
    """Held-out: the loss, L1, MSE, KL and PSNR (dB) of the reconstruction, with fixed noise."""
    return self.terms(model, batch, key)

  def make_sampler(self, graphdef: nnx.GraphDef, frozen: dict, count: int):
    """(weights, seed) -> `count` held-out clips, each shown as input | reconstruction (posterior mean)."""
    clips = next(self.batches("validation")).video[:count]
    gap = np.full((*clips.shape[1:3], 2, clips.shape[-1]), -1.0, np.float32)  # a black bar between the two
    def reconstruct_fn(params, x):
      vae = nnx.merge(graphdef, params)
      return vae.decode(vae.encode(x)[0])

    reconstruct = jax.jit(reconstruct_fn)

    def sample(weights, seed: int = 0) -> list[np.ndarray]:
      recon = np.asarray(jax.device_get(reconstruct(weights, jnp.asarray(clips))), np.float32)
      return [np.concatenate([x, gap, r], axis=2) for x, r in zip(np.asarray(clips), recon)]

    return sample

  def count_tokens(self, batch: ClipBatch) -> tuple[int, int]:
    pixels = batch.video[..., 0].size
    return pixels, pixels
