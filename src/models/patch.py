"""Spacetime patches and sequence packing (host side, numpy).

Follows NaViT ("Patch n' Pack", Dehghani et al. 2023): each latent clip is cut into
non-overlapping (pt, ph, pw) patches, and the patch sequences of examples of any
shape are packed first-fit into fixed-length rows. Segment ids keep the examples of a
row apart (block-diagonal attention); positions are patch coordinates inside each
example, for 3D RoPE. The batch they make is `src.batch.PackedBatch`, the data contract.

Dimension letters: T/H/W latent grid, C channels, (pt, ph, pw) patch, T'/H'/W' patch
grid, N tokens of one example, P = pt*ph*pw*C values per token, R rows, L row length,
K segments per row, S text tokens per example, Dc text width.

Value order inside a token is (pt, ph, pw, C), C fastest. A Conv3d with
stride == kernel == patch and kernel [pt, ph, pw, C, D] (flax layout) equals
`tokens @ kernel.reshape(P, D)`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from src.batch import NO_LABEL, PAD_SEGMENT, Packing, PackedBatch


def patchify(latent: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
  """[T, H, W, C] -> tokens [N, P], positions [N, 3] (t, h, w), grid (T', H', W').

  Tokens are ordered t-major, then h, then w.
  """
  T, H, W, C = latent.shape
  pt, ph, pw = patch
  if T % pt or H % ph or W % pw:
    raise ValueError(f"latent shape {latent.shape[:3]} is not divisible by patch {tuple(patch)}")
  grid = (T // pt, H // ph, W // pw)
  x = latent.reshape(grid[0], pt, grid[1], ph, grid[2], pw, C)  # [T', pt, H', ph, W', pw, C]
  x = x.transpose(0, 2, 4, 1, 3, 5, 6)  # [T', H', W', pt, ph, pw, C]
  tokens = x.reshape(-1, pt * ph * pw * C)  # [N, P]
  positions = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)  # [T', H', W', 3]
  return tokens, positions.reshape(-1, 3).astype(np.int32), grid


def unpatchify(tokens: np.ndarray, grid: Sequence[int], patch: Sequence[int], channels: int) -> np.ndarray:
  """Exact inverse of `patchify`: tokens [N, P] -> [T, H, W, C]."""
  gt, gh, gw = (int(g) for g in grid)
  pt, ph, pw = patch
  x = tokens.reshape(gt, gh, gw, pt, ph, pw, channels)  # [T', H', W', pt, ph, pw, C]
  x = x.transpose(0, 3, 1, 4, 2, 5, 6)  # [T', pt, H', ph, W', pw, C]
  return x.reshape(gt * pt, gh * ph, gw * pw, channels)


def first_fit(sizes: Sequence[int], seq_len: int, max_segments: int) -> list[int]:
  """Row index of each example: the first row with room for its tokens and a slot."""
  used, count, rows = [], [], []
  for i, n in enumerate(sizes):
    if n > seq_len:
      raise ValueError(f"example {i} has {n} tokens, more than the row length seq_len={seq_len}")
    row = next((r for r in range(len(used)) if used[r] + n <= seq_len and count[r] < max_segments), len(used))
    if row == len(used):
      used.append(0)
      count.append(0)
    used[row] += n
    count[row] += 1
    rows.append(row)
  return rows


def best_fit(sizes: Sequence[int], seq_len: int, max_segments: int, num_rows: int) -> list[int]:
  """Row of each example, in the order given, into a fixed number of rows: the row
  that it leaves with the least room (best fit), or -1 when no row has room or a slot.
  Given sizes in decreasing order this is best-fit decreasing bin packing."""
  free, count, rows = [seq_len] * num_rows, [0] * num_rows, []
  for i, n in enumerate(sizes):
    if n > seq_len:
      raise ValueError(f"example {i} has {n} tokens, more than the row length seq_len={seq_len}")
    fits = [r for r in range(num_rows) if free[r] >= n and count[r] < max_segments]
    row = min(fits, key=lambda r: free[r]) if fits else -1
    if row >= 0:
      free[row] -= n
      count[row] += 1
    rows.append(row)
  return rows


def plan_rows(sizes: Sequence[int], waited: Sequence[int], seq_len: int, max_segments: int,
              num_rows: int, max_wait: int) -> list[int]:
  """One batch's packing decision over a window of waiting examples: row per example,
  or -1 to wait. Examples that waited `max_wait` batches go first, then the largest
  (best-fit decreasing); ties keep stream order."""
  order = sorted(range(len(sizes)), key=lambda i: (waited[i] < max_wait, -sizes[i], i))
  placed = best_fit([sizes[i] for i in order], seq_len, max_segments, num_rows)
  rows = [-1] * len(sizes)
  for i, r in zip(order, placed):
    rows[i] = r
  return rows


def _empty_batch(rows: int, seq_len: int, max_segments: int, dim: int, text: np.ndarray | None) -> PackedBatch:
  cond = cond_ids = None
  if text is not None:  # [S, Dc] float embeddings, or [S] int byte ids
    cond = np.zeros((rows, max_segments * len(text), *text.shape[1:]), text.dtype)
    cond_ids = np.full((rows, max_segments * len(text)), PAD_SEGMENT, np.int32)
  packing = Packing(segment_ids=np.full((rows, seq_len), PAD_SEGMENT, np.int32),
                    positions=np.zeros((rows, seq_len, 3), np.int32),
                    grid=np.zeros((rows, max_segments, 3), np.int32),
                    labels=np.full((rows, max_segments), NO_LABEL, np.int32), cond=cond, cond_segment_ids=cond_ids)
  return PackedBatch(tokens=np.zeros((rows, seq_len, dim), np.float32), packing=packing)


def pack_rows(examples: Sequence[dict], seq_len: int, max_segments: int, num_rows: int | None = None,
              rows: Sequence[int] | None = None) -> PackedBatch:
  """Packs examples into rows of `seq_len` tokens: into the given `rows` (one row index
  per example), or else first-fit in the order given.

  Each example holds 'tokens' [N, P], 'positions' [N, 3], 'grid' (3,), 'label' int and
  optionally 'text' [S, Dc] (all or none of them). Returns the packed batch: tokens
  [R, L, P], segment_ids [R, L], positions [R, L, 3], grid [R, K, 3], labels [R, K],
  and with text cond [R, K*S, Dc], cond_segment_ids [R, K*S]. Segment k of a row owns
  cond slots [(k-1)*S, k*S). `num_rows` fixes R (empty rows are all padding).
  """
  if not examples:
    raise ValueError("pack_rows needs at least one example")
  if rows is None:
    rows = first_fit([len(ex["tokens"]) for ex in examples], seq_len, max_segments)
  num_rows = max(rows) + 1 if num_rows is None else num_rows
  if max(rows) >= num_rows:
    raise ValueError(f"{len(examples)} examples need {max(rows) + 1} rows, more than num_rows={num_rows}")
  text = examples[0].get("text")
  batch = _empty_batch(num_rows, seq_len, max_segments, examples[0]["tokens"].shape[1], text)
  p = batch.packing
  used = [0] * num_rows
  segments = [0] * num_rows
  for ex, r in zip(examples, rows):
    if ("text" in ex) != (text is not None):
      raise ValueError("either every example has 'text' or none does")
    n, k = len(ex["tokens"]), segments[r]
    if used[r] + n > seq_len or k >= max_segments:
      raise ValueError(f"row {r} overflows: {used[r] + n} tokens / {k + 1} examples for L={seq_len}, K={max_segments}")
    span = slice(used[r], used[r] + n)
    batch.tokens[r, span] = ex["tokens"]
    p.positions[r, span] = ex["positions"]
    p.segment_ids[r, span] = k + 1
    p.grid[r, k] = ex["grid"]
    p.labels[r, k] = ex["label"]
    if text is not None:
      s = len(text)
      p.cond[r, k * s : (k + 1) * s] = ex["text"]
      p.cond_segment_ids[r, k * s : (k + 1) * s] = k + 1
    used[r] += n
    segments[r] += 1
  return batch


def unpack(batch: PackedBatch) -> list[dict]:
  """Per-example dicts (tokens, positions, grid, label[, text]), row-major, segment order."""
  examples, p = [], batch.packing
  if p.cond is not None:
    text_len = p.cond.shape[1] // p.grid.shape[1]
  for r, seg_row in enumerate(np.asarray(p.segment_ids)):
    for k in range(1, int(seg_row.max(initial=0)) + 1):
      mask = seg_row == k
      ex = {
          "tokens": np.asarray(batch.tokens[r])[mask],
          "positions": np.asarray(p.positions[r])[mask],
          "grid": np.asarray(p.grid[r, k - 1]),
          "label": int(p.labels[r, k - 1]),
      }
      if p.cond is not None:
        ex["text"] = np.asarray(p.cond[r, (k - 1) * text_len : k * text_len])
      examples.append(ex)
  return examples
