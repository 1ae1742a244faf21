"""flow_euler and unipc against diffusers' schedulers, configured as the Wan 2.1 pipeline
configures them: the same grids bit for bit, and the same samples from the same noise
with a toy velocity model that is nonlinear in x and depends on the timestep."""

import jax.numpy as jnp
import numpy as np
import pytest

from src import samplers
from src.config import ObjectiveConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

P = 4  # channels per token
RNG = np.random.default_rng(0)
A = (RNG.standard_normal((P, P)) / np.sqrt(P)).astype(np.float32)
B = np.array([0.3, -0.2, 0.1, -0.4], np.float32)
C = np.float32(0.5)  # weight of the example's mean token: couples the tokens of an example


def schedulers_for(method: str, shift: float):
  if method == "flow_euler":
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                                     use_dynamic_shifting=False)
  return diffusers.UniPCMultistepScheduler(
      num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
      solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
      disable_corrector=[])


def toy_velocity(x, t, mean, tanh):
  """v(x, t) = tanh(x A) t / 1000 + b x + c mean(x), written once for numpy-like arrays."""
  return tanh(x @ A) * (t / 1000.0) + B * x + C * mean


def diffusers_sample(method: str, shift: float, steps: int, noise: np.ndarray) -> np.ndarray:
  """The Wan pipeline's loop: model at scheduler.timesteps, then scheduler.step."""
  scheduler = schedulers_for(method, shift)
  scheduler.set_timesteps(steps)
  scheduler.set_begin_index(0)  # as WanPipeline does
  a, b = torch.from_numpy(A), torch.from_numpy(B)
  x = torch.from_numpy(noise)
  for t in scheduler.timesteps:
    t_model = t.to(torch.float32)
    v = torch.tanh(x @ a) * (t_model / 1000.0) + b * x + float(C) * x.mean(1, keepdim=True)
    x = scheduler.step(v, t, x).prev_sample
  return x.numpy()


def jax_denoise(segment_ids):
  """The same toy model over the packed layout: per-example time and per-example mean."""
  k = int(segment_ids.max())
  onehot = (segment_ids[..., None] == jnp.arange(1, k + 1)).astype(jnp.float32)  # [B, L, K]

  def denoise(x, model_time, drop):
    assert model_time.shape == drop.shape == (x.shape[0], k)
    t = samplers.gather_to_tokens(model_time, segment_ids)[..., None]
    means = jnp.einsum("blk,blp->bkp", onehot, x) / jnp.maximum(onehot.sum(1), 1.0)[..., None]
    mean = jnp.einsum("blk,bkp->blp", onehot, means)
    return toy_velocity(x, t, mean, jnp.tanh)

  return denoise


def ours(method: str, shift: float, steps: int, noise: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  seg = jnp.asarray(segment_ids)
  num_tokens = jnp.stack([(seg == i + 1).sum(1) for i in range(int(seg.max()))], 1)
  cfg = ObjectiveConfig(kind="flow", shift=shift)
  return np.asarray(samplers.sample(jax_denoise(seg), cfg, jnp.asarray(noise), seg, num_tokens, steps=steps,
                                    method=method))


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.3])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20, 50])
def test_grids_equal_diffusers(steps, shift):
  for method, grid in [("flow_euler", samplers.flow_euler_grid), ("unipc", samplers.unipc_grid)]:
    scheduler = schedulers_for(method, shift)
    scheduler.set_timesteps(steps)
    timesteps, sigmas = grid(steps, shift)
    ref_t, ref_s = scheduler.timesteps.numpy(), scheduler.sigmas.numpy()
    assert timesteps.dtype == ref_t.dtype and sigmas.dtype == ref_s.dtype == np.float32, method
    np.testing.assert_array_equal(timesteps, ref_t, err_msg=method)  # bit-identical
    np.testing.assert_array_equal(sigmas, ref_s, err_msg=method)
    assert sigmas[0] <= 1.0 and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)


def test_grid_details():
  """What the diffusers grids are, spelled out (the surprises are deliberate in ours)."""
  t, s = samplers.flow_euler_grid(5, 5.0)
  shift = lambda u: 5.0 * u / (1 + 4.0 * u)  # noqa: E731
  np.testing.assert_allclose(s[-2], shift(shift(0.001)), rtol=1e-6)  # shifted twice at the end
  np.testing.assert_allclose(t, 1000 * s[:-1], rtol=1e-7)
  t, s = samplers.unipc_grid(5, 1.0)
  np.testing.assert_allclose(s[0], 1 - 1e-6)  # nudged off 1
  np.testing.assert_array_equal(t, [999, 800, 600, 400, 200])  # truncated 1000 sigma
  np.testing.assert_allclose(s[1:-1], [0.8002, 0.6004, 0.4006, 0.2008], rtol=1e-6)


@pytest.mark.parametrize("method", ["flow_euler", "unipc"])
@pytest.mark.parametrize("steps, shift", [(1, 3.0), (2, 1.0), (3, 5.0), (4, 3.0), (10, 1.0), (10, 5.0),
                                          (25, 3.0)])
def test_samples_equal_diffusers(method, steps, shift):
  noise = np.random.default_rng(steps).standard_normal((2, 16, P)).astype(np.float32)
  ref = diffusers_sample(method, shift, steps, noise)
  out = ours(method, shift, steps, noise, np.ones((2, 16), np.int32))
  assert out.dtype == np.float32
  assert np.max(np.abs(out - ref)) <= 1e-5, np.max(np.abs(out - ref))
  assert np.max(np.abs(out - noise)) > 0.1  # it did move


def test_the_two_samplers_differ():
  """The comparison has teeth: at 10 steps the samplers' results are far apart."""
  noise = np.random.default_rng(1).standard_normal((1, 16, P)).astype(np.float32)
  euler, unipc = (diffusers_sample(m, 3.0, 10, noise) for m in ("flow_euler", "unipc"))
  assert np.max(np.abs(euler - unipc)) > 1e-2


@pytest.mark.parametrize("method", ["flow_euler", "unipc"])
def test_packed_examples_equal_each_alone(method):
  noise = np.random.default_rng(3).standard_normal((1, 6, P)).astype(np.float32)
  packed = ours(method, 3.0, 4, noise, np.array([[1, 1, 1, 2, 2, 0]], np.int32))
  first = ours(method, 3.0, 4, noise[:, :3], np.ones((1, 3), np.int32))
  second = ours(method, 3.0, 4, noise[:, 3:5], np.ones((1, 2), np.int32))
  np.testing.assert_allclose(packed[:, :3], first, atol=1e-6)
  np.testing.assert_allclose(packed[:, 3:5], second, atol=1e-6)
  # and alone each matches diffusers (one example per row there)
  np.testing.assert_allclose(first, diffusers_sample(method, 3.0, 4, noise[:, :3]), atol=1e-5)


def test_resolution_dependent_shift_is_refused():
  cfg = ObjectiveConfig(kind="flow", shift=3.0, shift_base_tokens=64)
  seg = jnp.ones((1, 4), jnp.int32)
  for method in samplers.WAN_SAMPLERS:
    assert method in samplers.FLOW_SAMPLERS
    with pytest.raises(ValueError, match="constant shift"):
      samplers.sample(jax_denoise(seg), cfg, jnp.zeros((1, 4, P)), seg, jnp.array([[4]]), steps=3, method=method)
