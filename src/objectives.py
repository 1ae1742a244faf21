"""Training objectives: rectified flow and DDPM-family diffusion on packed batches.

References:
- Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2022, flow
  matching) with the SD3 recipe (Esser et al. 2024, "Scaling Rectified Flow Transformers"):
  logit-normal timestep sampling and the time shift t' = a t / (1 + (a - 1) t), with a
  resolution-dependent a (more tokens -> more noise).
- DDPM (Ho et al. 2020): linear betas, eps prediction; `scaled_linear` is the Stable
  Diffusion variant, as in diffusers' DDPMScheduler.
- Improved DDPM (Nichol & Dhariwal 2021): cosine schedule (diffusers `squaredcos_cap_v2`).
- v-prediction (Salimans & Ho 2022, progressive distillation).
- Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy").

Glossary: B rows, L tokens per row, P values per token, K example slots per row.
Packed layout: x [B, L, P]; segment_ids [B, L] with 1..K = example in the row,
0 = padding; per-example quantities (t, weights, token counts) are [B, K].
Flow time t is float in [0, 1] (1 = pure noise); diffusion time is an int32 step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from src.config import ObjectiveConfig
from src.models.layers import to_tokens

# DiT timestep embeddings were designed for t in [0, 1000): flow time is scaled to match.
FLOW_TIME_SCALE = 1000.0
# Improved DDPM cosine schedule: offset s keeps beta near t=0 from vanishing, and the
# cap keeps the last beta below 1 (alpha_bar(1) = 0 would make it exactly 1).
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


# ---------------------------------------------------------------------------- schedules


def _cosine_alpha_bar(s: np.ndarray) -> np.ndarray:
  return np.cos((s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * np.pi / 2) ** 2


def betas(schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Per-step noise variances beta_0..beta_{n-1}, float64 [n]."""
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if schedule == "cosine":
    i = np.arange(n, dtype=np.float64)
    ratio = _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n)
    return np.minimum(1.0 - ratio, COSINE_MAX_BETA)
  raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, scaled_linear or cosine.")


