"""FSDP's weight gradients reduce-scattered one torus dimension at a time (src.fsdp,
model.gradient_reduce=torus), on 8 simulated CPU devices given the coordinates of a 2x2x2 TPU
torus: the DiT's values and gradients equal the single-device model's, and the program's
reduce-scatters are the torus steps' (groups of 2). docs/pod.md section 3 has what it does on
a TPU slice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from src import fsdp, hlo, mesh as M
from src.config import LoRAConfig, MeshConfig
from src.models.dit import DiT
from src.models.patch import pack_rows
from tests.test_dit import CFG, as_jnp, packed_examples, perturbed

TORUS = dataclasses.replace(CFG, gradient_reduce="torus")


@pytest.fixture
def torus(monkeypatch):
  """The 8 CPU devices as the chips of a 2x2x2 torus, in device order (row-major)."""
  coords = dict(zip(jax.devices(), np.ndindex(2, 2, 2)))
  monkeypatch.setattr(fsdp, "device_coords", coords.get)
  fsdp.mesh_plan.cache_clear()
  yield
  fsdp.mesh_plan.cache_clear()


@pytest.fixture(scope="module")
def batch8():
  """8 packed rows (one per device of an fsdp=8 mesh), with captions."""
  rows = [pack_rows(packed_examples(seed=s), 96, max_segments=4) for s in range(4)]
  row = jax.tree.map(lambda *a: np.concatenate(a), *rows)
  return as_jnp(jax.tree.map(lambda a: np.concatenate([a, a[:, ::-1] if a.ndim == 3 else a]), row))


def _value_and_grads(model, batch, mesh_sizes=None, trained=nnx.Param):
  real = np.asarray(batch.packing.segment_ids) > 0
  times = jnp.linspace(50.0, 950.0, 4 * len(real)).reshape(len(real), 4)
  graphdef, params, rest = nnx.split(nnx.merge(model.graphdef, model.params), trained, ...)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(batch.tokens, times, batch.packing)
    return jnp.sum(jnp.where(real[..., None], out, 0.0) ** 2)

  fn = jax.jit(jax.value_and_grad(loss))
  if mesh_sizes is None:
    return fn(params), ""
  with jax.set_mesh(M.make_mesh(MeshConfig(*mesh_sizes))), nnx.logical_axis_rules(M.make_rules()):
    return fn(params), fn.lower(params).compile().as_text()


def _reduce_scatter_groups(text: str) -> list[int]:
  found, _ = hlo.collectives(text, 8)
  return sorted({c.group for c in found if c.kind == "reduce-scatter"})


@pytest.mark.parametrize("mesh_sizes, scan", [((1, 8, 1, 1), True), ((2, 4, 1, 1), False), ((1, 4, 1, 2), True)])
def test_dit_gradients_reduced_per_torus_dimension_equal_the_plain_model(torus, batch8, mesh_sizes, scan):
  """FSDP over 8 (a 2x2x2 torus: 3 steps), over 4 with data parallelism (2 steps and a sum over
  `data`), over 4 with tensor parallelism: values and every parameter's gradient equal the
  single-device model's; every reduce-scatter in the program is over one torus dimension."""
  model = perturbed(DiT(dataclasses.replace(TORUS, scan_layers=scan), rngs=nnx.Rngs(0)))
  expect, _ = _value_and_grads(model, batch8)
  got, text = _value_and_grads(model, batch8, mesh_sizes)
  assert _reduce_scatter_groups(text) == [2], "the kernels' gradients are scattered by the torus steps"
  np.testing.assert_allclose(got[0], expect[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expect[1])):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["no coordinates", "the default"])
def test_without_torus_coordinates_or_by_default_the_gradient_is_gspmds(torus, batch8, monkeypatch, case):
  """CPU devices have no coordinates, and model.gradient_reduce=compiler (the default) does not
  ask: the plain tensordot, whose gradient GSPMD reduces over the whole fsdp axis."""
  if case == "no coordinates":
    monkeypatch.setattr(fsdp, "device_coords", lambda d: None)
    fsdp.mesh_plan.cache_clear()
  model = perturbed(DiT(TORUS if case == "no coordinates" else CFG, rngs=nnx.Rngs(0)))
  _, text = _value_and_grads(model, batch8, (1, 8, 1, 1))
  assert 2 not in _reduce_scatter_groups(text)


