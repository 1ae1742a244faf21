"""Attention over packed sequences: masks from segment ids, 3D RoPE, kernel dispatch.

Packing (NaViT, Dehghani et al. 2023) puts several examples in one row; a token
attends only to tokens of its own example (self-attention) and to the conditioning
tokens of its own example (cross-attention). Both rules are one test,
`q_segment == kv_segment`, so one mask builder serves both. Padding (segment 0)
attends to padding, which keeps every softmax row finite and never touches a real
token.

The mask is built once per batch, outside the layer loop, and handed to every layer
as an opaque `Mask`: the XLA path (CPU and GPU) adds a dense bias built from the ids; a TPU
splash kernel needs only the segment ids, which the same object carries.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from src.config import ATTENTION_IMPLS as IMPLS
from src.models import flash
from src.models.flash import MASK_VALUE
from src.models.ring import RING_KV_LAYOUT, RING_LAYOUT, ring_attend

# cuDNN computes in bf16/fp16: its bias must stay finite in float16 too.
CUDNN_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float16).max)


# q/k/v inside attention under Ulysses context parallelism: whole sequences, heads split
# over tensor x sequence (an all-to-all in and out). Ring/USP layouts are in src.models.ring.
ULYSSES_LAYOUT = ("act_batch", "act_attn_seq", "act_attn_heads", None)


@struct.dataclass
class Mask:
  """Which keys each query may see: equal segment ids, for the kernel `impl`.
  bias: [B, 1, Lq, Lk] float, 0 where allowed and MASK_VALUE (CUDNN_MASK_VALUE)
  elsewhere, added to the logits by xla (cudnn); splash and ring attention read the
  segment ids. `context_parallel` (model.context_parallel) picks the layout; `cross`:
  the keys are conditioning tokens (whole on every device under ring/usp)."""

  q_segment_ids: jax.Array  # [B, Lq] int32
  kv_segment_ids: jax.Array  # [B, Lk] int32
  bias: jax.Array | None = None
  impl: str = struct.field(pytree_node=False, default="xla")
  context_parallel: str = struct.field(pytree_node=False, default="ulysses")
  ulysses_degree: int = struct.field(pytree_node=False, default=0)
  cross: bool = struct.field(pytree_node=False, default=False)

  @property
  def ring(self) -> bool:
    """Self-attention by ring attention (model.context_parallel ring or usp)."""
    return self.context_parallel != "ulysses" and not self.cross

  def layouts(self) -> tuple[tuple, tuple]:
    """Logical layouts of (q and the output, k and v) inside attention."""
    if self.context_parallel == "ulysses":
      return ULYSSES_LAYOUT, ULYSSES_LAYOUT
    return RING_LAYOUT, RING_KV_LAYOUT if self.cross else RING_LAYOUT


SPLASH_BLOCK = 128  # splash tiles (the smallest): sequence lengths are padded to a multiple
# The kernel keeps its block mask (a few bytes per q-block x kv-block pair) in the TPU core's
# 1 MiB scalar memory: 128-token tiles over 75,600 tokens (Wan 720p x 81) need 591^2 pairs and
# the compile fails ("Ran out of memory in memory space smem"). Longer sequences take larger
# tiles, up to SPLASH_MAX_BLOCK, so that at most SPLASH_GRID_PAIRS pairs remain.
SPLASH_MAX_BLOCK = 2048
SPLASH_GRID_PAIRS = 32768
KERNEL_IMPLS = ("splash", "flash")  # Pallas kernels that read segment ids (no dense mask)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention computes in half precision


_TARGET_PLATFORM: list[str] = []  # set by `compiling_for` (AOT compiles for another platform)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Trace kernels for `platform` rather than this host's backend: `src.aot` compiles
  TPU programs on a CPU host, where `auto` must still mean splash and the splash
  kernel must be the real Mosaic kernel, not its interpreter."""
  _TARGET_PLATFORM.append(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.pop()


def target_platform() -> str:
  return _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The kernel `impl` means on `platform` (default: `target_platform()`): auto is
  the Pallas splash kernel on TPU and XLA elsewhere. cuDNN is never chosen
  automatically: it needs bf16/fp16 compute (model.dtype), which a float32 run lacks."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not available; expected one of {IMPLS}.")
  if impl != "auto":
    return impl
  return "splash" if (platform or target_platform()) == "tpu" else "xla"