def alphas_cumprod(cfg: ObjectiveConfig) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 [n]."""
  b = betas(cfg.schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
  return np.cumprod(1.0 - b)


def _signal_noise_snr(cfg: ObjectiveConfig, t: jax.Array):
  """sqrt(abar), sqrt(1 - abar), SNR at integer steps t, float32, shaped like t.

  The tables are formed in float64 and only then cast: in float32, 1 - abar near t=0
  (~1e-4) would lose three digits, and the SNR with it.
  """
  ac = alphas_cumprod(cfg)
  tables = (np.sqrt(ac), np.sqrt(1.0 - ac), ac / (1.0 - ac))
  return tuple(jnp.asarray(tab, jnp.float32)[t] for tab in tables)


# ------------------------------------------------------------------------------- time


def shift_time(t: jax.Array, a) -> jax.Array:
  """SD3 time shift: a > 1 moves t toward 1 (more noise); a = 1 is the identity."""
  return a * t / (1.0 + (a - 1.0) * t)


def shift_factor(cfg: ObjectiveConfig, num_tokens=None) -> jax.Array:
  """Constant shift, or shift * sqrt(tokens / base) per example ([B, K])."""
  if cfg.shift_base_tokens <= 0:
    return jnp.float32(cfg.shift)
  if num_tokens is None:
    raise ValueError("objective.shift_base_tokens > 0 needs the examples' num_tokens.")
  # Empty slots (0 tokens) would give a = 0 and 0/0 at t = 1: count them as 1 token.
  n = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
  return cfg.shift * jnp.sqrt(n / cfg.shift_base_tokens)


def sample_time(cfg: ObjectiveConfig, key: jax.Array, shape, num_tokens=None) -> jax.Array:
  """Training times [B, K]: flow float32 in [0, 1], diffusion int32 in [0, n).

  No clipping away from 0/1: the flow interpolation and its inversion in
  `predict_x0_and_eps` have no division by t or 1 - t.
  """
  if cfg.kind == "diffusion":
    return jax.random.randint(key, shape, 0, cfg.num_train_timesteps, dtype=jnp.int32)
  if cfg.timestep_sampling == "logit_normal":
    t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, shape, jnp.float32))
  elif cfg.timestep_sampling == "uniform":
    t = jax.random.uniform(key, shape, jnp.float32)
  else:
    raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}.")
  return shift_time(t, shift_factor(cfg, num_tokens)).astype(jnp.float32)


def fixed_time(cfg: ObjectiveConfig, fraction, shape) -> jax.Array:
  """Every example at one noise level, `fraction` of the range (validation): flow t, or
  that fraction of the diffusion steps."""
  if cfg.kind == "flow":
    return jnp.full(shape, fraction, jnp.float32)
  return jnp.full(shape, jnp.round(fraction * (cfg.num_train_timesteps - 1)), jnp.int32)


def model_time(cfg: ObjectiveConfig, t: jax.Array) -> jax.Array:
  """What the DiT timestep embedding receives: 1000 t (flow) or the step (diffusion)."""
  if cfg.kind == "flow":
    return (FLOW_TIME_SCALE * t).astype(jnp.float32)
  return t.astype(jnp.float32)


# ------------------------------------------------------------------- noising, targets


def noise_and_target(cfg: ObjectiveConfig, x0, noise, t, segment_ids, frame_ids=None):
  """Noised tokens x_t and the regression target, both [B, L, P]; t is [B, K] per
  example, or [B, K, F] per (example, frame) with `frame_ids` [B, L] (`src.frames`)."""
  t_tok = to_tokens(t, segment_ids, frame_ids)[..., None]  # [B, L, 1]
  if cfg.kind == "flow":
    return (1.0 - t_tok) * x0 + t_tok * noise, noise - x0
  a, s, _ = _signal_noise_snr(cfg, t_tok)  # [B, L, 1] each
  x_t = a * x0 + s * noise
  if cfg.prediction == "eps":
    return x_t, noise
  if cfg.prediction == "x0":
    return x_t, x0
  if cfg.prediction == "v":
    return x_t, a * noise - s * x0
  raise ValueError(f"unknown prediction {cfg.prediction!r}; expected eps, v or x0.")


def predict_x0_and_eps(cfg: ObjectiveConfig, x_t, pred, t_tok):
  """Model output -> (x0_hat, eps_hat), [B, L, P]; t_tok is token-level time [B, L]."""
  if cfg.kind == "flow":
    t = t_tok[..., None]  # [B, L, 1]; x_t = (1-t) x0 + t eps, pred = eps - x0
    return x_t - t * pred, x_t + (1.0 - t) * pred
  a, s, _ = _signal_noise_snr(cfg, t_tok[..., None])  # [B, L, 1]
  if cfg.prediction == "eps":
    return (x_t - s * pred) / a, pred
  if cfg.prediction == "x0":
    return pred, (x_t - a * pred) / s
  if cfg.prediction == "v":  # a^2 + s^2 = 1 makes the inversion division-free
    return a * x_t - s * pred, s * x_t + a * pred
  raise ValueError(f"unknown prediction {cfg.prediction!r}; expected eps, v or x0.")


# ------------------------------------------------------------------------------- loss


def loss_weight(cfg: ObjectiveConfig, t: jax.Array) -> jax.Array:
  """Per-example loss weights [B, K]: ones, or min-SNR-gamma for diffusion.

  Min-SNR clamps the eps-space weight min(snr, g); expressed for the model's
  prediction target that is /snr (eps), /(snr + 1) (v), or as is (x0).
  """
  if cfg.kind == "flow" or cfg.min_snr_gamma <= 0:
    return jnp.ones(t.shape, jnp.float32)
  _, _, snr = _signal_noise_snr(cfg, t)
  clamped = jnp.minimum(snr, cfg.min_snr_gamma)
  if cfg.prediction == "eps":
    return clamped / snr
  if cfg.prediction == "v":
    return clamped / (snr + 1.0)
  if cfg.prediction == "x0":
    return clamped
  raise ValueError(f"unknown prediction {cfg.prediction!r}; expected eps, v or x0.")


def masked_loss(cfg: ObjectiveConfig, pred, target, segment_ids, weight, frame_ids=None, keep=None) -> jax.Array:
  """Weighted mean squared error over real tokens, a float32 scalar. `weight` is [B, K]
  per example, or [B, K, F] per frame with `frame_ids` [B, L]; `keep` (shaped like
  `weight`, bool) leaves the slots it is False for out of the loss: conditioning frames.

  'token': every real token in the batch counts once; 'example': every real example
  counts once, however long. Padding and left-out tokens are removed with `where`
  before squaring, so neither the value nor the gradient depends on what they hold
  (even inf/NaN).
  """
  real = segment_ids > 0  # [B, L]
  if keep is not None:
    real &= to_tokens(keep, segment_ids, frame_ids)
  diff = jnp.where(real[..., None], pred.astype(jnp.float32) - target.astype(jnp.float32), 0.0)
  err = jnp.mean(jnp.square(diff), axis=-1)  # [B, L]
  err = jnp.where(real, err * to_tokens(weight.astype(jnp.float32), segment_ids, frame_ids), 0.0)
  if cfg.loss_reduction == "token":
    return jnp.sum(err) / jnp.maximum(jnp.sum(real), 1)
  if cfg.loss_reduction == "example":
    k = weight.shape[1]
    per_slot = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=k + 1))
    sums = per_slot(err, segment_ids)[:, 1:]  # [B, K]; segment 0 (padding) dropped
    counts = per_slot(real.astype(jnp.float32), segment_ids)[:, 1:]  # [B, K]
    means = sums / jnp.maximum(counts, 1.0)  # empty slots: 0 / 1, never 0 / 0
    return jnp.sum(jnp.where(counts > 0, means, 0.0)) / jnp.maximum(jnp.sum(counts > 0), 1)
  raise ValueError(f"unknown loss_reduction {cfg.loss_reduction!r}; expected token or example.")
