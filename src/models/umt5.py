"""The T5 v1.1 / umT5 text encoder (Wan 2.1's caption encoder) in Flax NNX.

Dimensions: B captions, L tokens, D width (d_model), N heads, Dh head dim (d_kv),
F FFN width (d_ff), V vocabulary, R relative-position buckets.

Follows T5 v1.1 (Raffel et al. 2020, with the v1.1 gated-GELU FFN of Shazeer 2020)
and umT5 (Chung et al. 2023), matching transformers' `T5EncoderModel` and
`UMT5EncoderModel` so that their weights map onto it (`src/text_encoder.py`):
pre-norm blocks; an RMS norm without mean subtraction or bias (T5LayerNorm, in
float32); attention without the 1/sqrt(Dh) scaling (T5 folds it into q's
initialisation); a learned relative position bias over bidirectional log-spaced
buckets, added to the logits (umT5: every layer has its own table; T5 v1.1: layer
0's table, shared by all layers); a gated-GELU FFN (tanh approximation, HF's
"gelu_new"); no biases anywhere; a final norm.

Numerics: parameters are float32 and the matmuls run in `cfg.dtype`; the residual
stream, the norms, the logits and the softmax stay float32. transformers in bf16 keeps
`wo` in float32 (`_keep_in_fp32_modules`), so its residual stream is float32 after
the first FFN too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from src.mesh import constrain
from src.models.attention import MASK_VALUE, ULYSSES_LAYOUT as ATTN_LAYOUT  # q/k/v/out, as the DiT's
from src.models.layers import Dense, Embed, RMSNorm, param

MODEL_TYPES = ("umt5", "t5")  # umt5: a bias table per layer; t5 (v1.1): layer 0's, shared
FEED_FORWARD = "gated-gelu"  # T5 v1.1 and umT5; the original T5's "relu" FFN is not supported
# The config.json keys `from_hf` reads (all are written by transformers' save_pretrained).
HF_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
           "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "model_type")
HF_ARCHITECTURES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}
ACT = ("act_batch", "act_seq", "act_embed")
BIAS_INIT_STD = 0.02  # the random init only matters for tests and smoke runs


@dataclass(frozen=True)
class UMT5Config:
  """Encoder sizes (defaults: umT5-XXL, the Wan 2.1 text encoder) and the compute dtype."""

  vocab_size: int = 256384  # V
  d_model: int = 4096  # D
  d_kv: int = 64  # Dh
  d_ff: int = 10240  # F
  num_layers: int = 24
  num_heads: int = 64  # N
  relative_attention_num_buckets: int = 32  # R: half for keys before the query, half after
  relative_attention_max_distance: int = 128  # distances >= this share the last bucket
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = FEED_FORWARD
  model_type: str = "umt5"
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
  remat: bool = False  # jax.checkpoint around each layer (only matters when differentiating)

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r}: only {MODEL_TYPES} encoders are supported.")
    if self.feed_forward_proj != FEED_FORWARD:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: only {FEED_FORWARD!r} "
                       "(T5 v1.1, umT5) is supported.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r}: float32 or bfloat16.")

  @property
  def per_layer_bias(self) -> bool:
    """umT5 learns a position-bias table in every layer; T5 v1.1 only in layer 0."""
    return self.model_type == "umt5"

  @staticmethod
  def from_hf(config: dict, **runtime) -> UMT5Config:
    """The sizes in a transformers config.json (as a dict); `runtime`: dtype, remat.
    HF's own "dtype" key is the stored weights' dtype, not a compute dtype: ignored."""
    missing = [k for k in HF_KEYS if k not in config]
    if missing:
      raise ValueError(f"config.json: missing key(s) {missing} of a T5/umT5 encoder config.")
    return UMT5Config(**{k: config[k] for k in HF_KEYS}, **runtime)

  def to_hf(self) -> dict:
    """The config.json of `from_hf`'s inverse, loadable by transformers."""
    sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in HF_KEYS}
    return dict(architectures=[HF_ARCHITECTURES[self.model_type]], **sizes, dtype="float32")  # stored weights' dtype


