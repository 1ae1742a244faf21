"""Real-data input throughput: decode + frame sampling + resize + patchify + pack, clips/s.

    python -m benchmarks.data [--clips 12] [--batches 8] [--workers 0 1 2]

Writes 256px-class test videos with PyAV into a temporary folder (h264 mp4 and vp9
webm, 2 s at 24/25/30 fps, landscape, portrait and square, smooth moving patterns so
the codecs work as on real footage), builds the folder dataset with the project's own
builder, then times the trainer's own `make_iterator` on it: a 256x256 pixel area
budget at multiples of 16 (8x VAE stride x 2x2 patches), 17-frame clips at 12 fps,
flips, patchified as 16x16 pixel patches. Prints one JSON line per measurement:
`decode_only` (the ClipDecoder alone, in this process), then the pipeline with each
worker count. Timings exclude the first batch (worker start-up and imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from src.config import DataConfig
from src.data.build import build
from src.data.pipeline import make_iterator
from src.data.sources import folder_source
from src.data.video import ClipDecoder

PATCH = (1, 16, 16)  # pixels: an 8x VAE stride times 2x2 latent patches
AREA = 256 * 256
FRAMES = 17  # 1 + 4k, what a causal 4x temporal VAE takes
FPS = 12.0
SECONDS = 2
SHAPES = [(256, 256), (240, 432), (432, 240), (288, 512), (192, 336), (256, 320)]  # (H, W)
RATES = [24, 25, 30]
DECODE_PASSES = 3


def write_clip(path: Path, height: int, width: int, fps: int, seed: int) -> None:
  """Moving sinusoidal colour bands: smooth and textured, like footage, unlike noise."""
  fmt, codec = ("webm", "libvpx-vp9") if path.suffix == ".webm" else ("mp4", "libx264")
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
  with av.open(str(path), "w", format=fmt) as container:
    stream = container.add_stream(codec, rate=fps, options={"deadline": "realtime", "cpu-used": "8"}
                                  if codec == "libvpx-vp9" else {"preset": "veryfast"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for t in range(SECONDS * fps):
      bands = [np.sin((xx * (c + 1) + yy * (2 - c)) / 23.0 + t / 4.0 + phase[c]) for c in range(3)]
      image = ((np.stack(bands, -1) + 1) * 127.5).astype(np.uint8)  # [H, W, 3]
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_dataset(root: Path, clips: int) -> Path:
  src = root / "src"
  src.mkdir()
  rows = []
  for i in range(clips):
    h, w = SHAPES[i % len(SHAPES)]
    name = f"clip{i:03d}.{'webm' if i % 4 == 3 else 'mp4'}"
    write_clip(src / name, h, w, RATES[i % len(RATES)], seed=i)
    rows.append(json.dumps({"file": name, "caption": f"moving bands number {i}", "label": i}))
  (src / "captions.jsonl").write_text("\n".join(rows))
  with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress; stdout holds only JSON lines
    build(str(src), str(src / "captions.jsonl"), str(root / "data"))
  return root / "data"


def data_config(data_dir: Path, workers: int) -> DataConfig:
  tokens = FRAMES * AREA // (PATCH[1] * PATCH[2])
  return DataConfig(source="folder", data_dir=str(data_dir), channels=3, batch_size=2, area=AREA,
                    seq_len=tokens, max_segments=4, frame_counts=[FRAMES], fps=FPS, num_workers=workers,
                    prefetch=2, log_every=0)


def decode_only(data_dir: Path, n: int) -> dict:
  cfg = data_config(data_dir, 0)
  source, decoder = folder_source(str(data_dir), "train"), ClipDecoder.from_config(cfg, PATCH[1])
  records = [source[i % len(source)] for i in range(n)]
  clips = [decoder(r, np.random.default_rng(i)) for i, r in enumerate(records)]  # warm-up
  start = time.perf_counter()
  for rep in range(DECODE_PASSES):
    clips = [decoder(r, np.random.default_rng([rep, i])) for i, r in enumerate(records)]
  elapsed = (time.perf_counter() - start) / DECODE_PASSES
  assert all("video" in c for c in clips), [c.get("skip") for c in clips]
  return {"bench": "decode_only", "clips": n, "clips_per_s": n / elapsed,
          "mean_frame_size": [float(np.mean([c["video"].shape[i] for c in clips])) for i in (1, 2)]}


def pipeline(data_dir: Path, workers: int, batches: int) -> dict:
  it = make_iterator(data_config(data_dir, workers), PATCH, cond_dim=0, seed=0)
  next(it)  # worker start-up, imports, first reads
  start, clips = time.perf_counter(), 0
  for _ in range(batches):
    clips += int((next(it).packing.grid[..., 0] > 0).sum())
  elapsed = time.perf_counter() - start
  it.close()
  return {"bench": "pipeline", "num_workers": workers, "batches": batches, "clips": clips,
          "clips_per_s": clips / elapsed, "batches_per_s": batches / elapsed}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=12, help="test videos to write")
  parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
  machine = {"cpus": os.cpu_count(), "av": av.__version__}
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    data_dir = make_dataset(Path(tmp), args.clips)
    print(json.dumps({"bench": "setup", "clips": args.clips, "seconds": time.perf_counter() - start, **machine}))
    print(json.dumps(decode_only(data_dir, args.clips)), flush=True)
    for workers in args.workers:
      print(json.dumps(pipeline(data_dir, workers, args.batches)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
