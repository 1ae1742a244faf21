"""Samplers over the packed layout, with classifier-free guidance.

Flow (rectified flow, t = 1 is noise): Euler and Heun integration of the learned
velocity from t = 1 to 0, on the training time grid shifted exactly as in training
(constant, or per example by its token count). Diffusion: DDPM ancestral sampling
(Ho et al. 2020, posterior q(x_s | x_t, x0) on a sub-sampled step grid) and DDIM
(Song et al. 2021, eta = 0). Guidance (Ho & Salimans 2022):
out = uncond + g * (cond - uncond), with the null label/caption that training drops in.

Flow, as diffusers 0.42.1 runs Wan 2.1 (one constant shift, same grid for every
example): `flow_euler` is FlowMatchEulerDiscreteScheduler (Euler on its sigma grid,
model called at sigma * 1000), `unipc` is UniPCMultistepScheduler with flow sigmas,
bh2, order 2, x0 prediction (UniPC: Zhao et al. 2023, UniP predictor plus the UniC
corrector, which reuses the model call at the predicted point). Both reproduce the
schedulers' grids and step maths (tests/test_samplers_diffusers.py).

A sampler sees the model only as `denoise(x, model_time [B, K], drop [B, K]) -> pred`,
so every example of a packed row gets its own timestep and shift.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from src import objectives
from src.config import ObjectiveConfig
from src.models.layers import gather_to_tokens  # noqa: F401 (re-exported for callers)

Denoise = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
WAN_SAMPLERS = ("flow_euler", "unipc")  # diffusers' grids: one constant shift for all examples
FLOW_SAMPLERS = ("euler", "heun") + WAN_SAMPLERS
DIFFUSION_SAMPLERS = ("ddpm", "ddim")


def guided(denoise: Denoise, scale: float) -> Denoise:
  """Classifier-free guidance: one batched call over [conditional; null] rows."""
  if scale == 1.0:
    return lambda x, t, drop: denoise(x, t, drop)

  def fn(x, t, drop):
    both = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([drop, jnp.ones_like(drop)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + scale * (cond - uncond)

  return fn


def flow_times(cfg: ObjectiveConfig, steps: int, num_tokens: jax.Array) -> jax.Array:
  """[steps + 1, B, K] times from 1 to 0, shifted per example as in training."""
  base = jnp.linspace(1.0, 0.0, steps + 1)[:, None, None]
  times = objectives.shift_time(base, objectives.shift_factor(cfg, num_tokens))
  return jnp.broadcast_to(times, (steps + 1, *num_tokens.shape))


def sample_flow(denoise: Denoise, cfg: ObjectiveConfig, noise, segment_ids, num_tokens, *,
                steps: int, method: str = "euler") -> jax.Array:
  """Integrate dx/dt = v from t = 1 (x = noise) to t = 0. noise [B, L, P]."""
  if method not in FLOW_SAMPLERS:
    raise ValueError(f"sampler {method!r} is not a flow sampler; expected one of {FLOW_SAMPLERS}.")
  drop = jnp.zeros(num_tokens.shape, bool)
  if method in WAN_SAMPLERS:
    if cfg.shift_base_tokens > 0:
      raise ValueError(f"sampler {method!r} uses diffusers' grid with one constant shift; it cannot follow "
                       "objective.shift_base_tokens > 0 (a shift per example): use euler/heun, or set it to 0.")
    fn = sample_flow_euler if method == "flow_euler" else sample_unipc
    return fn(lambda x, t: denoise(x, jnp.full(num_tokens.shape, t, jnp.float32), drop), noise,
              steps=steps, shift=cfg.shift)
  times = flow_times(cfg, steps, num_tokens)  # [S+1, B, K]

  def velocity(x, t):
    return denoise(x, objectives.model_time(cfg, t), drop)

  def step(x, ts):
    t, t_next = ts
    dt = gather_to_tokens(t_next - t, segment_ids)[..., None]  # [B, L, 1]
    v = velocity(x, t)
    x_euler = x + dt * v
    if method == "euler":
      return x_euler, None
    # Heun: average the slopes at both ends; the last step (t_next = 0) stays Euler,
    # as in Karras et al. 2022, since the model is not trained at t = 0 exactly.
    v_next = velocity(x_euler, t_next)
    last = jnp.all(t_next == 0.0)
    return jnp.where(last, x_euler, x + dt * 0.5 * (v + v_next)), None

  x, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
  return x


# ------------------------------------------------- diffusers' flow schedulers (Wan 2.1)
# Grids are built in the dtypes diffusers uses (numpy float64, then float32), so the
# sigmas and timesteps are bit-identical; the model time is diffusers' timestep.
WanVelocity = Callable[[jax.Array, jax.Array], jax.Array]  # (x, scalar model time) -> v


def flow_euler_grid(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
  """FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps): timesteps [S]
  float32 (= 1000 sigma) and sigmas [S + 1] float32, from 1 down to 0."""
  n = int(objectives.FLOW_TIME_SCALE)
  # The scheduler first shifts its float32 training grid 1/n .. 1; inference then spaces
  # linearly between the ends of that already-shifted grid and shifts again, so the
  # smallest sigma is shift(shift(1/n)) (0.024 at shift 5), not shift(1/n).
  ends = objectives.shift_time(np.array([n, 1], np.float32) / np.float32(n), shift)
  sigmas = objectives.shift_time(np.linspace(float(ends[0]) * n, float(ends[1]) * n, steps) / n, shift)
  sigmas = sigmas.astype(np.float32)
  return sigmas * np.float32(n), np.append(sigmas, np.float32(0.0))


def unipc_grid(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
  """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps):
  integer timesteps [S] and sigmas [S + 1] float32 ending in 0."""
  n = int(objectives.FLOW_TIME_SCALE)
  sigmas = objectives.shift_time(np.linspace(1.0, 1.0 / n, steps + 1)[:-1], shift)  # float64
  if abs(sigmas[0] - 1.0) < 1e-6:
    sigmas[0] -= 1e-6  # as diffusers: keeps log(alpha) = log(1 - sigma) finite at the start
  # Truncated (not rounded) to integers, as diffusers casts them; the model sees these,
  # while the updates use the float sigmas, so timestep != 1000 sigma here.
  return (sigmas * n).astype(np.int64), np.append(sigmas, 0.0).astype(np.float32)


def _unipc_update(lam: np.ndarray, sig: np.ndarray, src: int, dst: int, r_prev: float, r_new: float) -> list:
  """Coefficients of one UniP/UniC update from sigma[src] to sigma[dst] in x0 prediction:
  x_dst = (s_dst / s_src) x - a_dst B(h) [m_src + r_prev (m_prev - m_src) + r_new (m_new - m_src)],
  with B(h) = h phi_1(h) = e^{-h} - 1 (bh2), h the log-SNR step. Returns the factors of
  (x, m_src, m_prev, m_new)."""
  b_h = np.expm1(-(lam[dst] - lam[src]))
  a = 1.0 - sig[dst]
  return [sig[dst] / sig[src], -a * b_h * (1.0 - r_prev - r_new), -a * b_h * r_prev, -a * b_h * r_new]


def unipc_coefficients(sigmas: np.ndarray) -> np.ndarray:
  """[S, 8] float64 per step i. Corrector: xc_i = c0 x_i + c1 xc_{i-1} + c2 m_{i-1} +
  c3 m_{i-2} + c4 m_i; predictor: x_{i+1} = c5 xc_i + c6 m_i + c7 m_{i-1} (m: x0 predictions)."""
  sig = sigmas.astype(np.float64)  # the float32 sigmas diffusers steps with
  steps = len(sig) - 1
  with np.errstate(divide="ignore"):
    lam = np.log(1.0 - sig) - np.log(sig)  # log-SNR of x = (1 - s) x0 + s noise; +inf at s = 0
  table = np.zeros((steps, 8))
  table[0, 0] = 1.0  # nothing to correct at the first step: xc_0 = x_0
  for i in range(steps):
    if i > 0:  # UniC, of the order the previous predictor had: 1 at i = 1, else 2
      if i == 1:
        r_prev, r_new = 0.0, 0.5  # diffusers' order-1 simplification (not the solved b_1)
      else:
        hh = -(lam[i] - lam[i - 1])
        b_h = np.expm1(hh)
        b1 = (b_h / hh - 1.0) / b_h  # b_k = k! h phi_{k+1}(h) / B(h), h -> -h (x0 form)
        b2 = 2.0 * ((b_h / hh - 1.0) / hh - 0.5) / b_h
        rk = (lam[i - 2] - lam[i - 1]) / (lam[i] - lam[i - 1])
        rho = (b1 - b2) / (1.0 - rk)  # solves [[1, 1], [rk, 1]] rho = b
        r_prev, r_new = rho / rk, b1 - rho
      c = _unipc_update(lam, sig, i - 1, i, r_prev, r_new)
      table[i, 1], table[i, 2], table[i, 3], table[i, 4] = c
    # UniP: order 2 (rho = 1/2) with a previous x0, order 1 at the first and the last
    # step (lower_order_final: the last goes to sigma = 0, where x = x0 exactly).
    order2 = 0 < i < steps - 1
    r_prev = 0.5 * (lam[i + 1] - lam[i]) / (lam[i - 1] - lam[i]) if order2 else 0.0
    table[i, 5], table[i, 6], table[i, 7], _ = _unipc_update(lam, sig, i, i + 1, r_prev, 0.0)
  return table


def sample_flow_euler(velocity: WanVelocity, noise: jax.Array, *, steps: int, shift: float) -> jax.Array:
  """FlowMatchEulerDiscreteScheduler: x += (sigma_next - sigma) v, in float32 like it."""
  timesteps, sigmas = flow_euler_grid(steps, shift)
  dt = sigmas[1:] - sigmas[:-1]  # float32 differences, as the scheduler takes them

  def step(x, row):
    t, d = row
    return x + d * velocity(x, t).astype(jnp.float32), None

  x, _ = jax.lax.scan(step, noise.astype(jnp.float32), (jnp.asarray(timesteps), jnp.asarray(dt)))
  return x


def sample_unipc(velocity: WanVelocity, noise: jax.Array, *, steps: int, shift: float) -> jax.Array:
  """UniPCMultistepScheduler (bh2, order 2, x0 prediction, corrector at every step)."""
  timesteps, sigmas = unipc_grid(steps, shift)
  rows = np.concatenate([sigmas[:-1, None], timesteps[:, None], unipc_coefficients(sigmas)], 1)

  def step(carry, row):
    x, xc, m1, m2 = carry  # predicted x_i, corrected x_{i-1}, x0 at steps i-1 and i-2
    sigma, t, c = row[0], row[1], row[2:]
    m = x - sigma * velocity(x, t).astype(jnp.float32)  # x0 = x - sigma v
    # The model is called at the predicted x_i only; UniC corrects x_i with that call.
    xc = c[0] * x + c[1] * xc + c[2] * m1 + c[3] * m2 + c[4] * m
    return (c[5] * xc + c[6] * m + c[7] * m1, xc, m, m1), None

  x = noise.astype(jnp.float32)  # diffusers keeps the latents in float32
  zeros = jnp.zeros_like(x)
  (x, *_), _ = jax.lax.scan(step, (x, zeros, zeros, zeros), jnp.asarray(rows, jnp.float32))
  return x


def diffusion_steps(cfg: ObjectiveConfig, steps: int) -> np.ndarray:
  """Sub-sampled integer timesteps, descending, ending at 0 ("trailing" spacing)."""
  n = cfg.num_train_timesteps
  return np.unique(np.round(np.linspace(n - 1, 0, steps)).astype(np.int32))[::-1].copy()


def sample_diffusion(denoise: Denoise, cfg: ObjectiveConfig, noise, segment_ids, num_tokens, *, steps: int,
                     method: str = "ddim", key: jax.Array | None = None) -> jax.Array:
  """DDPM ancestral or DDIM from pure noise at the last training step down to step 0."""
  if method not in DIFFUSION_SAMPLERS:
    raise ValueError(f"sampler {method!r} is not a diffusion sampler; expected one of {DIFFUSION_SAMPLERS}.")
  ts = diffusion_steps(cfg, steps)
  abar = objectives.alphas_cumprod(cfg)
  prev = np.append(abar[ts[1:]], 1.0)  # abar at the next (smaller) step; 1 after step 0
  table = jnp.asarray(np.stack([ts, abar[ts], prev], 1), jnp.float32)  # [S, 3]
  keys = jax.random.split(key if key is not None else jax.random.key(0), len(ts))
  drop = jnp.zeros(num_tokens.shape, bool)

  def step(x, inputs):
    (t, a_t, a_prev), k = inputs
    t_ex = jnp.full(num_tokens.shape, t).astype(jnp.int32)  # [B, K]
    pred = denoise(x, objectives.model_time(cfg, t_ex), drop)
    x0, eps = objectives.predict_x0_and_eps(cfg, x, pred, gather_to_tokens(t_ex, segment_ids))
    if method == "ddim":
      return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None
    beta = 1.0 - a_t / a_prev  # the step's effective beta on the sub-sampled grid
    mean = (jnp.sqrt(a_prev) * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - a_prev) * x) / (1.0 - a_t)
    var = beta * (1.0 - a_prev) / (1.0 - a_t)
    return mean + jnp.sqrt(var) * jax.random.normal(k, x.shape, x.dtype), None

  x, _ = jax.lax.scan(step, noise, (table, keys))
  return x


def sample(denoise: Denoise, cfg: ObjectiveConfig, noise, segment_ids, num_tokens, *, steps: int,
           method: str | None = None, guidance: float = 1.0, key: jax.Array | None = None) -> jax.Array:
  """Generate from `noise` [B, L, P]; method defaults to euler (flow) / ddim (diffusion)."""
  fn = guided(denoise, guidance)
  if cfg.kind == "flow":
    return sample_flow(fn, cfg, noise, segment_ids, num_tokens, steps=steps, method=method or "euler")
  return sample_diffusion(fn, cfg, noise, segment_ids, num_tokens, steps=steps, method=method or "ddim", key=key)
