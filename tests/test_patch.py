"""Tests for src/models/patch.py: patchify round trip, Conv3d equivalence, packing."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.models.patch import first_fit, pack_rows, patchify, unpack, unpatchify


@pytest.mark.parametrize(
    "shape, patch",
    [((4, 8, 6, 3), (1, 2, 2)), ((1, 8, 8, 4), (1, 2, 2)), ((6, 4, 8, 2), (2, 2, 4)), ((3, 5, 7, 1), (3, 5, 7))],
)
def test_patchify_round_trip(shape, patch):
  latent = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  tokens, positions, grid = patchify(latent, patch)
  assert grid == tuple(s // p for s, p in zip(shape[:3], patch))
  assert tokens.shape == (np.prod(grid), np.prod(patch) * shape[3])
  np.testing.assert_array_equal(unpatchify(tokens, grid, patch, shape[3]), latent)


def test_token_order_and_positions():
  latent = np.random.default_rng(1).standard_normal((4, 6, 8, 3)).astype(np.float32)
  patch = (2, 3, 2)
  tokens, positions, grid = patchify(latent, patch)
  assert positions.dtype == np.int32
  # t-major, then h, then w.
  np.testing.assert_array_equal(positions, np.argwhere(np.ones(grid)))
  for i, (t, h, w) in enumerate(positions):
    block = latent[t * 2 : t * 2 + 2, h * 3 : h * 3 + 3, w * 2 : w * 2 + 2]  # [pt, ph, pw, C]
    np.testing.assert_array_equal(tokens[i], block.ravel())


def test_tokens_match_strided_conv3d():
  """The documented value order: a stride == kernel Conv3d is tokens @ kernel.reshape(P, D)."""
  rng = np.random.default_rng(2)
  latent = rng.standard_normal((4, 8, 6, 3)).astype(np.float32)
  patch, dim = (2, 2, 3), 5
  kernel = rng.standard_normal((*patch, 3, dim)).astype(np.float32)  # [pt, ph, pw, C, D]
  conv = jax.lax.conv_general_dilated(
      latent[None], kernel, window_strides=patch, padding="VALID", dimension_numbers=("NTHWC", "THWIO", "NTHWC")
  )[0]  # [T', H', W', D]
  tokens, _, grid = patchify(latent, patch)
  np.testing.assert_allclose(tokens @ kernel.reshape(-1, dim), np.asarray(conv).reshape(-1, dim), rtol=1e-5, atol=1e-5)


def _example(rng, grid, patch, channels, label, text_len=0, text_dim=0):
  latent = rng.standard_normal([g * p for g, p in zip(grid, patch)] + [channels]).astype(np.float32)
  tokens, positions, grid = patchify(latent, patch)
  ex = {"tokens": tokens, "positions": positions, "grid": np.asarray(grid, np.int32), "label": label}
  if text_len:
    ex["text"] = rng.standard_normal((text_len, text_dim)).astype(np.float32)
  return ex


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_unpack_inverts_pack(data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
  patch = data.draw(st.sampled_from([(1, 1, 1), (1, 2, 2), (2, 1, 2)]))
  channels = data.draw(st.integers(1, 3))
  text_len = data.draw(st.sampled_from([0, 1, 3]))
  grids = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=8))
  grids = [(1, h, w) if data.draw(st.booleans()) else (t, h, w) for t, h, w in grids]  # images are T = 1
  examples = [_example(rng, g, patch, channels, i, text_len, 2) for i, g in enumerate(grids)]
  seq_len = max(len(ex["tokens"]) for ex in examples) + data.draw(st.integers(0, 20))
  max_segments = data.draw(st.integers(1, 4))

  batch = pack_rows(examples, seq_len, max_segments)
  _check_batch_layout(batch, seq_len, max_segments)
  assert (batch.packing.cond is not None) == (batch.packing.cond_segment_ids is not None) == (text_len > 0)
  restored = sorted(unpack(batch), key=lambda ex: ex["label"])  # labels are the example indices
  assert len(restored) == len(examples)
  for got, want in zip(restored, examples):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def _check_batch_layout(batch, seq_len, max_segments):
  p = batch.packing
  rows = batch.tokens.shape[0]
  assert p.segment_ids.shape == (rows, seq_len)
  assert p.grid.shape == (rows, max_segments, 3)
  for array, dtype in [(batch.tokens, np.float32), (p.segment_ids, np.int32), (p.positions, np.int32), (p.grid, np.int32)]:
    assert array.dtype == dtype
  seg = p.segment_ids
  pad = seg == 0
  assert not np.any(batch.tokens[pad]) and not np.any(p.positions[pad])
  # Real tokens' positions lie inside their own example's grid.
  own_grid = np.take_along_axis(p.grid, np.maximum(seg - 1, 0)[..., None], axis=1)  # [R, L, 3]
  assert np.all((p.positions < own_grid)[~pad]) and np.all(p.positions >= 0)
  used = seg.max(axis=1)  # segments per row; ids are 1..k in order, padding at the end
  for r in range(rows):
    real = ~pad[r]
    assert np.all(real[: real.sum()]) and np.all(np.diff(seg[r][real]) >= 0)  # segments in order, then padding
    assert np.all(p.grid[r, used[r] :] == 0) and np.all(p.labels[r, used[r] :] == -1)
  if p.cond is not None:
    cseg = p.cond_segment_ids
    assert not np.any(p.cond[cseg == 0])
    assert np.array_equal(cseg.max(axis=1), used)


def test_first_fit_fills_earlier_rows_first():
  # 6 opens row 0, the second 6 needs row 1, 4 goes back to row 0, 5 to row 1, 3 opens row 2.
  assert first_fit([6, 6, 4, 5, 3], seq_len=11, max_segments=8) == [0, 1, 0, 1, 2]
  assert first_fit([1, 1, 1], seq_len=100, max_segments=2) == [0, 0, 1]
  rng = np.random.default_rng(3)
  examples = [_example(rng, (1, 1, n), (1, 1, 1), 2, i) for i, n in enumerate([6, 6, 4])]
  batch = pack_rows(examples, seq_len=11, max_segments=3)
  np.testing.assert_array_equal(batch.packing.labels, [[0, 2, -1], [1, -1, -1]])
  np.testing.assert_array_equal(batch.packing.segment_ids[0], [1] * 6 + [2] * 4 + [0])


def test_oversize_example_is_an_error():
  rng = np.random.default_rng(4)
  examples = [_example(rng, (1, 2, 2), (1, 1, 1), 1, 0), _example(rng, (2, 3, 3), (1, 1, 1), 1, 1)]
  with pytest.raises(ValueError, match="example 1 has 18 tokens.*seq_len=16"):
    pack_rows(examples, seq_len=16, max_segments=4)


def test_num_rows_pads_and_bounds():
  rng = np.random.default_rng(5)
  examples = [_example(rng, (1, 2, 2), (1, 1, 1), 1, i) for i in range(3)]
  batch = pack_rows(examples, seq_len=4, max_segments=2, num_rows=4)
  assert batch.tokens.shape == (4, 4, 1)
  assert np.all(batch.packing.segment_ids[3] == 0) and np.all(batch.packing.labels[3] == -1)
  with pytest.raises(ValueError, match="need 3 rows"):
    pack_rows(examples, seq_len=4, max_segments=2, num_rows=2)


def test_best_fit_prefers_the_tightest_row_and_reports_misfits():
  from src.models.patch import best_fit
  # Rows of 10: 7 goes to row 0, 6 to row 1; 3 fits both (free 3 and 4): the tighter, row 0.
  assert best_fit([7, 6, 3, 4, 5], seq_len=10, max_segments=4, num_rows=2) == [0, 1, 0, 1, -1]
  assert best_fit([1, 1, 1], seq_len=10, max_segments=2, num_rows=1) == [0, 0, -1]  # slot limit
  with pytest.raises(ValueError, match="11 tokens"):
    best_fit([11], seq_len=10, max_segments=2, num_rows=1)