def make_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, impl: str = "xla", *,
              context_parallel: str = "ulysses", ulysses_degree: int = 0, cross: bool = False) -> Mask:
  impl = resolve_impl(impl)
  mask = Mask(q_segment_ids, kv_segment_ids, None, impl, context_parallel, ulysses_degree, cross)
  if impl in KERNEL_IMPLS or mask.ring:  # these read segment ids; no dense mask is ever built
    return mask
  same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]  # [B, 1, Lq, Lk]
  masked = CUDNN_MASK_VALUE if impl == "cudnn" else MASK_VALUE
  return mask.replace(bias=jnp.where(same, 0.0, masked).astype(jnp.float32))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """Softmax attention. q [B, Lq, K, Dh], k/v [B, Lk, K, Dh] -> [B, Lq, K, Dh].

  The XLA path works heads-major ([B, K, L, Dh]: every batched matmul reads
  contiguous [L, Dh] blocks), adds the per-batch bias, and normalises after the
  product with V, as flash attention does: the division touches [Lq, Dh] instead of
  [Lq, Lk]. On CPU this ran fwd+bwd ~25% faster than a softmax over [B, Lq, K, Dh]
  einsums (measured, 8x256 tokens, 6 heads of 64).
  """
  if mask.ring:
    ulysses = 1 if mask.context_parallel == "ring" else mask.ulysses_degree
    tiles = "flash" if mask.impl == "flash" else "xla"  # the block-skipping kernel as each hop's tiles
    return ring_attend(q, k, v, mask.q_segment_ids, mask.kv_segment_ids, ulysses, tiles,
                       target_platform() != "tpu")
  if mask.impl in KERNEL_IMPLS:
    return kernel_attend(q, k, v, mask)
  if mask.impl == "cudnn":
    return cudnn_attend(q, k, v, mask)
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, K, L, Dh]
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) + mask.bias
  # Any per-row constant gives the same result; the max keeps exp() in range.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))  # [B, K, Lq, Lk]
  out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.swapaxes(out, 1, 2).astype(v.dtype)  # [B, Lq, K, Dh]


def cudnn_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """GPU flash attention (cuDNN) through jax.nn.dot_product_attention, the packing
  mask as its additive bias. Inputs must already be bf16/fp16 (model.dtype): cuDNN
  has no float32 kernel, and a silent cast would change the model's numerics."""
  if q.dtype not in CUDNN_DTYPES:
    raise ValueError(f"model.attention=cudnn needs bfloat16 or float16 compute, got {q.dtype}: "
                     "set model.dtype=bfloat16, or use model.attention=xla.")
  return jax.nn.dot_product_attention(q, k, v, bias=mask.bias.astype(q.dtype), implementation="cudnn")


def splash_block(lq: int, lk: int) -> int:
  """The kernel's tile: 128, doubled while the q x kv block grid exceeds SPLASH_GRID_PAIRS."""
  block = SPLASH_BLOCK
  while block < SPLASH_MAX_BLOCK and math.ceil(lq / block) * math.ceil(lk / block) > SPLASH_GRID_PAIRS:
    block *= 2
  return block


def _padded(q, k, v, q_seg, kv_seg, tile_q: int, tile_kv: int):
  """[B, L, K, Dh] -> [B, K, L', Dh'], padded for a kernel's tiles (`flash.pad_operands`)."""
  return flash.pad_operands(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), q_seg, kv_seg, tile_q, tile_kv)


