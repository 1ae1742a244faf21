"""The data contract: what a batch is, built in one place and shaped from the config.

Dimensions: B rows, L tokens per row, K examples per row (segments), P patch values
(pt * ph * pw * C), S conditioning tokens per example, Dc their width.

- `PackedBatch`: what the DiT trains on. Rows of L spacetime-patch tokens from clips of
  any size, `tokens` (the clean latents, from which the objective makes the noisy input
  and the target) and `packing`: everything else the model reads. The model is called
  with the noisy tokens, the time and `packing`, never with the clean tokens.
- `ClipBatch`: fixed-shape pixel clips, for the VAE and for a DiT that encodes pixels
  with a frozen VAE inside the step (which turns them into a `PackedBatch`).

Both are pytrees (flax struct dataclasses) of numpy arrays on the host and of global
jax arrays on the mesh; `shapes(cfg)` gives their `ShapeDtypeStruct`s from the config
alone, so a step compiles, and `src.aot` costs it, before any data is read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import jax
import numpy as np
from flax import struct

if TYPE_CHECKING:
  from src.config import Config, DataConfig

PAD_SEGMENT = 0  # segment id of padding tokens
NO_LABEL = -1  # the label of an example without one (and of empty slots)
TEXT_PAD = -1  # token id past a caption's end (umT5 ids; the encoder masks it)


@struct.dataclass
class Packing:
  """Where each token of a packed row sits and what its example is conditioned on."""

  segment_ids: jax.Array  # [B, L] int32: 1..K for the examples of a row, 0 = padding
  positions: jax.Array  # [B, L, 3] int32: (t, h, w) patch coordinates inside its own example
  grid: jax.Array  # [B, K, 3] int32: (T', H', W') patch grid of each example; 0 for empty slots
  labels: jax.Array  # [B, K] int32: class labels, -1 = none
  cond: jax.Array | None = None  # [B, K*S, Dc] float embeddings, or [B, K*S] int32 byte ids
  cond_segment_ids: jax.Array | None = None  # [B, K*S] int32: which example a cond token belongs to


@struct.dataclass
class PackedBatch:
  tokens: jax.Array  # [B, L, P] float32 clean latent patches
  packing: Packing

  @property
  def rows(self) -> int:
    return self.tokens.shape[0]

  @staticmethod
  def shapes(cfg: Config, rows: int | None = None) -> PackedBatch:
    """Shapes of a batch of `rows` rows (default: the global data.batch_size)."""
    m, rows = cfg.model, cfg.data.batch_size if rows is None else rows
    seq_len, slots = row_shape(cfg.data, m.patch)
    i32 = lambda *shape: jax.ShapeDtypeStruct((rows, *shape), np.int32)
    cond = cond_ids = None
    if m.cond_dim:
      s = slots * cfg.data.text_len
      cond = i32(s) if captions_as_ids(cfg) else jax.ShapeDtypeStruct((rows, s, m.cond_dim), np.float32)
      cond_ids = i32(s)
    packing = Packing(segment_ids=i32(seq_len), positions=i32(seq_len, 3), grid=i32(slots, 3), labels=i32(slots),
                      cond=cond, cond_segment_ids=cond_ids)
    patch_dim = math.prod(m.patch) * m.in_channels
    return PackedBatch(tokens=jax.ShapeDtypeStruct((rows, seq_len, patch_dim), np.float32), packing=packing)


@struct.dataclass
class ClipBatch:
  video: jax.Array  # [B, T, H, W, C] float32 in [-1, 1]
  labels: jax.Array  # [B, 1] int32
  cond: jax.Array | None = None  # [B, S, Dc] float embeddings, or [B, S] int32 byte ids
  cond_segment_ids: jax.Array | None = None  # [B, S] int32, all 1

  @property
  def rows(self) -> int:
    return self.video.shape[0]

  @staticmethod
  def shapes(cfg: Config, rows: int | None = None, text: bool = True) -> ClipBatch:
    """Shapes of a batch of `rows` clips (default: the global data.batch_size); with
    `text`, the caption tokens of a caption-conditioned DiT."""
    d, m = cfg.data, cfg.model
    rows = d.batch_size if rows is None else rows
    video = jax.ShapeDtypeStruct((rows, d.frames, d.height, d.width, d.channels), np.float32)
    batch = ClipBatch(video=video, labels=jax.ShapeDtypeStruct((rows, 1), np.int32))
    if not (text and m.cond_dim):
      return batch
    ids = jax.ShapeDtypeStruct((rows, d.text_len), np.int32)
    cond = ids if captions_as_ids(cfg) else jax.ShapeDtypeStruct((rows, d.text_len, m.cond_dim), np.float32)
    return batch.replace(cond=cond, cond_segment_ids=ids)


def captions_as_ids(cfg: Config) -> bool:
  """Whether batches carry caption token ids (for the byte encoder, or for the frozen
  umT5 that encodes them in the step) rather than embeddings (the stand-in, or a latent
  cache's umT5 embeddings)."""
  encoder = cfg.model.text_encoder
  return encoder == "bytes" or (encoder == "umt5" and cfg.data.source != "latents")


def row_shape(data_cfg: DataConfig, patch: Sequence[int]) -> tuple[int, int]:
  """(L, K) of packed rows. seq_len == 0: one example of the configured shape per row, no padding."""
  if data_cfg.seq_len > 0:
    return data_cfg.seq_len, data_cfg.max_segments
  grid = (data_cfg.frames, data_cfg.height, data_cfg.width)
  return math.prod(g // p for g, p in zip(grid, patch)), 1

