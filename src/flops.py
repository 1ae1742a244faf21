"""Exact model FLOPs of the DiT: what MFU divides by (`src.bench`), checked against
XLA's cost analysis in the tests.

Counted: matmul FLOPs (2 per multiply-add). Not counted: elementwise work (norms,
softmax, RoPE, gelu, modulation) and embedding lookups.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from src.config import ModelConfig
from src.models.dit import NUM_MODULATIONS, dimensions, mlp_width

def forward_flops(cfg: ModelConfig, tokens_per_example: Sequence[int], cond_tokens: int = 0) -> int:
  """Matmul FLOPs (2 per multiply-add) of one DiT forward over a batch of examples.

  tokens_per_example: the real token count of every example in the batch (padding
  excluded); cond_tokens: conditioning tokens per example when cfg.cond_dim > 0.
  Counted: per token the patch embedding, q/k/v/out, MLP and head; per example the
  time MLP and the shared time projection (they act on one vector per example) and the
  conditioning projections; per layer and example the attention matmuls QK^T and AV,
  4 n^2 D, over the block-diagonal (useful) part only. Elementwise work (norms,
  softmax, RoPE, gelu, modulation) and embedding lookups are not counted.
  """
  depth, width, _ = dimensions(cfg)
  patch_dim = math.prod(cfg.patch) * cfg.in_channels
  hidden = mlp_width(cfg)
  d2 = width * width
  per_token = 2 * patch_dim * width + 2 * width * patch_dim  # patch embed, head
  per_token += depth * (4 * 2 * d2 + 2 * 2 * width * hidden)  # q, k, v, out; fc1, fc2
  per_example = 2 * cfg.freq_dim * width + 2 * d2 + 2 * width * NUM_MODULATIONS * width  # time_in, time_out, time_proj
  total = 0
  for n in tokens_per_example:
    total += n * per_token + per_example + depth * 4 * n * n * width
    if cfg.cond_dim:
      s = cond_tokens
      total += s * (2 * cfg.cond_dim * width + 2 * d2)  # cond_in, cond_out
      total += depth * (2 * 2 * d2 * n + 2 * 2 * d2 * s + 4 * n * s * width)  # q, out; k, v; QK^T, AV
  return total


def train_flops(cfg: ModelConfig, tokens_per_example: Sequence[int], cond_tokens: int = 0) -> int:
  """Forward + backward: the backward pass costs two forwards (input and weight grads)."""
  return 3 * forward_flops(cfg, tokens_per_example, cond_tokens)


def example_tokens(batch) -> list[int]:
  """Real tokens of every example of a packed batch, from its segment ids."""
  seg = np.asarray(batch.packing.segment_ids)
  return [int(c) for row in seg for c in np.bincount(row, minlength=2)[1:] if c > 0]


def umt5_flops(cfg, captions: int, length: int) -> int:
  """Matmul FLOPs of a umT5 encoder forward over `captions` x `length` tokens (a
  `models.umt5.UMT5Config`): q/k/v/o and the gated FFN per token, the score and value
  products per caption, every layer (the embedding is a lookup)."""
  inner = cfg.num_heads * cfg.d_kv
  per_token = 2 * 4 * cfg.d_model * inner + 2 * 3 * cfg.d_model * cfg.d_ff
  return captions * cfg.num_layers * (length * per_token + 2 * 2 * length * length * inner)
