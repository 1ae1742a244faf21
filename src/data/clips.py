"""Fixed-shape clip batches, for the consumers that need pixels rather than tokens:
VAE training (`task: vae`) and DiT training that encodes with the VAE inside the step.

    `pipeline.example_stream`: this host's shard -> shuffle(seed) -> repeat -> decode
    (uint8 clip, or a skip marker) -> `ToClip` (+ caption tokens) [-> workers]
    -> `pipeline.BatchIterator`: count and drop the skipped -> rows -> `ClipBatch`,
    uint8 pixels to float32      [main process; state = position + counts]

Every clip has the configured (frames, height, width): pixels are fixed-shape here;
variable shapes go through the latent cache and the packing pipeline instead. The
stream, the skip counting, the metering and the saved state are the packing
pipeline's (`src.data.pipeline`), so both resume, count and read ahead alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.batch import ClipBatch
from src.config import DataConfig
from src.data.pipeline import BatchIterator, example_stream, host_rows
from src.data.sources import caption_tokens
from src.data.video import ClipDecoder, to_unit_range


@dataclass(frozen=True)
class ToClip:
  """Record -> one row of a clip batch: video [T, H, W, C] (uint8 or float32), labels
  [1] (+ cond [S(, Dc)], cond_segment_ids [S])."""

  text_len: int
  cond_dim: int
  shape: tuple[int, int, int]
  text_encoder: str = "precomputed"
  tokenizer: str = ""  # umT5 tokenizer directory (text_encoder umt5)

  def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
    del rng  # deterministic; the rng is every per-record transform's (`example_stream`)
    if "skip" in record:
      return record  # counted after the workers
    video = record["video"]  # uint8 pixels stay so until after the workers (`_stack`)
    video = video if video.dtype == np.uint8 else np.asarray(video, np.float32)
    if video.shape[:3] != self.shape:
      raise ValueError(f"clip of shape {video.shape[:3]}; fixed-shape batches need {self.shape} "
                       "(set data.area=0, or encode variable shapes with src.encode)")
    out = {"video": video, "labels": np.asarray([record["label"]], np.int32)}
    if self.cond_dim:
      out["cond"] = caption_tokens(record, self.text_len, self.cond_dim, self.text_encoder, self.tokenizer)
      out["cond_segment_ids"] = np.ones(self.text_len, np.int32)
    return out


def _stack(clips: list[dict]) -> ClipBatch:
  """Rows -> batch, video float32 in [-1, 1]. The rows' videos are uint8 pixels from a
  decoded file or float clips (the synthetic source), possibly mixed."""
  videos = [c["video"] for c in clips]
  if all(v.dtype == np.uint8 for v in videos):
    video = to_unit_range(np.stack(videos))
  else:
    video = np.stack([to_unit_range(v) for v in videos])
  stacked = lambda key: np.stack([c[key] for c in clips]) if key in clips[0] else None
  return ClipBatch(video=video, labels=stacked("labels"), cond=stacked("cond"),
                   cond_segment_ids=stacked("cond_segment_ids"))


class _ClipBatches(BatchIterator):
  """Batches of `rows` usable clips, built in the main process. The workers ship uint8
  pixels (a quarter of float32's bytes) that become float32 here; the state is the
  base's, as no clip waits between batches."""

  def __init__(self, parent, rows: int, log_every: int = 0):
    super().__init__(parent, log_every)
    self._rows = rows

  def _next_batch(self) -> tuple[ClipBatch, int]:
    return _stack([self._next_usable()[1] for _ in range(self._rows)]), self._rows


def make_clip_iterator(data_cfg: DataConfig, cond_dim: int, seed: int, process_index: int = 0,
                       process_count: int = 1, split: str = "train", spatial_multiple: int = 1,
                       text_encoder: str = "precomputed", tokenizer: str = "") -> BatchIterator:
  """Endless iterator of `ClipBatch`es of batch_size // process_count clips (cond and
  cond_segment_ids only with cond_dim > 0). Its `skip_counts()` gives the records
  skipped so far, by reason; a source with no usable record among the first
  `data.probe_records` fails here, at start-up."""
  rows = host_rows(data_cfg, process_index, process_count)
  if data_cfg.area > 0:
    raise ValueError("pixel batches (task vae, or the DiT encoding in the step) need fixed-shape clips: "
                     "data.area=0. For mixed shapes write a latent cache with python -m src.encode and "
                     "train with data.source=latents.")
  # An image is a still clip of the batches' length.
  decoder = ClipDecoder.from_config(data_cfg, spatial_multiple, frame_multiple=data_cfg.frames, uint8=True)
  to_clip = ToClip(data_cfg.text_len, cond_dim, (data_cfg.frames, data_cfg.height, data_cfg.width), text_encoder,
                   tokenizer)
  _, ds = example_stream(data_cfg, decoder, to_clip, seed, spatial_multiple, rows, split, process_index,
                         process_count)
  return _ClipBatches(iter(ds), rows, data_cfg.log_every)
