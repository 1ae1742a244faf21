"""The optimizer: weight decay by explicit mark, schedule values, EMA, state shardings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from src import config as C
from src import optim
from src.config import OptimConfig, VAEConfig
from src.models.dit import DiT
from src.models.layers import Dense, Embed, LayerNorm, RMSNorm
from src.models.vae import Conv, VideoVAE


class Named(nnx.Module):
  """A Param called "kernel" without the mark and one called "w" with it."""

  def __init__(self, size: int = 3):
    self.kernel = nnx.Param(jnp.full((size,), 2.0))
    self.w = nnx.Param(jnp.full((size,), 2.0), decay=True)


def tiny_dit():
  cfg = C.load(None, ["model.variant=tiny", "model.cond_dim=8", "model.num_classes=3"]).model
  return DiT(cfg, rngs=nnx.Rngs(0))


def paths(tree, keep=lambda leaf: True):
  """{path as a tuple of str keys: leaf} of the leaves (or whole Variables) `keep`
  accepts."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in flat if keep(v)}


def decayed(state) -> set:
  return set(paths(optim.decay_mask(state), keep=bool))


def one_zero_grad_step(state, weight_decay=0.5):
  """Parameters after one AdamW update with zero gradients: only decay moves them."""
  cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=weight_decay)
  optimizer, schedule = optim.make_optimizer(cfg, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, state)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(state), state)
  return optax.apply_updates(state, updates), float(schedule(0))


# Weight decay: the explicit mark


def test_decay_follows_the_mark_not_the_name():
  state = nnx.state(Named())
  assert decayed(state) == {("w",)}
  after, lr = one_zero_grad_step(state, weight_decay=0.5)
  np.testing.assert_array_equal(after["kernel"][...], 2.0)
  np.testing.assert_allclose(after["w"][...], 2.0 * (1 - lr * 0.5), rtol=1e-6)


def test_dit_decays_its_dense_kernels_and_nothing_else():
  model = tiny_dit()
  dense = {tuple(map(str, p)) + ("kernel",) for p, m in nnx.iter_modules(model) if isinstance(m, Dense)}
  state = nnx.state(model)
  assert dense and decayed(state) == dense
  # What must not decay is there to be checked: tables, norms, biases, modulations.
  kept = set(paths(state)) - dense
  for kind in (Embed, RMSNorm, LayerNorm):
    assert any(isinstance(m, kind) for _, m in nnx.iter_modules(model)), kind
  for name in ("table", "scale", "bias", "modulation", "head_modulation", "null_cond"):
    assert any(p[-1] == name for p in kept), name


def test_vae_decays_its_conv_kernels_and_nothing_else():
  cfg = VAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
  model = nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)))  # shapes suffice
  convs = {tuple(map(str, p)) + ("kernel",) for p, m in nnx.iter_modules(model) if isinstance(m, Conv)}
  assert convs and decayed(nnx.state(model)) == convs


def test_adamw_with_zero_gradients_shrinks_exactly_the_marked_parameters():
  state = nnx.state(tiny_dit())
  after, lr = one_zero_grad_step(state, weight_decay=0.5)
  marked = decayed(state)
  before, moved = paths(state), paths(after)
  assert lr > 0 and marked
  for path, leaf in before.items():
    if path in marked:
      np.testing.assert_allclose(moved[path][...], leaf[...] * (1 - lr * 0.5), rtol=1e-6, atol=1e-12)
    else:
      np.testing.assert_array_equal(moved[path][...], leaf[...])


def test_decay_mask_reads_jitted_and_abstract_states():
  """The mark is Variable metadata: it rides along jit outputs and ShapeDtypeStruct
  states (what `train.abstract_state` builds), and the optimizer traces on those."""
  state = nnx.state(tiny_dit())
  expected = decayed(state)
  assert decayed(jax.jit(lambda s: s)(state)) == expected
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  assert decayed(abstract) == expected
  optimizer, _ = optim.make_optimizer(OptimConfig(weight_decay=0.1), total_steps=10)
  opt_state = jax.eval_shape(optimizer.init, abstract)
  updates, _ = jax.eval_shape(optimizer.update, abstract, opt_state, abstract)
  assert jax.tree.structure(updates) == jax.tree.structure(abstract)


def test_decay_mask_refuses_a_tree_without_marks():
  with pytest.raises(TypeError, match="nnx Variables"):
    optim.decay_mask({"kernel": jnp.ones(3)})


# Learning-rate schedule (update k, counted from 0, uses the formula at step k + 1)

LR, WARMUP, TOTAL, MIN_RATIO = 1e-3, 10, 100, 0.1


def cosine_cfg(**kw):
  return OptimConfig(**{"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": MIN_RATIO, **kw})


