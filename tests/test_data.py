"""Tests for src/data: the synthetic source, the caption embedding, the grain pipeline."""

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from src.batch import row_shape
from src.config import DataConfig, SyntheticConfig
from src.data.pipeline import make_iterator
from src.data.sources import BACKGROUND, class_content, colour_vector, embed_caption, make_source
from src.models.patch import patchify, unpack

PATCH = (1, 2, 2)
ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw):
  syn = SyntheticConfig(**kw.pop("synthetic", {}))
  base = dict(frames=2, height=8, width=8, channels=3, batch_size=4, text_len=4, prefetch=1, synthetic=syn)
  return DataConfig(**{**base, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert jax.tree.structure(x) == jax.tree.structure(y)  # the same fields present
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
      np.testing.assert_array_equal(u, v, err_msg=jax.tree_util.keystr(path))


def _arrays(batch):
  """Field -> array of a PackedBatch, its packing's fields alongside tokens; absent ones left out."""
  packing = {f.name: getattr(batch.packing, f.name) for f in dataclasses.fields(batch.packing)}
  fields = {"tokens": batch.tokens, **packing}
  return {k: v for k, v in fields.items() if v is not None}


def _digest(tokens):
  return hashlib.sha1(np.ascontiguousarray(tokens, np.float32).tobytes()).hexdigest()


# The synthetic source.


def test_source_is_deterministic_and_in_range():
  cfg = _cfg(synthetic=dict(num_examples=64))
  a, b, other = make_source(cfg, seed=3), make_source(cfg, seed=3), make_source(cfg, seed=4)
  assert len(a) == 64
  ex = a[5]
  assert ex["video"].shape == (2, 8, 8, 3) and ex["video"].dtype == np.float32
  assert ex["video"].min() >= -1 and ex["video"].max() <= 1
  for i in range(0, 64, 7):
    np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    assert a[i]["caption"] == b[i]["caption"] and a[i]["label"] == b[i]["label"]
  assert any(not np.array_equal(a[i]["video"], other[i]["video"]) for i in range(8))
  with pytest.raises(IndexError):
    a[64]


def test_labels_are_determined_by_content():
  """Same label -> same shape kind (fill ratio of its box) and same colour (pixel values)."""
  cfg = _cfg(frames=1, height=32, width=32, synthetic=dict(num_examples=60, num_classes=24, max_shapes=1))
  source = make_source(cfg, seed=0)
  fill_range = {"square": (0.95, 1.01), "disc": (0.65, 0.92), "diamond": (0.35, 0.65)}
  labels = set()
  for i in range(len(source)):
    ex = source[i]
    kind, colour = class_content(ex["label"])
    labels.add(ex["label"])
    assert 0 <= ex["label"] < 24 and kind in ex["caption"] and colour in ex["caption"]
    frame = ex["video"][0]
    mask = np.any(frame != BACKGROUND, axis=-1)
    np.testing.assert_array_equal(frame[mask], np.broadcast_to(colour_vector(colour, 3), frame[mask].shape))
    rows, cols = np.nonzero(mask)
    if rows.min() == 0 or cols.min() == 0 or rows.max() == 31 or cols.max() == 31:
      continue  # clipped by the frame edge: the fill ratio says nothing
    fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    lo, hi = fill_range[kind]
    assert lo <= fill <= hi, (i, kind, fill)
  assert len(labels) > 12


def test_shapes_move_along_the_caption_direction():
  cfg = _cfg(frames=4, height=32, width=32, synthetic=dict(num_examples=20, max_shapes=1))
  source = make_source(cfg, seed=1)
  step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
  for i in range(len(source)):
    ex = source[i]
    centres = [np.argwhere(np.any(f != BACKGROUND, -1)).mean(0) for f in ex["video"]]
    motion = centres[-1] - centres[0]
    direction = np.array(step[ex["caption"].split()[-1]])
    assert motion @ direction > 0.5 * np.abs(motion).max(), (ex["caption"], motion)


def test_shapes_move_at_the_configured_speed():
  """synthetic.speed: pixels a frame at a 16-pixel short side (one square, so the centroid is the centre)."""
  for speed in (0.5, 2.0):
    cfg = _cfg(frames=4, height=16, width=16, synthetic=dict(num_examples=12, max_shapes=1, speed=(speed, speed)))
    source = make_source(cfg, seed=2)
    travelled = []
    for i in range(len(source)):
      ex = source[i]
      if "square" not in ex["caption"]:
        continue
      centres = [np.argwhere(np.any(f != BACKGROUND, -1)).mean(0) for f in ex["video"]]
      travelled.append(np.abs(centres[-1] - centres[0]).max() / 3)
    assert travelled and abs(np.median(travelled) - speed) < 0.35, (speed, travelled)


def test_unknown_source_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown data source 'nope'"):
    make_source(_cfg(source="nope"), seed=0)


# The caption embedding.


def test_embed_caption_words_padding_truncation():
  e = embed_caption("a red disc moving left", text_len=8, dim=6)
  assert e.shape == (8, 6) and e.dtype == np.float32
  assert np.all(e[5:] == 0) and np.all(np.any(e[:5] != 0, axis=1))
  f = embed_caption("two red squares", text_len=2, dim=6)
  np.testing.assert_array_equal(f[1], e[1])  # "red" is the same vector anywhere
  assert not np.array_equal(f[0], e[0])
  assert not np.array_equal(embed_caption("red", 1, 6, seed=1), e[1:2])


def test_embed_caption_is_stable_across_processes():
  """Python's str hash is salted per process; the embedding must not be."""
  code = "from src.data.sources import embed_caption; print(embed_caption('a blue square', 4, 3).tobytes().hex())"
  outs = {
      subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": s}, capture_output=True, text=True, check=True).stdout
      for s in ("1", "2")
  }
  assert outs == {embed_caption("a blue square", 4, 3).tobytes().hex() + "\n"}


# The pipeline.


def test_batch_layout_one_example_per_row():
  cfg = _cfg()
  it = make_iterator(cfg, PATCH, cond_dim=5, seed=0, process_count=2)
  batch = next(it)
  n = 2 * 4 * 4  # tokens of one [2, 8, 8] clip with (1, 2, 2) patches
  assert row_shape(cfg, PATCH) == (n, 1)
  expected = {
      "tokens": ((2, n, 12), np.float32), "segment_ids": ((2, n), np.int32), "positions": ((2, n, 3), np.int32),
      "grid": ((2, 1, 3), np.int32), "labels": ((2, 1), np.int32),
      "cond": ((2, 4, 5), np.float32), "cond_segment_ids": ((2, 4), np.int32),
  }  # fmt: skip
  assert {k: (v.shape, v.dtype) for k, v in _arrays(batch).items()} == expected
  assert np.all(batch.packing.segment_ids == 1) and np.all(batch.packing.grid == [2, 4, 4])
  no_text = next(make_iterator(cfg, PATCH, cond_dim=0, seed=0))
  assert set(_arrays(no_text)) == set(expected) - {"cond", "cond_segment_ids"}
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    make_iterator(cfg, PATCH, cond_dim=0, seed=0, process_count=3)


def test_packed_rows_hold_source_examples():
  cfg = _cfg(seq_len=80, max_segments=3, synthetic=dict(num_examples=12))  # 32-token clips: 2 per row
  source = make_source(cfg, seed=0)
  by_digest = {_digest(patchify(source[i]["video"], PATCH)[0]): source[i] for i in range(len(source))}
  captions = {}
  for batch in _take(make_iterator(cfg, PATCH, cond_dim=4, seed=0), 3):
    assert batch.tokens.shape == (4, 80, 12)
    np.testing.assert_array_equal((batch.packing.segment_ids > 0).sum(1), [64] * 4)
    for ex in unpack(batch):
      record = by_digest[_digest(ex["tokens"])]
      assert ex["label"] == record["label"]
      np.testing.assert_array_equal(ex["text"], embed_caption(record["caption"], 4, 4))
      captions[record["caption"]] = ex["label"]
  assert len(captions) > 3


def test_host_shards_are_disjoint_and_cover_the_dataset():
  cfg = _cfg(batch_size=4, synthetic=dict(num_examples=16))
  source = make_source(cfg, seed=0)
  everything = {_digest(patchify(source[i]["video"], PATCH)[0]) for i in range(16)}
  assert len(everything) == 16
  shards = []
  for host in range(2):  # 8 examples per host = 4 batches of 2 rows: one epoch
    batches = _take(make_iterator(cfg, PATCH, 0, seed=0, process_index=host, process_count=2), 4)
    shards.append({_digest(ex["tokens"]) for b in batches for ex in unpack(b)})
  assert len(shards[0]) == len(shards[1]) == 8
  assert not shards[0] & shards[1] and shards[0] | shards[1] == everything


def test_seed_determines_the_stream():
  cfg = _cfg(seq_len=80, max_segments=3)
  a, b, c = (_take(make_iterator(cfg, PATCH, 3, seed=s), 3) for s in (7, 7, 8))
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0].tokens, c[0].tokens)


