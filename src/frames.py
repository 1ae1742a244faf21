"""Per-frame noise levels: image-to-video, continuation, keyframes and diffusion forcing
as one mechanism of the packed layout.

Every latent frame of an example (every patch frame; the conditioning modes need
`model.patch[0] = 1`, so a token never mixes a given frame and a generated one) can
have its own time. The time table is then [B, K, F] instead of [B, K]: F slots per
example, F the most patch frames an example of the run has, and a token reads the slot
of its own (segment, frame) (`layers.gather_frames_to_tokens`; frames at or past F - 1
share slot F - 1). Conditioning frames are given clean (time 0, or a small noise level
with `conditioning.noise`), are left out of the loss, and sampling holds them fixed.
Self-attention stays block-diagonal by segment: the whole clip, conditioning frames
included, attends to itself.

Modes, drawn per example with the weights of `cfg.conditioning`:
- t2v: no frame given; i2v: the first; continuation: the first k, k uniform in
  `continuation_frames` (at most the example's frames - 1); keyframes: the first and the last;
- independent: no frame given, every frame at its own training time (diffusion forcing).
An example whose frames would all be given (a 1-frame clip in i2v) is trained as t2v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from src import objectives
from src.config import Config, ConditioningConfig, ObjectiveConfig

MODES = ("t2v", "i2v", "continuation", "keyframes", "independent")
T2V, I2V, CONTINUATION, KEYFRAMES, INDEPENDENT = range(len(MODES))


def weights(cfg: ConditioningConfig) -> list[float]:
  return [float(getattr(cfg, m)) for m in MODES]


def per_frame(cfg: ConditioningConfig) -> bool:
  """Whether training draws a time per frame (some mode other than t2v has weight)."""
  return any(w > 0 for w in weights(cfg)[1:])


def check(cfg: Config) -> str:
  """What is wrong with `cfg.conditioning` for this model ("" if nothing)."""
  c = cfg.conditioning
  if sum(weights(c)) <= 0:
    return f"the conditioning weights ({', '.join(f'conditioning.{m}' for m in MODES)}) are all 0: give one a weight"
  lo_hi = list(c.continuation_frames)
  if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
    return f"conditioning.continuation_frames={lo_hi}: expected [min, max] with 1 <= min <= max"
  given = [m for m in ("i2v", "continuation", "keyframes") if getattr(c, m) > 0]
  if given and cfg.model.patch[0] != 1:
    return (f"conditioning.{given[0]} gives whole latent frames, but model.patch[0]={cfg.model.patch[0]} puts "
            f"{cfg.model.patch[0]} frames in a token: use model.patch[0]=1")
  return ""


def given_frames(cfg: ConditioningConfig, key: jax.Array, frames: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """(given [B, K, F] bool: the frames each example is given clean, mode [B, K]: the
  drawn `MODES` index); `frames` [B, K] is each example's patch-frame count."""
  k_mode, k_len = jax.random.split(key)
  logits = jnp.log(jnp.asarray(weights(cfg), jnp.float32))  # weight 0: never drawn
  mode = jax.random.categorical(k_mode, logits, shape=frames.shape)  # [B, K]
  lo, hi = cfg.continuation_frames
  prefix = jnp.minimum(jax.random.randint(k_len, frames.shape, lo, hi + 1), frames - 1)  # [B, K]: one frame left
  f = jnp.arange(slots)  # [F]
  m, n = mode[..., None], frames[..., None]
  given = ((m == I2V) & (f == 0)) | ((m == CONTINUATION) & (f < prefix[..., None])) | (
      (m == KEYFRAMES) & ((f == 0) | (f == n - 1)))
  all_given = jnp.all(given | (f >= n), axis=-1, keepdims=True)  # nothing left to denoise: train it as t2v
  return given & ~all_given, mode


def draw(cfg: Config, key: jax.Array, t: jax.Array, grid: jax.Array, slots: int, num_tokens=None):
  """Per-frame training times [B, K, F] and the loss mask `keep` [B, K, F] (False on the
  given frames), from the per-example times `t` [B, K] and the patch grids [B, K, 3]."""
  obj = cfg.objective
  k_given, k_free, k_level = jax.random.split(key, 3)
  given, mode = given_frames(cfg.conditioning, k_given, grid[..., 0], slots)
  shape = (*t.shape, slots)
  tokens = None if num_tokens is None else jnp.broadcast_to(jnp.asarray(num_tokens)[..., None], shape)
  free = objectives.sample_time(obj, k_free, shape, tokens)  # diffusion forcing: one time per frame
  time = jnp.where((mode == INDEPENDENT)[..., None], free, t[..., None])
  level = given_level(obj, cfg.conditioning.noise, k_level, t.shape)[..., None]
  return jnp.where(given, level, time).astype(t.dtype), ~given


def given_level(obj: ObjectiveConfig, noise: float, key: jax.Array, shape) -> jax.Array:
  """The noise level of the given frames, per example: 0, or uniform in [0, noise] of
  the range (flow t, or that fraction of the diffusion steps)."""
  u = jax.random.uniform(key, shape) * noise
  if obj.kind == "flow":
    return u.astype(jnp.float32)
  return jnp.round(u * (obj.num_train_timesteps - 1)).astype(jnp.int32)
