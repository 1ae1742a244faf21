"""umT5 captions as the DiT sees them: token ids -> embeddings, the way Wan 2.1 uses
them, and the null caption of classifier-free guidance.

Wan encodes a caption padded to `text_len` tokens with its attention mask, keeps the
last hidden state of the caption's own tokens (EOS included) and sets the rest to zero
(`WanPipeline._get_t5_prompt_embeds`); the DiT then cross-attends to all `text_len`
slots, zeros included. The same function runs in the train step (captions without a
cache), in `src.encode` (which stores the embedding trimmed to the caption's tokens)
and in the sampler, so all three give the same numbers. The null caption is the empty
prompt's embedding (EOS alone), as Wan's training and its default negative prompt use.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from src.batch import TEXT_PAD
from src.config import TextConfig
from src.state import Frozen

TOKENIZER_DIR = "tokenizer"  # beside `text_encoder/` in the Wan 2.1 diffusers repositories


def tokenizer_dir(text: TextConfig) -> str:
  """`text.tokenizer`, else the tokenizer beside the checkpoint: `<root>/tokenizer` of a
  model root, the checkpoint directory itself, or its sibling `../tokenizer`."""
  if text.tokenizer:
    return text.tokenizer
  ckpt = Path(text.checkpoint)
  for candidate in (ckpt / TOKENIZER_DIR, ckpt.parent / TOKENIZER_DIR):
    if candidate.is_dir():
      return str(candidate)
  return str(ckpt)


def encode_captions(text: Frozen, ids: jax.Array, text_len: int) -> jax.Array:
  """ids [B, N] int32 (N = captions x text_len; `TEXT_PAD` past each caption's end)
  -> embeddings [B, N, D] float32, zero past each caption's end."""
  b, n = ids.shape
  rows = ids.reshape(b * n // text_len, text_len)  # one caption a row
  mask = rows != TEXT_PAD
  hidden = text.model()(jnp.where(mask, rows, 0), mask.astype(jnp.int32))  # [B*K, S, D]
  hidden = jnp.where(mask[..., None], hidden.astype(jnp.float32), 0.0)
  return jax.lax.stop_gradient(hidden).reshape(b, n, -1)


def drop_captions(cond: jax.Array, drop: jax.Array, null: jax.Array) -> jax.Array:
  """Classifier-free guidance dropout of umT5 captions: the caption tokens [B, K*S, D]
  of the dropped examples (drop [B, K] bool; example k owns slots [k*S, (k+1)*S), as
  `patch.pack_rows` lays them out) become the null caption `null` [S, D]."""
  text_len = null.shape[0]
  dropped = jnp.repeat(drop, text_len, axis=1)  # [B, K*S]
  return jnp.where(dropped[..., None], jnp.tile(null, (drop.shape[1], 1)), cond)