def _check_resume(cfg, n=3, m=3):
  it = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  _take(it, n)
  state = it.get_state()
  assert state["skipped"] == it.skip_counts() == {}  # the synthetic source has no bad record
  expected = _take(it, m)
  fresh = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  fresh.set_state(state)
  got = _take(fresh, m)
  _assert_batches_equal(got, expected)
  assert fresh.skip_counts() == {} and fresh.get_state()["next_index"] == it.get_state()["next_index"]
  it.close()
  fresh.close()
  return expected


# seq_len 80 holds two 32-token clips and leaves room: every batch reads one clip ahead
# and carries it into the next batch, which the saved state must account for.
@pytest.mark.parametrize("seq_len", [0, 80])
def test_resume_is_exact(seq_len):
  _check_resume(_cfg(seq_len=seq_len, max_segments=3, synthetic=dict(num_examples=20)))


MIXED = dict(area=48, frame_counts=[1, 2, 3], image_fraction=0.25, seq_len=120, max_segments=5)


def test_resume_is_exact_with_mixed_shapes_and_waiting_examples():
  """The packing window holds examples across batches; the state must carry them."""
  cfg = _cfg(**MIXED, token_drop=0.25, pack_max_wait=2, synthetic=dict(num_examples=40))
  it = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  _take(it, 2)
  assert it.get_state()["pending"], "the test needs examples waiting in the window"
  _check_resume(cfg, n=2, m=4)


