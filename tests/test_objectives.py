"""Objectives: schedules against the published formulas, time sampling statistics,
noising/target round trips, and the packed masked loss against a numpy loop."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from src import objectives as obj
from src.config import ObjectiveConfig
from src.models.layers import gather_to_tokens, to_tokens

N = 1000


def cfg(**kw) -> ObjectiveConfig:
  return dataclasses.replace(ObjectiveConfig(), **kw)


# Independent re-derivations, written element by element from the papers / diffusers.
def ref_betas(schedule, n, b0, b1):
  if schedule == "linear":  # Ho et al. 2020
    return np.array([b0 + (b1 - b0) * i / (n - 1) for i in range(n)])
  if schedule == "scaled_linear":  # Stable Diffusion
    return np.array([(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (n - 1)) ** 2 for i in range(n)])
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal 2021
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])


def ref_alphas_cumprod(schedule, b0=1e-4, b1=0.02):
  out, acc = [], 1.0
  for b in ref_betas(schedule, N, b0, b1):
    acc *= 1.0 - b
    out.append(acc)
  return np.array(out)


# A packed batch: row 0 holds examples of 3 and 2 tokens plus padding, with slot 3
# empty; row 1 has no padding at all (one example of 4, one of 2 tokens).
SEG = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2]], np.int32)
K = 3


# ------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule,b0,b1", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("cosine", 1e-4, 0.02)])
def test_betas_match_published_formulas(schedule, b0, b1):
  got = obj.betas(schedule, N, b0, b1)
  ref = ref_betas(schedule, N, b0, b1)
  assert got.dtype == np.float64 and got.shape == (N,)
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
  # diffusers builds them in float32: we must agree to float32 round-off.
  np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-7)


def test_schedule_known_values():
  lin = obj.betas("linear", N, 1e-4, 0.02)
  assert lin[0] == pytest.approx(1e-4, abs=1e-15) and lin[-1] == pytest.approx(0.02, abs=1e-15)
  sl = obj.betas("scaled_linear", N, 0.00085, 0.012)
  assert sl[0] == pytest.approx(0.00085, rel=1e-12) and sl[-1] == pytest.approx(0.012, rel=1e-12)
  cos = obj.betas("cosine", N, 0.0, 0.0)
  assert cos.max() == 0.999 and cos[-1] == 0.999 and (cos < 0.999).sum() == N - 1
  # DDPM linear: alpha_bar at the last step is 4.036e-5 (sqrt 0.00635), as in diffusers.
  assert obj.alphas_cumprod(cfg())[-1] == pytest.approx(4.0358e-5, rel=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod(schedule):
  got = obj.alphas_cumprod(cfg(schedule=schedule))
  np.testing.assert_allclose(got, ref_alphas_cumprod(schedule), rtol=1e-10)
  if schedule == "cosine":  # closed form alpha_bar(t) = f(t) / f(0) before the cap
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(got[:-1], f(np.arange(1, N) / N) / f(0.0), rtol=1e-10)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="schedule"):
    obj.betas("quadratic", N, 1e-4, 0.02)


# ------------------------------------------------------------------------------ time


def test_gather_to_tokens():
  per = np.arange(2 * K * 2, dtype=np.float32).reshape(2, K, 2)  # trailing dim kept
  got = np.asarray(gather_to_tokens(jnp.asarray(per), jnp.asarray(SEG)))
  for b in range(2):
    for l in range(SEG.shape[1]):
      np.testing.assert_array_equal(got[b, l], per[b, max(SEG[b, l] - 1, 0)])


def test_per_frame_values_reach_the_tokens_of_their_frame():
  frames = np.array([[0, 1, 2, 0, 5, 0], [0, 0, 1, 1, 0, 1]], np.int32)  # 5: past F - 1, reads slot F - 1
  per = np.arange(2 * K * 3 * 2, dtype=np.float32).reshape(2, K, 3, 2)  # F = 3, trailing dim kept
  for dtype in (np.float32, np.int32, bool):
    values = (per % 2 == 0) if dtype is bool else per.astype(dtype)
    got = np.asarray(to_tokens(jnp.asarray(values), jnp.asarray(SEG), jnp.asarray(frames)))
    for b in range(2):
      for l in np.nonzero(SEG[b])[0]:
        np.testing.assert_array_equal(got[b, l], values[b, SEG[b, l] - 1, min(frames[b, l], 2)])
  flat = to_tokens(jnp.asarray(per[:, :, :1]), jnp.asarray(SEG), jnp.asarray(frames))  # F = 1: per example
  np.testing.assert_array_equal(flat, gather_to_tokens(jnp.asarray(per[:, :, 0]), jnp.asarray(SEG)))


def test_shift_time():
  t = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(obj.shift_time(t, 1.0), t, atol=1e-7)
  s = np.asarray(obj.shift_time(t, 3.0))
  assert s[0] == 0.0 and s[-1] == pytest.approx(1.0) and np.all(np.diff(s) > 0)
  assert np.all(s[1:-1] > np.asarray(t)[1:-1])  # a > 1: more noise
  np.testing.assert_allclose(obj.shift_time(jnp.asarray(s), 1 / 3.0), t, atol=1e-6)  # shifts compose


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
@pytest.mark.parametrize("a", [1.0, 3.0])
def test_time_median_moves_with_shift(sampling, a):
  t = obj.sample_time(cfg(timestep_sampling=sampling, shift=a), jax.random.key(0), (400, 500))
  assert t.dtype == jnp.float32 and t.shape == (400, 500)
  assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
  # The shift is monotone, so it maps the median 1/2 exactly to a / (1 + a).
  assert float(jnp.median(t)) == pytest.approx(a / (1 + a), abs=5e-3)


def test_logit_normal_quantiles():
  c = cfg(logit_mean=0.5, logit_std=2.0)
  t = np.asarray(obj.sample_time(c, jax.random.key(1), (400, 500)))
  logit = np.log(t / (1 - t))
  assert np.median(logit) == pytest.approx(0.5, abs=0.03)
  assert np.mean(logit < 0.5 + 2.0) == pytest.approx(0.8413, abs=0.005)  # Phi(1)


def test_resolution_dependent_shift():
  c = cfg(shift=1.0, shift_base_tokens=256)
  key, shape = jax.random.key(2), (4, K)
  base = obj.sample_time(c, key, shape, jnp.full(shape, 256))
  big = obj.sample_time(c, key, shape, jnp.full(shape, 1024))  # a = sqrt(4) = 2
  np.testing.assert_allclose(big, obj.shift_time(base, 2.0), rtol=1e-6)
  assert np.all(np.asarray(big) > np.asarray(base))
  mixed = obj.sample_time(c, key, shape, jnp.array([[256, 1024, 0]] * 4))
  np.testing.assert_allclose(mixed[:, 1], big[:, 1], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(mixed)))
  # An empty slot must not get a = 0, which turns t = 1 into 0 / 0.
  assert float(obj.shift_factor(c, jnp.array([[0]]))[0, 0]) > 0
  assert np.isfinite(float(obj.shift_time(1.0, obj.shift_factor(c, jnp.array([[0]])))[0, 0]))
  with pytest.raises(ValueError):
    obj.sample_time(c, key, shape)


def test_diffusion_time_and_model_time():
  c = cfg(kind="diffusion")
  t = obj.sample_time(c, jax.random.key(3), (100, 100))
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == N - 1
  np.testing.assert_array_equal(obj.model_time(c, t), np.asarray(t, np.float32))
  tf = jnp.array([[0.0, 0.25, 1.0]])
  np.testing.assert_allclose(obj.model_time(cfg(), tf), [[0.0, 250.0, 1000.0]])


# ------------------------------------------------------------------ noising, targets


def _tokens(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (2, SEG.shape[1], 5)), jax.random.normal(k2, (2, SEG.shape[1], 5))


def test_flow_endpoints_and_target():
  x0, noise = _tokens()
  t = jnp.array([[0.0, 1.0, 0.5], [0.3, 0.0, 0.5]])
  x_t, v = obj.noise_and_target(cfg(), x0, noise, t, jnp.asarray(SEG))
  np.testing.assert_allclose(v, noise - x0, rtol=1e-6)
  np.testing.assert_allclose(x_t[0, :3], x0[0, :3])  # t = 0: data
  np.testing.assert_allclose(x_t[0, 3:5], noise[0, 3:5])  # t = 1: noise
  np.testing.assert_allclose(x_t[1, :4], 0.7 * x0[1, :4] + 0.3 * noise[1, :4], rtol=1e-6)
  t_tok = gather_to_tokens(t, jnp.asarray(SEG))
  x0_hat, eps_hat = obj.predict_x0_and_eps(cfg(), x_t, v, t_tok)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, noise, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_diffusion_targets_round_trip(schedule, prediction):
  c = cfg(kind="diffusion", schedule=schedule, prediction=prediction)
  x0, noise = _tokens(1)
  t = jnp.array([[0, 500, 998], [250, 999, 7]], jnp.int32)
  x_t, target = obj.noise_and_target(c, x0, noise, t, jnp.asarray(SEG))
  # Hand formula with the test's own float64 alpha_bar.
  ab = ref_alphas_cumprod(schedule)[np.asarray(gather_to_tokens(t, jnp.asarray(SEG)))][..., None]
  a, s = np.sqrt(ab), np.sqrt(1 - ab)
  np.testing.assert_allclose(x_t, a * x0 + s * noise, rtol=1e-5, atol=1e-6)
  want = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
  np.testing.assert_allclose(target, want, rtol=1e-5, atol=1e-6)
  x0_hat, eps_hat = obj.predict_x0_and_eps(c, x_t, target, gather_to_tokens(t, jnp.asarray(SEG)))
  # Inverting at an extreme step divides by a small sqrt(abar) or sqrt(1-abar): float32
  # error grows by that factor, so compare where the division is well conditioned.
  ok = (np.minimum(a, s) > 0.05)[..., 0]
  np.testing.assert_allclose(np.asarray(x0_hat)[ok], np.asarray(x0)[ok], atol=1e-4)
  np.testing.assert_allclose(np.asarray(eps_hat)[ok], np.asarray(noise)[ok], atol=1e-4)


# ------------------------------------------------------------------------------ loss


def ref_loss(pred, target, seg, weight, reduction):
  pred, target, weight = (np.asarray(x, np.float64) for x in (pred, target, weight))
  per_tok = {}  # (b, k) -> list of weighted token errors
  for b in range(seg.shape[0]):
    for l in range(seg.shape[1]):
      if seg[b, l] > 0:
        e = np.mean((pred[b, l] - target[b, l]) ** 2) * weight[b, seg[b, l] - 1]
        per_tok.setdefault((b, seg[b, l]), []).append(e)
  if reduction == "token":
    return sum(sum(v) for v in per_tok.values()) / sum(len(v) for v in per_tok.values())
  return np.mean([np.mean(v) for v in per_tok.values()])


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_masked_loss_matches_numpy_and_ignores_padding(reduction):
  c = cfg(loss_reduction=reduction)
  pred, target = _tokens(2)
  weight = jnp.array([[1.0, 2.0, 7.0], [0.5, 3.0, 9.0]])  # slot 3 of row 0 is empty
  seg = jnp.asarray(SEG)
  loss = obj.masked_loss(c, pred, target, seg, weight)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert float(loss) == pytest.approx(ref_loss(pred, target, SEG, weight, reduction), rel=1e-5)
  # Garbage (inf, NaN) in the padding changes neither the loss nor the gradient.
  pad = jnp.asarray(SEG == 0)[..., None]
  bad_pred = jnp.where(pad, jnp.inf, pred)
  bad_target = jnp.where(pad, jnp.nan, target)
  assert float(obj.masked_loss(c, bad_pred, bad_target, seg, weight)) == float(loss)
  grad = lambda p, tg: jax.grad(obj.masked_loss, argnums=1)(c, p, tg, seg, weight)
  g_bad, g_ok = grad(bad_pred, bad_target), grad(pred, target)
  np.testing.assert_array_equal(g_bad, g_ok)
  assert np.all(np.asarray(g_ok)[np.asarray(SEG == 0)] == 0)


def test_example_reduction_weights_examples_equally():
  seg = jnp.array([[1, 2, 2, 2]], jnp.int32)
  pred, target, w = jnp.array([[[1.0], [0.0], [0.0], [0.0]]]), jnp.zeros((1, 4, 1)), jnp.ones((1, 2))
  assert float(obj.masked_loss(cfg(loss_reduction="example"), pred, target, seg, w)) == pytest.approx(0.5)
  assert float(obj.masked_loss(cfg(loss_reduction="token"), pred, target, seg, w)) == pytest.approx(0.25)
  empty = jnp.zeros((1, 4), jnp.int32)  # an all-padding batch: 0, not NaN
  for red in ("token", "example"):
    assert float(obj.masked_loss(cfg(loss_reduction=red), pred, target, empty, w)) == 0.0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights(prediction):
  g = 5.0
  c = cfg(kind="diffusion", prediction=prediction, min_snr_gamma=g)
  t = jnp.array([[0, 100, 400], [700, 999, 50]], jnp.int32)
  ab = ref_alphas_cumprod("linear")[np.asarray(t)]
  snr = ab / (1 - ab)
  want = {"eps": np.minimum(snr, g) / snr, "v": np.minimum(snr, g) / (snr + 1), "x0": np.minimum(snr, g)}
  w = obj.loss_weight(c, t)
  assert w.dtype == jnp.float32
  np.testing.assert_allclose(w, want[prediction], rtol=1e-5)
  assert np.any(snr > g) and np.any(snr < g)  # both sides of the clamp are exercised
  np.testing.assert_array_equal(obj.loss_weight(cfg(kind="diffusion"), t), np.ones((2, 3)))
  np.testing.assert_array_equal(obj.loss_weight(cfg(), jnp.full((2, 3), 0.4)), np.ones((2, 3)))


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_jit_matches_eager(kind):
  c = cfg(kind=kind, prediction="v", min_snr_gamma=5.0, shift_base_tokens=4, shift=2.0)
  x0, noise = _tokens(3)
  seg = jnp.asarray(SEG)
  num_tokens = jnp.array([[3, 2, 0], [4, 2, 0]])

  def loss(key, x0, noise):
    t = obj.sample_time(c, key, (2, K), num_tokens)
    x_t, target = obj.noise_and_target(c, x0, noise, t, seg)
    pred = 0.9 * x_t + obj.model_time(c, t).mean() * 1e-4  # a stand-in model
    return obj.masked_loss(c, pred, target, seg, obj.loss_weight(c, t))

  key = jax.random.key(4)
  eager = loss(key, x0, noise)
  assert np.isfinite(float(eager))
  assert float(jax.jit(loss)(key, x0, noise)) == pytest.approx(float(eager), rel=1e-6)
