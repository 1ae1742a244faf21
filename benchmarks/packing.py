"""Padding of NaViT-style packing vs per-shape bucketing on a realistic mixed stream.

    python -m benchmarks.packing [--examples 20000] [--seq-len 8448 9216 ...] [--out FILE]

The stream: a 256px-class area budget
(256x256 pixels -> 32x32 latents with an 8x VAE, 2x2 patches), aspect ratios from 9:16
to 16:9, clips of 1 to 33 latent frames, plus 20% images. Sizes are drawn with the
project's own `SizeSampler` and packed with the trainer's own `plan_rows` (the
decision the grain packer makes each batch), so the numbers are those of training.

Baselines on the same stream and the same tokens per step (rows x L):
- `pad_to_max`: one example per row, padded to the largest example (one program);
- `buckets`: Open-Sora-style batches of one (T, H, W) shape each, as many as fit the
  step's token budget; the waste is the budget left unused, and every distinct shape
  is a distinct compiled program.
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys

import numpy as np

from src.config import DataConfig
from src.data.sizes import SizeSampler, tokens_of
from src.models.patch import plan_rows

VAE_STRIDE = 8
PATCH = (1, 2, 2)
PIXEL_AREA = 256 * 256
ASPECTS = [9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9]


def stream(n: int, seed: int) -> list[tuple[int, int, int]]:
  cfg = DataConfig(area=PIXEL_AREA // VAE_STRIDE**2, aspect_ratios=ASPECTS, frame_counts=list(range(1, 34)),
                   image_fraction=0.2)
  sample = SizeSampler.from_config(cfg, multiple=PATCH[1])
  rng = np.random.default_rng(seed)
  return [sample(rng) for _ in range(n)]


def packed_steps(sizes: list[int], seq_len: int, rows: int, max_segments: int, buffer: float, max_wait: int):
  """The grain packer's loop (`_PackIterator._next_batch`) on sizes alone: per batch, the
  waiting (size, batches waited) pairs and the row `plan_rows` gives each (-1: waits)."""
  pending: list[tuple[int, int]] = []  # (size, batches waited)
  it = iter(sizes)
  while True:
    while sum(s for s, _ in pending) < buffer * rows * seq_len or len(pending) < rows:
      nxt = next(it, None)
      if nxt is None:
        break
      pending.append((nxt, 0))
    else:
      nxt = 0
    if nxt is None:  # only measure full buffers: the stream's tail is an artefact
      return
    placed = plan_rows([s for s, _ in pending], [w for _, w in pending], seq_len, max_segments, rows, max_wait)
    yield pending, placed
    pending = [(s, w + 1) for (s, w), r in zip(pending, placed) if r < 0]


def packed_padding(sizes: list[int], seq_len: int, rows: int, max_segments: int, buffer: float, max_wait: int) -> dict:
  real = total = steps = 0
  waits = []
  for pending, placed in packed_steps(sizes, seq_len, rows, max_segments, buffer, max_wait):
    real += sum(s for (s, _), r in zip(pending, placed) if r >= 0)
    waits += [w for (_, w), r in zip(pending, placed) if r >= 0]
    total += rows * seq_len
    steps += 1
  return dict(padding=1 - real / total, steps=steps, mean_wait=float(np.mean(waits)), max_wait=int(np.max(waits)))


def bucket_padding(shapes: list[tuple[int, int, int]], budget: int) -> dict:
  counts = collections.Counter(shapes)
  used = total = 0
  for shape, n in counts.items():
    size = tokens_of(shape, PATCH)
    per_batch = max(1, budget // size)
    batches = math.ceil(n / per_batch)  # a thin bucket still costs whole batches
    used += n * size
    total += batches * budget
  return dict(padding=1 - used / total, programs=len(counts))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--examples", type=int, default=20000)
  p.add_argument("--seq-len", type=int, nargs="+", default=[8448, 9216, 12288, 16896])
  p.add_argument("--rows", type=int, default=8, help="rows per host batch")
  p.add_argument("--max-segments", type=int, default=48)
  p.add_argument("--buffer", type=float, nargs="+", default=[2.0], help="data.pack_buffer: batches of tokens buffered")
  p.add_argument("--max-wait", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="append the JSON lines to this file too")
  args = p.parse_args(argv)

  shapes = stream(args.examples, args.seed)
  sizes = [tokens_of(s, PATCH) for s in shapes]
  lines = []
  for seq_len, buffer in [(s, b) for s in args.seq_len for b in args.buffer]:
    packed = packed_padding(sizes, seq_len, args.rows, args.max_segments, buffer, args.max_wait)
    result = dict(
        bench="packing", examples=args.examples, seq_len=seq_len, rows=args.rows, max_segments=args.max_segments,
        buffer=buffer, largest_example=max(sizes), mean_example=float(np.mean(sizes)),
        packed_padding=round(packed["padding"], 4), packed_mean_wait=round(packed["mean_wait"], 2),
        packed_max_wait=packed["max_wait"], packed_programs=1,
        pad_to_max_padding=round(1 - float(np.mean(sizes)) / max(sizes), 4),
        **{f"bucket_{k}": (round(v, 4) if isinstance(v, float) else v)
           for k, v in bucket_padding(shapes, args.rows * seq_len).items()},
    )
    lines.append(json.dumps(result))
    print(lines[-1], flush=True)
  append_lines(lines, args.out)
  return 0


def append_lines(lines: list[str], path: str | None) -> None:
  """Append the printed JSON lines to `path` (--out), if given."""
  if path:
    with open(path, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