def test_resume_is_exact_with_worker_processes():
  cfg = _cfg(seq_len=80, max_segments=3, synthetic=dict(num_examples=20))
  with_workers = _check_resume(_cfg(seq_len=80, max_segments=3, num_workers=2, synthetic=dict(num_examples=20)))
  # Packing runs after the workers, so their count does not change the batches.
  it = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  _take(it, 3)
  _assert_batches_equal(with_workers, _take(it, 3))


def test_mixed_shapes_follow_the_size_distribution():
  cfg = _cfg(**MIXED, synthetic=dict(num_examples=200))
  source = make_source(cfg, seed=0, spatial_multiple=2)
  shapes = [source[i]["video"].shape for i in range(200)]
  images = sum(s[0] == 1 for s in shapes)
  assert 75 <= images <= 125  # 0.25 images + 0.75 * 1/3 one-frame clips = half
  for t, h, w, c in shapes:
    assert h * w <= 48 and h % 2 == 0 and w % 2 == 0 and t in (1, 2, 3) and c == 3
  ratios = {round(w / h, 2) for _, h, w, _ in shapes}
  assert min(ratios) < 1 < max(ratios)  # portrait and landscape both appear


def test_fit_area_keeps_aspect_under_the_budget():
  from src.data.sizes import fit_area
  for aspect in (9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9):
    h, w = fit_area(aspect, 1024, 2)
    assert h * w <= 1024 and h % 2 == 0 and w % 2 == 0
    assert abs(w / h - aspect) / aspect < 0.1
    assert h * w >= 0.85 * 1024  # and uses most of it
  assert fit_area(16 / 9, 1024, 2) == (24, 42)


def test_token_drop_keeps_positions_of_the_kept_tokens():
  cfg = _cfg(token_drop=0.5, frames=2, height=8, width=8, seq_len=80, max_segments=4)
  batch = next(make_iterator(cfg, PATCH, cond_dim=0, seed=0))
  full = 2 * 4 * 4
  for ex in unpack(batch):
    assert len(ex["tokens"]) == full // 2 and tuple(ex["grid"]) == (2, 4, 4)
    pos = [tuple(p) for p in ex["positions"]]
    assert len(set(pos)) == len(pos) and all(0 <= p[1] < 4 and 0 <= p[2] < 4 for p in pos)


def test_window_packing_leaves_little_padding():
  cfg = _cfg(**dict(MIXED, seq_len=150, max_segments=16), batch_size=4, synthetic=dict(num_examples=400))
  it = make_iterator(cfg, PATCH, cond_dim=0, seed=0)
  batches = _take(it, 12)
  seg = np.stack([b.packing.segment_ids for b in batches])
  assert np.mean(seg == 0) < 0.05
  seen = [len(unpack(b)) for b in batches]
  assert sum(seen) > 12 * 4  # several examples per row


# Real-data hooks on the synthetic source (the folder/tfds ones: test_video_data.py).


def test_clip_source_passes_synthetic_clips_through():
  """Readers of single clips can use clip_source for any source: synthetic is unchanged."""
  from src.data.sources import clip_source

  cfg = _cfg(synthetic=dict(num_examples=8))
  raw, clips = make_source(cfg, seed=2), clip_source(cfg, seed=2)
  for i in range(8):
    np.testing.assert_array_equal(clips[i]["video"], raw[i]["video"])
    assert clips[i]["caption"] == raw[i]["caption"]


def test_byte_captions_are_packed_as_ids():
  cfg = _cfg(seq_len=80, max_segments=3, synthetic=dict(num_examples=12))
  batch = next(make_iterator(cfg, PATCH, cond_dim=8, seed=0, text_encoder="bytes"))
  cond = batch.packing.cond
  assert cond.dtype == np.int32 and cond.shape == (4, 3 * 4)
  first = cond[0, :4]
  word = bytes(int(b) - 1 for b in first if b > 0).decode()
  captions = [make_source(cfg, seed=0)[i]["caption"] for i in range(12)]
  assert any(c.startswith(word) for c in captions)