def _splash_local(q, k, v, q_seg, kv_seg):
  """Splash on one device's block: q [B, Lq, K, Dh] (pre-scaled) -> [B, Lq, K, Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  lq, heads, dh = q.shape[1], q.shape[2], q.shape[3]
  tile = splash_block(lq, k.shape[1])
  q, k, v, q_seg, kv_seg = _padded(q, k, v, q_seg, kv_seg, tile, tile)
  block = sk.BlockSizes(*(min(tile, n) for n in (q.shape[2], k.shape[2], k.shape[2])),
                        *(min(tile, n) for n in (q.shape[2], k.shape[2], k.shape[2], q.shape[2], k.shape[2])))
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((q.shape[2], k.shape[2]))] * heads), block_sizes=block,
                              head_shards=1, q_seq_shards=1, interpret=target_platform() != "tpu")
  out = jax.vmap(lambda q_, k_, v_, qs, ks: kernel(q_, k_, v_, segment_ids=sk.SegmentIds(q=qs, kv=ks)))(
      q, k, v, q_seg, kv_seg)  # [B, K, Lq', Dh']
  return jnp.swapaxes(out[:, :, :lq, :dh], 1, 2)


def _flash_local(q, k, v, q_seg, kv_seg):
  """The block-skipping kernel (src.models.flash) on one device's block, as `_splash_local`."""
  lq, dh = q.shape[1], q.shape[3]
  block_q, block_kv = flash.block_size(lq), flash.block_size(k.shape[1])
  padded = _padded(q, k, v, q_seg, kv_seg, block_q, block_kv)
  out = flash.packed_flash(*padded, block_q, block_kv, target_platform() != "tpu")  # [B, K, Lq', Dh']
  return jnp.swapaxes(out[:, :, :lq, :dh], 1, 2)


def kernel_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """A TPU Pallas kernel with segment ids (interpreted off TPU): splash, or the block-skipping
  `flash`. Under a mesh it runs per device through shard_map, on the layout attention already
  has (`mask.layouts`): rows over the batch axes, heads over tensor x sequence, whole sequences
  (Ulysses); or, for cross-attention under ring/usp, queries split over sequence and whole captions."""
  from src.mesh import logical_to_spec

  local = _flash_local if mask.impl == "flash" else _splash_local
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  args = (q, k, v, mask.q_segment_ids, mask.kv_segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(*args)
  q_spec, kv_spec = (logical_to_spec(layout) for layout in mask.layouts())
  q_seg, kv_seg = P(*q_spec[:2]), P(*kv_spec[:2])
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, q_seg, kv_seg),
                       out_specs=q_spec, check_vma=False)(*args)


# --- 3D rotary position embedding -------------------------------------------------


def rope_dims(head_dim: int) -> tuple[int, int, int]:
  """Split of the head dim over (t, h, w), as in Wan 2.1: h and w get 2*(Dh//6) each."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables for (t, h, w) integer positions [B, L, 3] -> two [B, L, 1, Dh/2]."""
  parts = []
  for axis, dim in enumerate(rope_dims(head_dim)):
    freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
    parts.append(positions[..., axis, None].astype(jnp.float32) * freqs)  # [B, L, dim/2]
  angles = jnp.concatenate(parts, axis=-1)[:, :, None, :]  # [B, L, 1, Dh/2]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, L, K, Dh] by the angles of cos/sin [B, L, 1, Dh/2], pairing dim i
  with dim i + Dh/2 ("rotate half", as GPT-NeoX and Llama). Wan 2.1 pairs neighbours
  (2i, 2i+1) instead; the two are the same model up to a fixed permutation of the
  q/k head dims (scores are invariant to it), which a weight importer applies to the
  q/k projections and norms. Halves are contiguous slices: no [Dh/2, 2] interleave to
  build and undo, which XLA fused poorly (measured)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


@struct.dataclass
class Rope:
  """Precomputed per-batch rotary tables, shared by every layer."""

  cos: jax.Array
  sin: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    return apply_rope(x, self.cos, self.sin)
