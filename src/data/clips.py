"""Fixed-shape clip batches, for the consumers that need pixels rather than tokens:
VAE training (`task: vae`) and DiT training that encodes with the VAE inside the step.

    source -> this host's shard -> shuffle(seed) -> repeat -> decode (uint8 clip, or a
    skip marker) -> caption embedding [-> workers] -> count and drop the skipped ->
    rows -> batch, uint8 pixels to float32       [main process; state = position + counts]

Every clip has the configured (frames, height, width): pixels are fixed-shape here;
variable shapes go through the latent cache and the packing pipeline instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grain
import numpy as np

from src.config import DataConfig
from src.data.pipeline import SkipCounter, Throughput, allow_unparsed_absl_flags, host_stream
from src.data.sources import caption_tokens
from src.data.video import DECODE_SEED_OFFSET, ClipDecoder, to_unit_range


@dataclass(frozen=True)
class ToClip:
  text_len: int
  cond_dim: int
  shape: tuple[int, int, int]
  text_encoder: str = "precomputed"

  def __call__(self, record: dict) -> dict:
    if "skip" in record:
      return record  # counted after the workers
    video = record["video"]  # uint8 pixels stay so until after the workers (`_unit_range_video`)
    video = video if video.dtype == np.uint8 else np.asarray(video, np.float32)
    if video.shape[:3] != self.shape:
      raise ValueError(f"clip of shape {video.shape[:3]}; fixed-shape batches need {self.shape} "
                       "(set data.area=0, or encode variable shapes with src.encode)")
    out = {"video": video, "labels": np.asarray([record["label"]], np.int32)}
    if self.cond_dim:
      out["cond"] = caption_tokens(record, self.text_len, self.cond_dim, self.text_encoder)
      out["cond_segment_ids"] = np.ones(self.text_len, np.int32)
    return out


def _stack(clips: list[dict]) -> dict:
  """Rows -> batch, video float32 in [-1, 1]. The rows' videos are uint8 pixels from a
  decoded file or float clips (the synthetic source), possibly mixed."""
  videos = [c["video"] for c in clips]
  if all(v.dtype == np.uint8 for v in videos):
    video = to_unit_range(np.stack(videos))
  else:
    video = np.stack([to_unit_range(v) for v in videos])
  return {"video": video, **{k: np.stack([c[k] for c in clips]) for k in clips[0] if k != "video"}}


class _ClipBatches(grain.DatasetIterator):
  """Batches of `rows` usable clips, built in the main process: the skip markers that
  come through the workers are counted (`skip_counts()`, saved with the position), so
  the counts are exact for any worker count, and the workers ship uint8 pixels (a
  quarter of float32's bytes) that become float32 here."""

  def __init__(self, parent, rows: int, log_every: int = 0):
    super().__init__(parent)
    self._rows = rows
    self._skips = SkipCounter()
    self._meter = Throughput(log_every)

  def __next__(self) -> dict:
    start = time.perf_counter()
    batch = _stack([self._skips.next_usable(self._parent)[1] for _ in range(self._rows)])
    self._meter.add(self._rows, time.perf_counter() - start, self._skips.counts)
    return batch

  def skip_counts(self) -> dict[str, int]:
    return dict(self._skips.counts)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "next_index": self._skips.position,
            "skipped": dict(self._skips.counts)}

  def set_state(self, state: dict) -> None:
    if "next_index" not in state:
      raise ValueError("this checkpoint's data position was saved by an older clip pipeline (grain's own "
                       "batch state), which cannot be resumed exactly; start a new workdir, or load its "
                       "weights with src.sample.load_run")
    self._parent.set_state(state["parent"])
    self._skips = SkipCounter(state["next_index"], state["skipped"])


def make_clip_iterator(data_cfg: DataConfig, cond_dim: int, seed: int, process_index: int = 0,
                       process_count: int = 1, split: str = "train", spatial_multiple: int = 1,
                       text_encoder: str = "precomputed"):
  """Endless iterator of {'video' [B, T, H, W, C], 'labels' [B, 1] (+ 'cond', 'cond_segment_ids')}.
  Its `skip_counts()` gives the records skipped so far, by reason; a source with no
  usable record among the first `data.probe_records` fails here, at start-up."""
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by {process_count} processes")
  if data_cfg.area > 0:
    raise ValueError("pixel batches (task vae, or the DiT encoding in the step) need fixed-shape clips: "
                     "data.area=0. For mixed shapes write a latent cache with python -m src.encode and "
                     "train with data.source=latents.")
  # An image is a still clip of the batches' length.
  decoder = ClipDecoder.from_config(data_cfg, spatial_multiple, frame_multiple=data_cfg.frames, uint8=True)
  records = host_stream(data_cfg, seed, spatial_multiple, split, process_index, process_count, probe_with=decoder)
  clips = records.random_map(decoder, seed=seed + DECODE_SEED_OFFSET)  # decoded after the shuffle: new crops each epoch
  clips = clips.map(ToClip(data_cfg.text_len, cond_dim, (data_cfg.frames, data_cfg.height, data_cfg.width), text_encoder))
  rows = data_cfg.batch_size // process_count
  buffer = max(1, data_cfg.prefetch * rows)  # clips read ahead per process
  ds = clips.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer))
  if data_cfg.num_workers > 0:
    allow_unparsed_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return _ClipBatches(iter(ds), rows, data_cfg.log_every)