def test_frozen_kernels_are_not_reduced(torus, batch8):
  """LoRA trains the adapters only: the frozen kernels' gradients are neither made nor reduced
  (no torus-step reduce-scatter), and the adapters' gradients equal the single-device model's."""
  model = perturbed(DiT(TORUS, rngs=nnx.Rngs(0), lora=LoRAConfig(rank=2, targets=("attn",))))
  from src.lora import LoRAParam

  expect, _ = _value_and_grads(model, batch8, trained=LoRAParam)
  got, text = _value_and_grads(model, batch8, (1, 8, 1, 1), trained=LoRAParam)
  assert 2 not in _reduce_scatter_groups(text)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expect[1])):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_batch_that_does_not_split_over_the_rows_takes_the_plain_path(torus):
  """A leading dimension the data x fsdp devices do not divide (one caption, sampling): no plan."""
  mesh = M.make_mesh(MeshConfig(1, 8, 1, 1))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(M.make_rules()), fsdp.reduction("torus"):
    assert fsdp._plan_for(("embed", "mlp"), (8, 5, 16)) is not None
    assert fsdp._plan_for(("embed", "mlp"), (4, 5, 16)) is None
    assert fsdp._plan_for(("mlp", "embed"), (8, 5, 16))[2] == 1  # the kernel's fsdp dimension
    assert fsdp._plan_for(("patch", None), (8, 5, 16)) is None  # not split over fsdp
  with fsdp.reduction("torus"):
    assert fsdp._plan_for(("embed", "mlp"), (8, 5, 16)) is None  # no mesh
  with jax.set_mesh(mesh), nnx.logical_axis_rules(M.make_rules()):
    assert fsdp._plan_for(("embed", "mlp"), (8, 5, 16)) is None  # not asked for


def test_torus_steps_follow_the_fastest_varying_dimension():
  steps, held = fsdp.torus_steps(np.array(list(np.ndindex(2, 4))))
  assert steps == (((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 4), (1, 5), (2, 6), (3, 7)))
  assert held == (0, 2, 4, 6, 1, 3, 5, 7)  # the fast dimension's rank is scattered first: the major digit
  assert fsdp.torus_steps(np.array([(0, 0), (1, 1), (0, 0), (1, 0)])) is None  # a chip twice, one missing


@pytest.mark.parametrize("grid, order", [((2, 2, 2), "row-major"), ((4, 2), "row-major"), ((2, 4), "snake"),
                                         ((2, 2, 2), "shuffled")])
def test_a_reduce_scatter_per_torus_dimension_equals_one_over_the_axis(grid, order):
  """src.fsdp's reduction (a scatter per torus dimension, the rows put in the order they are
  handed out) gives every chip the rows one flat psum_scatter gives it: 8 CPU devices standing
  for the chips of a grid, in row-major, snake (each row reversed after the first, as some
  meshes order a torus) or shuffled order."""
  coords = np.array(list(np.ndindex(*grid)))
  if order == "snake":
    coords = np.concatenate([coords[:4], coords[4:][::-1]])
  elif order == "shuffled":
    coords = coords[np.random.default_rng(0).permutation(8)]
  steps, held = fsdp.torus_steps(coords)
  assert sorted(held) == list(range(8)) and len(steps) == len(grid)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  g = jax.device_put(jax.random.normal(jax.random.key(0), (8 * 16, 3)), NamedSharding(mesh, P("fsdp")))
  run = lambda reduce: jax.jit(jax.shard_map(reduce, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp")))(g)
  flat = run(lambda x: jax.lax.psum_scatter(x, "fsdp", scatter_dimension=0, tiled=True))
  np.testing.assert_allclose(run(lambda x: fsdp.torus_reduce(x, steps, held)), flat, rtol=1e-5, atol=1e-5)