def relative_position_bucket(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of relative positions (key - query) -> int32 in [0, R).

  Half the buckets are for keys after the query. In each half, distances below a
  quarter of R get a bucket each, and larger ones log-spaced buckets up to
  `max_distance`. The float32 arithmetic is transformers' op for op, so the
  truncation lands on the same side at the bucket edges. It runs on the host (numpy)
  while tracing: the buckets are a constant of the program, and no accelerator's
  `log` can move an edge.
  """
  half = num_buckets // 2
  max_exact = half // 2
  n = np.abs(rel)
  ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
  log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
  large = np.minimum(max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int32), half - 1)
  return ((rel > 0) * half + np.where(n < max_exact, n, large)).astype(np.int32)


def position_bias(table: jax.Array, buckets: jax.Array) -> jax.Array:
  """Bias table [R, N] and buckets [L, L] -> float32 logits bias [1, N, L, L]."""
  return jnp.transpose(jnp.take(table, buckets, axis=0), (2, 0, 1))[None]


def bias_table(cfg: UMT5Config, rngs: nnx.Rngs) -> nnx.Param:
  """A relative-position bias table [R, N]: one logit offset per bucket and head."""
  shape = (cfg.relative_attention_num_buckets, cfg.num_heads)
  return param(rngs, nnx.initializers.normal(BIAS_INIT_STD), shape, ("rel_buckets", "heads"))


@struct.dataclass
class Context:
  """What every layer reads, built once per call."""

  mask: jax.Array  # [B, 1, 1, L] float32: 0 for real keys, MASK_VALUE for padding
  buckets: jax.Array  # [L, L] int32 relative-position buckets
  shared_bias: jax.Array | None = None  # [1, N, L, L]: T5 v1.1's layer-0 bias, reused by every layer


class Attention(nnx.Module):
  """T5 self-attention: separate q/k/v/o projections, no biases, no logit scaling."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    d, n, dh, dt = cfg.d_model, cfg.num_heads, cfg.d_kv, jnp.dtype(cfg.dtype)
    proj = lambda: Dense((d,), (n, dh), ("embed", "heads", "head_dim"), rngs=rngs, use_bias=False, dtype=dt)
    self.q, self.k, self.v = proj(), proj(), proj()
    self.o = Dense((n, dh), (d,), ("heads", "head_dim", "embed"), rngs=rngs, use_bias=False, dtype=dt)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [B, L, D], bias [B, N, L, L] float32 (position bias + mask) -> [B, L, D]."""
    q, k, v = (constrain(p(x), ATTN_LAYOUT) for p in (self.q, self.k, self.v))  # [B, L, N, Dh]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) + bias  # [B, N, L, L]
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return self.o(constrain(out.astype(v.dtype), ATTN_LAYOUT))


class Block(nnx.Module):
  """Pre-norm self-attention and gated-GELU FFN, each added to the float32 residual."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    d, f, dt, eps = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    self.attn_norm = RMSNorm((d,), ("embed",), eps=eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.rel_bias = bias_table(cfg, rngs) if cfg.per_layer_bias else None
    self.ffn_norm = RMSNorm((d,), ("embed",), eps=eps, rngs=rngs)
    self.wi_0 = Dense((d,), (f,), ("embed", "mlp"), rngs=rngs, use_bias=False, dtype=dt)  # gate (GELU)
    self.wi_1 = Dense((d,), (f,), ("embed", "mlp"), rngs=rngs, use_bias=False, dtype=dt)  # linear
    self.wo = Dense((f,), (d,), ("mlp", "embed"), rngs=rngs, use_bias=False, dtype=dt)

  def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
    """x [B, L, D] float32 -> [B, L, D] float32."""
    bias = ctx.shared_bias if self.rel_bias is None else position_bias(self.rel_bias[...], ctx.buckets)
    x = x + self.attn(self.attn_norm(x), bias + ctx.mask)
    y = self.ffn_norm(x)
    h = jax.nn.gelu(self.wi_0(y), approximate=True) * self.wi_1(y)  # [B, L, F]
    x = x + self.wo(constrain(h, ("act_batch", "act_seq", "act_mlp")))
    return constrain(x, ACT)


class UMT5Encoder(nnx.Module):
  """Token ids [B, L] and attention mask [B, L] -> last hidden state [B, L, D] float32."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs)
    self.rel_bias = None if cfg.per_layer_bias else bias_table(cfg, rngs)  # T5 v1.1: one, shared

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = stack(rngs)
    self.final_norm = RMSNorm((cfg.d_model,), ("embed",), eps=cfg.layer_norm_epsilon, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids [B, L] int32; attention_mask [B, L], nonzero for real tokens. Padded
    keys get MASK_VALUE (finite, like transformers' dtype minimum); padded queries are
    computed as usual, and callers drop them."""
    cfg = self.cfg
    x = constrain(self.embed(input_ids), ACT)  # [B, L, D] float32
    length = input_ids.shape[1]
    by_offset = relative_position_bucket(np.arange(1 - length, length), cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance)  # [2L - 1]: key - query + L - 1
    positions = jnp.arange(length)
    buckets = jnp.asarray(by_offset)[positions[None, :] - positions[:, None] + length - 1]  # [L, L]
    mask = jnp.where(attention_mask[:, None, None, :] != 0, 0.0, MASK_VALUE).astype(jnp.float32)  # [B, 1, 1, L]
    ctx = Context(mask=mask, buckets=buckets)
    if self.rel_bias is not None:
      ctx = ctx.replace(shared_bias=position_bias(self.rel_bias[...], buckets))
    return self.final_norm(self.apply_blocks(x, ctx)).astype(jnp.float32)

  def apply_blocks(self, x: jax.Array, ctx: Context) -> jax.Array:
    """The stacked layers under lax.scan: compile time stays flat in depth."""
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer):
      return nnx.merge(graphdef, layer)(x, ctx), None

    if self.cfg.remat:
      body = jax.checkpoint(body)
    return jax.lax.scan(body, x, stacked)[0]
