"""Attention work on packed rows: useful vs executed by a full-grid kernel vs block-skipping.

    python -m benchmarks.attention_blocks [--examples 4000] [--seq-len 8448 ...] [--block 128 512]

The stream and the packer are those of benchmarks.packing (the realistic 256px-class
mix of docs/benchmarks.md, packed by the trainer's own `plan_rows`). For every packed
row of self-attention it counts (query, key) pairs:
- useful: pairs within one example, sum of n_i^2 (padding attends nothing useful);
- full: what splash or flash attention with segment ids compute, every block of the
  row, L'^2 with L' the row length rounded up to the block;
- skipping: what `model.attention=flash` computes, the block pairs of
  `src.models.flash.block_runs` (block^2 pairs each).
Attention matmul FLOPs are proportional to pairs (4 x width per pair forward, about 2.5
times that backward), so the ratios are FLOP ratios. Prints one JSON line per
(row length, block).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.packing import PATCH, append_lines, packed_steps, stream
from src.data.sizes import tokens_of
from src.models import flash


def row_segments(step_sizes: list[list[int]], seq_len: int, block: int) -> np.ndarray:
  """Segment ids [rows, L'] of one batch (examples in placement order, padding 0, then the
  kernel's block padding -1, as src.models.attention pads keys)."""
  padded = -(-seq_len // block) * block
  seg = np.full((len(step_sizes), padded), -1, np.int32)
  seg[:, :seq_len] = 0
  for r, sizes in enumerate(step_sizes):
    seg[r, :sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
  return seg


def _pairs(seg: jax.Array, block: int) -> jax.Array:
  (lo, hi), _ = flash.block_runs(seg, seg, block, block)
  return jnp.sum(hi - lo + 1)


def measure(sizes: list[int], seq_len: int, block: int, rows: int, max_segments: int, buffer: float,
            max_wait: int) -> dict:
  useful = full = skipping = 0
  examples = []
  pairs = jax.jit(_pairs, static_argnums=1)
  for pending, placed in packed_steps(sizes, seq_len, rows, max_segments, buffer, max_wait):
    per_row = [[s for (s, _), r in zip(pending, placed) if r == row] for row in range(rows)]
    seg = row_segments(per_row, seq_len, block)
    useful += sum(n * n for row in per_row for n in row)
    full += rows * seg.shape[1] ** 2
    skipping += int(pairs(jnp.asarray(seg), block)) * block * block
    examples += [len(row) for row in per_row]
  return dict(useful_over_full=useful / full, skipping_over_full=skipping / full, skipping_over_useful=skipping / useful,
              examples_per_row=float(np.mean(examples)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--examples", type=int, default=4000)
  p.add_argument("--seq-len", type=int, nargs="+", default=[8448, 12288, 16896, 32760])
  p.add_argument("--block", type=int, nargs="+", default=[128, 512])
  p.add_argument("--rows", type=int, default=8, help="rows per host batch")
  p.add_argument("--max-segments", type=int, default=48)
  p.add_argument("--buffer", type=float, default=2.0)
  p.add_argument("--max-wait", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="append the JSON lines to this file too")
  args = p.parse_args(argv)

  sizes = [tokens_of(s, PATCH) for s in stream(args.examples, args.seed)]
  lines = []
  for seq_len in args.seq_len:
    for block in args.block:
      got = measure(sizes, seq_len, block, args.rows, args.max_segments, args.buffer, args.max_wait)
      lines.append(json.dumps(dict(bench="attention_blocks", examples=args.examples, seq_len=seq_len, block=block,
                                   **{k: round(v, 4) for k, v in got.items()})))
      print(lines[-1], flush=True)
  append_lines(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
