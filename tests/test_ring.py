"""Ring attention and USP (model.context_parallel: ring | usp) against attention without
context parallelism: values and gradients, with packing, on 8 simulated devices."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import mesh as M
from src.config import ConfigError, MeshConfig, load as load_config
from src.models import attention, ring
from src.models.dit import DiT
from src.models.patch import pack_rows
from tests.test_dit import CFG, as_jnp, packed_examples, perturbed

# A packed row of 96 tokens: segments of 10, 30 and 48 tokens, then 8 of padding.
SEGMENTS = np.array([[1] * 10 + [2] * 30 + [3] * 48 + [0] * 8, [4] * 40 + [5] * 56])


def _qkv(heads=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (2, 96, heads, 16)) for k in keys)


def _value_and_grads(fn, q, k, v):
  weights = jnp.cos(jnp.arange(16.0))  # a loss that weighs every output element differently
  loss = lambda *a: jnp.sum(fn(*a) * weights)
  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_tiles_are_the_largest_divisors_up_to_the_limit():
  assert ring.chunk_size(96, 16) == 16 and ring.chunk_size(12, 8) == 6 and ring.chunk_size(7, 4) == 1
  assert ring.chunk_size(12) == 12
  groups, perm = ring.ring_groups(8, 2)
  assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert sorted(perm) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 0), (7, 1)]


@pytest.mark.parametrize("mesh_sizes, ulysses, tiles", [
    (None, 1, "xla"),  # no mesh: blockwise attention on one device
    ((1, 1, 8, 1), 1, "xla"),  # ring over 8 devices
    ((1, 2, 2, 2), 1, "xla"),  # ring over 2, with batch (fsdp) and heads (tensor) split too
    ((1, 1, 8, 1), 2, "xla"),  # USP: Ulysses in pairs, a ring of 4 pairs
    ((1, 2, 4, 1), 4, "xla"),  # USP with one group: Ulysses only, by all-to-all
    ((1, 1, 8, 1), 0, "xla"),  # USP, the group chosen from the heads (8 heads / 1: all 8)
    # each hop's tiles by the block-skipping Pallas kernel (model.attention=flash), interpreted
    (None, 1, "flash"),
    ((1, 1, 8, 1), 1, "flash"),
    ((1, 1, 8, 1), 2, "flash"),
])
def test_ring_attention_equals_attention_without_context_parallelism(monkeypatch, mesh_sizes, ulysses, tiles):
  monkeypatch.setattr(ring, "RING_CHUNK", 4)  # several query and key tiles per device
  q, k, v = _qkv()
  seg = jnp.asarray(SEGMENTS)
  expect, expect_grads = _value_and_grads(lambda *a: attention.attend(*a, attention.make_mask(seg, seg)), q, k, v)
  fn = lambda *a: ring.ring_attend(*a, seg, seg, ulysses, tiles)
  if mesh_sizes is None:
    got, grads = _value_and_grads(fn, q, k, v)
  else:
    with jax.set_mesh(M.make_mesh(MeshConfig(*mesh_sizes))), nnx.logical_axis_rules(M.make_rules()):
      got, grads = _value_and_grads(fn, q, k, v)
  np.testing.assert_allclose(got, expect, atol=2e-6)
  for a, b in zip(grads, expect_grads):
    np.testing.assert_allclose(a, b, atol=5e-6)


def test_a_group_that_does_not_divide_the_heads_or_a_row_that_does_not_split_is_refused():
  q, k, v = _qkv(heads=6)
  seg = jnp.asarray(SEGMENTS)
  with jax.set_mesh(M.make_mesh(MeshConfig(1, 1, 8, 1))), nnx.logical_axis_rules(M.make_rules()):
    with pytest.raises(ValueError, match="ulysses_degree=4 must divide"):
      ring.ring_attend(q, k, v, seg, seg, 4)
    with pytest.raises(ValueError, match="a row of 92 tokens over 8 devices"):
      ring.ring_attend(q[:, :92], k[:, :92], v[:, :92], seg[:, :92], seg[:, :92])


@pytest.fixture(scope="module")
def packed_batch():
  row = pack_rows(packed_examples(seed=6), 96, max_segments=4)
  batch = as_jnp(jax.tree.map(lambda a: np.concatenate([a, a[:, ::-1] if a.ndim == 3 else a]), row))
  return batch, jnp.array([[100.0, 500.0, 900.0, 0.0]] * 2)


@pytest.mark.parametrize("context_parallel, ulysses, mesh_sizes, collectives, kernel", [
    ("ring", 0, (1, 1, 8, 1), {"collective-permute"}, "xla"),  # degree 8 > the tiny model's 4 heads
    ("usp", 2, (1, 2, 4, 1), {"collective-permute", "all-to-all"}, "xla"),
    # cross-attention by the splash kernel (interpreted) on queries split over sequence
    ("ring", 0, (1, 2, 4, 1), {"collective-permute"}, "splash"),
    # the block-skipping kernel: each hop's tiles of self-attention, and cross-attention
    ("usp", 2, (1, 2, 4, 1), {"collective-permute", "all-to-all", "packed_flash_dkv"}, "flash"),
])
def test_dit_with_ring_or_usp_equals_the_plain_model(packed_batch, context_parallel, ulysses, mesh_sizes, collectives,
                                                     kernel):
  """The whole DiT (self- and cross-attention, packed rows with padding): output and
  parameter gradients equal the single-device model's; the program passes key/value
  slices by collective-permute (and USP regroups heads by all-to-all)."""
  batch, times = packed_batch
  model = perturbed(DiT(CFG, rngs=nnx.Rngs(0)))
  cp = perturbed(DiT(dataclasses.replace(CFG, context_parallel=context_parallel, ulysses_degree=ulysses,
                                         attention=kernel), rngs=nnx.Rngs(0)))
  real = np.asarray(batch.packing.segment_ids) > 0

  def loss(graphdef, params):
    out = nnx.merge(graphdef, params)(batch.tokens, times, batch.packing)
    return jnp.sum(jnp.where(real[..., None], out, 0.0) ** 2)

  expect = jax.jit(jax.value_and_grad(functools.partial(loss, model.graphdef)))(model.params)
  fn = jax.jit(jax.value_and_grad(functools.partial(loss, cp.graphdef)))
  with jax.set_mesh(M.make_mesh(MeshConfig(*mesh_sizes))), nnx.logical_axis_rules(M.make_rules()):
    hlo = fn.lower(cp.params).compile().as_text()
    got = fn(cp.params)
  assert all(name in hlo for name in collectives), collectives
  np.testing.assert_allclose(got[0], expect[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expect[1])):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_context_parallel_config_is_checked():
  assert load_config(None, ["model.context_parallel=usp", "mesh.sequence=4", "model.ulysses_degree=2"])
  with pytest.raises(ConfigError, match="read only with model.context_parallel=usp"):
    load_config(None, ["model.ulysses_degree=2"])
  with pytest.raises(ConfigError, match="must divide mesh.sequence=4"):
    load_config(None, ["model.context_parallel=usp", "mesh.sequence=4", "model.ulysses_degree=3"])
  with pytest.raises(ConfigError, match="context_parallel"):
    load_config(None, ["model.context_parallel=rings"])


@pytest.mark.parametrize("ulysses", [1, 2])
def test_collective_bytes_of_ring_attention_equal_the_ideal(ulysses):
  """fwd + bwd of one ring (USP) attention over 8 devices: the compiled program's
  collective-permute and all-to-all bytes a chip (src.hlo) are src.comms' ideal."""
  from src import comms, hlo

  q, k, v = _qkv()
  seg = jnp.asarray(SEGMENTS)
  weights = jnp.cos(jnp.arange(16.0))
  loss = lambda q, k, v, s: jnp.sum(ring.ring_attend(q, k, v, s, s, ulysses) * weights)
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  with jax.set_mesh(M.make_mesh(MeshConfig(1, 1, 8, 1))), nnx.logical_axis_rules(M.make_rules()):
    text = jax.jit(grad).lower(q, k, v, seg).compile().as_text()
  found, unknown = hlo.collectives(text, 8)
  actual = hlo.summarise(found)
  tokens, width = 2 * 96 / 8, 8 * 16  # a chip's tokens before the regroup, all heads' width
  assert not unknown
  assert actual["collective-permute"]["ici_bytes"] == comms.ring_ideal(tokens, width, 1, 4, 8 // ulysses, False, ulysses)
  # USP: q, k, v in and the output back, forward and backward (each 1/2 of a chip's share moves)
  assert actual["all-to-all"]["ici_bytes"] == 2 * 4 * tokens * width * 4 * (ulysses - 1) / ulysses
