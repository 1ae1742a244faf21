"""The block-skipping Pallas kernel (model.attention=flash, src.models.flash), interpreted on
CPU: equal to XLA attention (values and gradients), alone and under shard_map on 8 devices,
and it computes only the block pairs whose segment ranges overlap."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import mesh as M
from src.config import MeshConfig
from src.models import attention, flash


def _segments(lengths: list[int], total: int) -> np.ndarray:
  seg = np.zeros(total, np.int32)  # padding (0) after the examples
  np.put(seg, np.arange(sum(lengths)), np.repeat(np.arange(1, len(lengths) + 1), lengths))
  return seg


def _reference(q, k, v, qs, ks):
  """XLA attention with the packing mask, on [B, H, L, D] (q pre-scaled)."""
  bias = jnp.where(qs[:, None, :, None] == ks[:, None, None, :], 0.0, attention.MASK_VALUE)
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, -1), v)


def _value_and_grads(fn, q, k, v):
  weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))  # every output element weighed differently
  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=(0, 1, 2)))(q, k, v)


def _qkv(b, h, lq, lk, d=128, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, h, lq, d)), *(jax.random.normal(kk, (b, h, lk, d)) for kk in keys[1:]))


@pytest.mark.parametrize("lq_segments, lk_segments, lq, lk", [
    # self-attention: examples that straddle blocks, padding at the end, a second row of one example
    ([[37, 200, 91, 150], [512]], None, 512, 512),
    # cross-attention: a packed row of 3 examples over their 3 captions (lengths differ)
    ([[300, 100, 100], [128, 256, 128]], [[20, 100, 8], [64, 64, 128]], 512, 256),
])
def test_kernel_equals_xla_attention(lq_segments, lk_segments, lq, lk):
  qs = jnp.asarray(np.stack([_segments(s, lq) for s in lq_segments]))
  ks = qs if lk_segments is None else jnp.asarray(np.stack([_segments(s, lk) for s in lk_segments]))
  q, k, v = _qkv(2, 2, lq, lk)
  q = q * 128**-0.5
  expect, expect_grads = _value_and_grads(lambda *a: _reference(*a, qs, ks), q, k, v)
  got, grads = _value_and_grads(lambda *a: flash.packed_flash(*a, qs, ks, 128, 128, True), q, k, v)
  np.testing.assert_allclose(got, expect, atol=2e-6)
  for a, b in zip(grads, expect_grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_a_row_of_16_examples_computes_one_block_pair_in_16_and_never_the_others():
  """16 examples of 128 tokens, 128-token blocks: each query block overlaps one key block
  of its own, 16 of the 256 pairs. Keys of a segment no query has (every other key block
  of a cross-attention row) are NaN: one computed pair would poison the output and
  the gradients, so their being finite and equal to attention without those keys shows
  that the kernel skips them."""
  seg = _segments([128] * 16, 2048)[None]
  assert flash.executed_fraction(seg, seg, 128, 128) == 1 / 16
  assert flash.executed_fraction(seg, seg, 512, 512) == 1 / 4  # larger blocks: 4 of 16 pairs
  # examples that straddle blocks: exactly the pairs that hold a visible (query, key) pair
  odd = _segments([100] * 16 + [50], 1664)[None]
  blocks = odd.reshape(13, 128)
  visible = [[bool(set(a) & set(b)) for b in blocks] for a in blocks]
  assert flash.executed_fraction(odd, odd, 128, 128) == np.mean(visible) < 0.25

  q, k, v = _qkv(1, 2, 2048, 2048)
  kv_seg = np.where(np.arange(4096) // 128 % 2 == 0, np.repeat(seg, 2, axis=1), 99)  # [1, 4096]
  k2, v2 = (jnp.zeros((1, 2, 4096, 128)).at[:, :, kv_seg[0] != 99].set(x) for x in (k, v))
  k2, v2 = (x.at[:, :, kv_seg[0] == 99].set(jnp.nan) for x in (k2, v2))
  assert flash.executed_fraction(seg, kv_seg, 128, 128) == 1 / 32
  got, grads = _value_and_grads(lambda q, k, v: flash.packed_flash(q, k, v, jnp.asarray(seg), jnp.asarray(kv_seg),
                                                                   128, 128, True), q * 0.1, k2, v2)
  expect, expect_grads = _value_and_grads(lambda *a: _reference(*a, jnp.asarray(seg), jnp.asarray(seg)), q * 0.1, k, v)
  np.testing.assert_allclose(got, expect, atol=2e-6)
  np.testing.assert_allclose(grads[0], expect_grads[0], atol=2e-5)
  kept = kv_seg[0] != 99
  for a, b in zip(grads[1:], expect_grads[1:]):
    np.testing.assert_allclose(a[:, :, kept], b, atol=2e-5)
    assert np.all(np.asarray(a)[:, :, ~kept] == 0)


@pytest.mark.parametrize("mesh_sizes", [None, (2, 1, 4, 1), (1, 2, 2, 2)])
def test_attend_with_flash_equals_xla_attention_alone_and_under_shard_map(mesh_sizes):
  """Through `attention.attend` (model.attention=flash): [B, L, K, Dh] with a small head dim
  (padded to the TPU lanes) and a row length no block divides; on 8 devices the kernel runs
  per device by shard_map, rows over data/fsdp, heads over tensor x sequence (Ulysses)."""
  seg = jnp.asarray(np.stack([_segments([37, 60, 80], 200), _segments([150, 50], 200)] * 2))
  keys = jax.random.split(jax.random.key(3), 3)
  q, k, v = (jax.random.normal(kk, (4, 200, 8, 16)) for kk in keys)
  xla = lambda *a: attention.attend(*a, attention.make_mask(seg, seg, "xla"))
  ours = lambda *a: attention.attend(*a, attention.make_mask(seg, seg, "flash"))
  expect, expect_grads = _value_and_grads(xla, q, k, v)
  if mesh_sizes is None:
    got, grads = _value_and_grads(ours, q, k, v)
  else:
    with jax.set_mesh(M.make_mesh(MeshConfig(*mesh_sizes))), nnx.logical_axis_rules(M.make_rules()):
      got, grads = _value_and_grads(ours, q, k, v)
  np.testing.assert_allclose(got, expect, atol=2e-6)
  for a, b in zip(grads, expect_grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_block_size_and_runs():
  assert flash.block_size(75600) == 512 and flash.block_size(200) == 256 and flash.block_size(64) == 128
  seg = jnp.asarray(_segments([128, 256], 512)[None])  # blocks: [1] [2] [2] [0]
  (kv_lo, kv_hi), (q_lo, q_hi) = flash.block_runs(seg, seg, 128, 128)
  assert kv_lo.tolist() == [0, 1, 1, 3] and kv_hi.tolist() == [0, 2, 2, 3]
  (lo, hi), _ = flash.block_runs(seg, jnp.full((1, 128), 7), 128, 128)  # no key of any query's segment
  assert lo.tolist() == [0] * 4 and hi.tolist() == [-1] * 4


def test_the_attention_blocks_benchmark_counts_pairs(capsys):
  """benchmarks.attention_blocks: rows of 16 examples of 128 tokens use 1/16 of the pairs and the
  skipping kernel computes exactly those; on the mixed stream, useful <= skipping < full."""
  from benchmarks import attention_blocks

  got = attention_blocks.measure([128] * 400, 2048, 128, rows=2, max_segments=16, buffer=2.0, max_wait=4)
  assert got["useful_over_full"] == got["skipping_over_full"] == 1 / 16 and got["examples_per_row"] == 16
  assert attention_blocks.main(["--examples", "300", "--seq-len", "8448", "--block", "512"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["useful_over_full"] < line["skipping_over_full"] < 1 and line["seq_len"] == 8448
