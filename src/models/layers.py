"""Small NNX layers whose parameters carry logical axis names.

Every parameter is created with its logical names in shape order
(`nnx.Param(value, out_sharding=names)`) and a `decay` mark, Variable metadata that
`optim.decay_mask` reads: projection and conv kernels take weight decay, nothing else
does. Placement is not done eagerly per variable: `state.create_model` jits the whole
constructor with out shardings derived from these names and the rules table, so
parameters are born sharded, and a model can still be built outside any mesh (tests,
conversion scripts). Parameters are float32; a layer computes in the `dtype` it is
given (bf16 on accelerators).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from src.lora import RANK_AXIS, LoRAParam
from src import fsdp

Names = Sequence[str | None]
zeros = nnx.initializers.zeros_init()


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Names, *, decay: bool = False) -> nnx.Param:
  """A float32 parameter with logical axis `names`. `decay` marks it for AdamW's
  weight decay: set where the parameter is made, so the rule never depends on what
  the attribute happens to be called."""
  assert len(shape) == len(names), (shape, names)
  value = init(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, decay=decay)


def gather_to_tokens(per_example: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, K, ...] per-example values -> [B, L, ...] per token (padding reads slot 0,
  and is masked downstream).

  Floats go through a one-hot contraction over K, not a gather or a broadcast: its
  backward is another small matmul, where a gather's is a scatter-add (serial on
  CPU), and its output is a materialised tensor. A broadcast (K = 1) or gather fuses
  into its consumers, and in the DiT's backward pass XLA:CPU then fused the residual
  stream's gradient of all layers into a few loops that recompute each other (an
  unrolled depth-12 step ran 3x slower than with the contraction, measured).
  """
  k = per_example.shape[1]
  idx = jnp.maximum(segment_ids - 1, 0)  # [B, L]
  if not jnp.issubdtype(per_example.dtype, jnp.floating):
    return jax.vmap(lambda v, i: v[i])(per_example, idx)
  onehot = (idx[..., None] == jnp.arange(k)).astype(per_example.dtype)  # [B, L, K]
  # HIGHEST: exact on TPU too, where a float32 dot defaults to one bf16 pass.
  return jnp.einsum("blk,bk...->bl...", onehot, per_example, precision=jax.lax.Precision.HIGHEST)


def gather_frames_to_tokens(per_frame: jax.Array, segment_ids: jax.Array, frame_ids: jax.Array) -> jax.Array:
  """[B, K, F, ...] values per (example, frame) slot -> [B, L, ...] per token; `frame_ids`
  [B, L] is each token's patch frame inside its example. Slots are numbered as segments
  are (1 + (segment - 1) F + frame; 0 = padding), so F = 1 is `gather_to_tokens`."""
  b, k, f = per_frame.shape[:3]
  slots = jnp.where(segment_ids > 0, (segment_ids - 1) * f + jnp.clip(frame_ids, 0, f - 1) + 1, 0)
  return gather_to_tokens(per_frame.reshape(b, k * f, *per_frame.shape[3:]), slots)


def to_tokens(values: jax.Array, segment_ids: jax.Array, frame_ids: jax.Array | None = None) -> jax.Array:
  """Per-example values [B, K, ...] (`frame_ids` None) or per-frame values [B, K, F, ...]
  -> [B, L, ...] per token."""
  return gather_to_tokens(values, segment_ids) if frame_ids is None else gather_frames_to_tokens(
      values, segment_ids, frame_ids)

class Dense(nnx.Module):
  """x [..., *in_shape] -> [..., *out_shape]: a tensordot over the trailing in-dims.

  Multi-dimensional in/out shapes let q/k/v keep a separate heads axis
  ([embed, heads, head_dim]) so tensor parallelism never splits a fused axis.
  `lora` = (rank, scale, dropout): a low-rank adapter x -> s (x A) B next to the
  kernel (`src.lora`: A random, B zero, so the layer starts as it was).
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Names, *,
               rngs: nnx.Rngs, use_bias: bool = True, zero_init: bool = False,
               dtype=jnp.float32, lora: tuple[int, float, float] = (0, 1.0, 0.0)):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    n_in, n_out = len(in_shape), len(out_shape)
    fan_in_init = nnx.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    self.kernel = param(rngs, zeros if zero_init else fan_in_init, in_shape + out_shape, names, decay=True)
    self.bias = param(rngs, zeros, out_shape, names[n_in:]) if use_bias else None
    self.n_in = n_in
    self.names = tuple(names)
    self.dtype = dtype
    rank, self.lora_scale, self.lora_dropout = lora
    if not rank:
      self.lora_a = self.lora_b = None
    else:
      a_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=n_in)
      self.lora_a = LoRAParam(a_init(rngs.params(), in_shape + (rank,), jnp.float32),
                              out_sharding=tuple(names[:n_in]) + (RANK_AXIS,), eager_sharding=False, decay=True)
      self.lora_b = LoRAParam(jnp.zeros((rank,) + out_shape, jnp.float32),
                              out_sharding=(RANK_AXIS,) + tuple(names[n_in:]), eager_sharding=False, decay=True)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key`: the adapter's dropout (training only; None: none)."""
    x = x.astype(self.dtype)
    y = fsdp.dot(x, self.kernel[...].astype(self.dtype), self.names, self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      if key is not None and self.lora_dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
      h = jnp.tensordot(x, self.lora_a[...].astype(self.dtype), axes=self.n_in)  # [..., r]
      y = y + self.lora_scale * jnp.tensordot(h, self.lora_b[...].astype(self.dtype), axes=1)
    return y


class Embed(nnx.Module):
  """Lookup table [num, D]."""

  def __init__(self, num: int, dim: int, names: Names, *, rngs: nnx.Rngs):
    self.table = param(rngs, nnx.initializers.normal(0.02), (num, dim), names)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], ids, axis=0)


class RMSNorm(nnx.Module):
  """RMS norm over the trailing `len(shape)` dims, with a learned scale of that shape."""

  def __init__(self, shape: Sequence[int], names: Names, *, eps: float, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones_init(), tuple(shape), names)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(-self.scale.ndim, 0))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free LayerNorm over the last dim, computed in float32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last dim with learned scale and bias."""

  def __init__(self, dim: int, names: Names, *, eps: float, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), names)
    self.bias = param(rngs, zeros, (dim,), names)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps).astype(jnp.float32) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)