@pytest.mark.parametrize("count, expected", [
    (0, LR * 1 / 10),  # step 1 of a 10-step warmup
    (4, LR * 5 / 10),
    (8, LR * 9 / 10),
    (9, LR),  # step 10: warmup done, cosine at its start
    (54, LR * (0.1 + 0.9 * 0.5)),  # step 55: half of the 90 cosine steps, cos = 0
    (39, LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))),  # step 40: 30 of 90
    (99, LR * 0.1),  # the last update: the end value
    (150, LR * 0.1),  # past the end it stays there
])
def test_cosine_schedule_values(count, expected):
  schedule = optim.make_schedule(cosine_cfg(), TOTAL)
  assert float(schedule(count)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("count, expected", [(0, LR / 10), (8, LR * 9 / 10), (9, LR), (50, LR), (99, LR)])
def test_constant_schedule_values(count, expected):
  schedule = optim.make_schedule(cosine_cfg(decay="constant"), TOTAL)
  assert float(schedule(count)) == pytest.approx(expected, rel=1e-5)


def test_warmup_longer_than_the_run_is_cut_so_the_peak_is_reached():
  schedule = optim.make_schedule(cosine_cfg(warmup_steps=50), total_steps=5)  # warmup cut to 4
  values = [float(schedule(c)) for c in range(5)]
  np.testing.assert_allclose(values, [LR / 4, LR / 2, LR * 3 / 4, LR, LR * MIN_RATIO], rtol=1e-5)


def test_make_optimizer_steps_with_the_schedule_it_returns():
  """With b1 = b2 = 0 Adam's step is lr * sign(g): the parameter moves by the
  learning rate itself, which must be the returned schedule's value."""
  cfg = cosine_cfg(b1=0.0, b2=0.0, eps=1e-12, clip_norm=1e9, warmup_steps=3)
  optimizer, schedule = optim.make_optimizer(cfg, total_steps=6)
  params = nnx.state(Named())
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for count in range(6):
    updates, opt_state = update(grads, opt_state, params)
    np.testing.assert_allclose(updates["w"][...], -schedule(count), rtol=1e-5)


# EMA


def test_update_ema_is_the_convex_step_towards_the_params():
  rng = np.random.default_rng(0)
  ema = {"a": rng.normal(size=(4,)), "b": rng.normal(size=(2, 3))}
  params = {"a": rng.normal(size=(4,)), "b": rng.normal(size=(2, 3))}
  out = optim.update_ema(ema, params, 0.9)
  for k in ema:
    np.testing.assert_allclose(out[k], ema[k] + 0.1 * (params[k] - ema[k]), rtol=1e-6)
  np.testing.assert_allclose(optim.update_ema(ema, params, 1.0)["a"], ema["a"])  # decay 1: frozen
  np.testing.assert_allclose(optim.update_ema(ema, params, 0.0)["a"], params["a"])  # decay 0: a copy


def test_update_ema_converges_geometrically_to_constant_params():
  ema, params, decay = {"x": jnp.zeros(3)}, {"x": jnp.array([1.0, -2.0, 3.0])}, 0.9
  for _ in range(50):
    ema = optim.update_ema(ema, params, decay)
  # e_n - p = decay^n (e_0 - p)
  np.testing.assert_allclose(ema["x"] - params["x"], decay ** 50 * (0 - params["x"]), rtol=1e-4)
  for _ in range(250):
    ema = optim.update_ema(ema, params, decay)
  np.testing.assert_allclose(ema["x"], params["x"], atol=1e-6)


# Optimizer state shardings (moments like params: tests/test_train.py; here the rest)


def test_state_shardings_replicate_counters_with_weight_decay_masked():
  """Counters are replicated, and the masked weight decay (a callable mask on an nnx
  State) does not get in the way of `optax.tree_map_params`."""
  mesh = jax.make_mesh((8,), ("x",))
  sharded = NamedSharding(mesh, PartitionSpec("x"))
  params = jax.device_put(nnx.state(Named(size=8)), sharded)
  optimizer, _ = optim.make_optimizer(OptimConfig(weight_decay=0.1), total_steps=10)
  opt_state = jax.jit(optimizer.init, out_shardings=optim.state_shardings(optimizer, params, mesh))(params)
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  is_moment = lambda path: any(getattr(k, "name", None) in ("mu", "nu") for k in path)
  moments = [x.sharding.spec for p, x in flat if is_moment(p)]
  counters = [x for p, x in flat if not is_moment(p)]
  assert moments == [PartitionSpec("x")] * 4
  assert counters and all(x.ndim == 0 and x.sharding.spec == PartitionSpec() for x in counters)


def test_ema_warmup_decay_schedule():
  at = lambda n, warmup=True: float(optim.ema_decay_at(n, 0.9999, warmup))
  assert at(0) == pytest.approx(0.1) and at(8) == pytest.approx(0.5) and at(890) == pytest.approx(0.99)
  assert at(10**6) == pytest.approx(0.9999) and at(0, warmup=False) == 0.9999


def test_a_short_run_with_ema_warmup_has_an_ema_near_its_weights(tmp_path):
  """30 steps at the default decay 0.9999: without warm-up the EMA is still the random
  init (it moved 0.3% of the way); with it, the EMA sits near the trained weights. The
  raw weights are the same either way: the EMA never feeds back into training."""
  from src import train
  from src.runs import load_run

  base = ["model.variant=tiny", "model.num_classes=10", "data.frames=2", "data.height=8", "data.width=8",
          "data.batch_size=8", "optim.warmup_steps=5", "optim.lr=2e-3", "train.steps=30", "train.log_every=10",
          "train.tensorboard=false", "train.async_checkpoint=false"]
  gap = {}
  for warmup in (True, False):
    train.train(C.load(None, base + [f"workdir={tmp_path / str(warmup)}", f"optim.ema_warmup={warmup}"]))
    raw = load_run(tmp_path / str(warmup), use_ema=False)[2]
    ema = load_run(tmp_path / str(warmup), use_ema=True)[2]
    gap[warmup] = float(np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                                    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))))
    gap[warmup, "raw"] = raw
  same = zip(jax.tree.leaves(gap[True, "raw"]), jax.tree.leaves(gap[False, "raw"]))
  assert all(np.array_equal(a, b) for a, b in same)
  assert gap[True] < 0.3 * gap[False], gap
