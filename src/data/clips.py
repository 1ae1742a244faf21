"""Fixed-shape clip batches, for the consumers that need pixels rather than tokens:
VAE training (`task: vae`) and DiT training that encodes with the VAE inside the step.

    source -> this host's shard -> shuffle(seed) -> repeat -> clip (+ caption
    embedding) -> batch(rows) [-> workers] -> uint8 pixels to float32
                                                             [grain; state = position]

Every clip has the configured (frames, height, width): pixels are fixed-shape here;
variable shapes go through the latent cache and the packing pipeline instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import grain
import numpy as np

from src.config import DataConfig
from src.data.pipeline import allow_unparsed_absl_flags
from src.data.sources import caption_tokens, clip_source
from src.data.video import to_unit_range


@dataclass(frozen=True)
class ToClip:
  text_len: int
  cond_dim: int
  shape: tuple[int, int, int]
  text_encoder: str = "precomputed"

  def __call__(self, record: dict) -> dict:
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
  """Rows -> batch. The videos stay uint8 if every row's is (they go to float32 after
  the workers, `_unit_range_video`); a mixture of uint8 and float clips is batched as
  float32 in [-1, 1]."""
  videos = [c["video"] for c in clips]
  if any(v.dtype != np.uint8 for v in videos):
    videos = [to_unit_range(v) for v in videos]
  return {"video": np.stack(videos), **{k: np.stack([c[k] for c in clips]) for k in clips[0] if k != "video"}}


def _unit_range_video(batch: dict) -> dict:
  return {**batch, "video": to_unit_range(batch["video"])}


def make_clip_iterator(data_cfg: DataConfig, cond_dim: int, seed: int, process_index: int = 0,
                       process_count: int = 1, split: str = "train", spatial_multiple: int = 1,
                       text_encoder: str = "precomputed"):
  """Endless iterator of {'video' [B, T, H, W, C], 'labels' [B, 1] (+ 'cond', 'cond_segment_ids')}."""
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by {process_count} processes")
  if data_cfg.area > 0:
    raise ValueError("pixel batches (task vae, or the DiT encoding in the step) need fixed-shape clips: "
                     "data.area=0. For mixed shapes write a latent cache with python -m src.encode and "
                     "train with data.source=latents.")
  # Decoded clips or skip markers; an image is a still clip of the batches' length.
  ds = clip_source(data_cfg, seed, spatial_multiple, split, frame_multiple=data_cfg.frames, uint8=True)
  ds = ds[process_index::process_count].shuffle(seed).repeat()
  it = ds.to_iter_dataset().filter(lambda rec: "skip" not in rec)  # bad records: skipped, never fatal
  it = it.map(ToClip(data_cfg.text_len, cond_dim, (data_cfg.frames, data_cfg.height, data_cfg.width), text_encoder))
  it = it.batch(data_cfg.batch_size // process_count, drop_remainder=True, batch_fn=_stack)
  if data_cfg.num_workers > 0:
    allow_unparsed_absl_flags()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(it.map(_unit_range_video))  # in this process: the workers shipped uint8 pixels
