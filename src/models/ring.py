"""Ring attention and USP: context parallelism that keeps tokens split inside attention.

Ulysses (the default, `model.context_parallel: ulysses`) regroups q/k/v by head with an
all-to-all, so its degree is capped by the heads a tensor shard holds. Ring attention
(Liu et al. 2023, "Ring Attention with Blockwise Transformers") leaves every device its
own slice of the queries and passes the key/value slices around the `sequence` axis:
after n - 1 hops each query has met every key. Softmax is accumulated online, as in
flash attention (running max, running sum, rescaled output), so no device ever holds
more than one key/value slice and one [chunk, chunk] tile of logits. USP (Fang and Zhao
2024, "USP: A Unified Sequence Parallelism Approach") nests the two: an all-to-all over
each group of `ulysses_degree` neighbouring devices of the axis, a ring across the groups.

Packing is the same rule as everywhere (`q_segment == kv_segment`); the key/value slice
carries its segment ids around the ring. The backward pass is a second ring pass
(`jax.custom_vjp`): the forward keeps only its output and the log-sum-exp of each row,
the gradients of a key/value slice travel with it and are home after n hops. Each hop's
ppermute is issued before that hop's compute and does not depend on it, so the compiler
can overlap the transfer with the matmuls. Each hop's tiles are XLA einsums (CPU, GPU and
TPU alike) or, with `model.attention=flash`, the block-skipping Pallas kernel of
src/models/flash.py, whose forward returns (output, log-sum-exp) and whose backward takes
the whole attention's log-sum-exp: exactly a ring hop's share. Slices travel unpadded and
are padded to the kernel's blocks on arrival.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from src.models import flash
from src.models.flash import MASK_VALUE

RING_CHUNK = 1024  # query and key tokens per tile: the logits a tile holds are [B, H, chunk, chunk] float32
# Layouts of q/k/v in ring attention: tokens stay split as the rest of the block has them
# (`act_seq`), heads over `act_ring_heads` (tensor). Cross-attention keys (the caption) are whole.
RING_LAYOUT = ("act_batch", "act_seq", "act_ring_heads", None)
RING_KV_LAYOUT = ("act_batch", None, "act_ring_heads", None)


def chunk_size(n: int, limit: int | None = None) -> int:
  """The largest divisor of n that is at most `limit` (n itself when n <= limit)."""
  for size in range(min(n, limit or RING_CHUNK), 0, -1):
    if n % size == 0:
      return size
  return 1


def _tiles(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Split `axis` into tiles of `size` and move the tile index to the front."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _untile(x: jax.Array, axis: int) -> jax.Array:
  """Inverse of `_tiles`: tile index (front) back into `axis`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _logits(q, k, qs, ks):
  """q [B, H, cq, D] (pre-scaled), k [B, H, ck, D] -> masked float32 logits [B, H, cq, ck]."""
  # The barrier ties the ids to k: a mask computed from the ids alone is a value the
  # differentiation of a remat'd step could precompute for every tile and hop and keep
  # ([hops, tiles, tiles, B, H, chunk, chunk] booleans: 2 TB at 868k tokens, measured).
  qs, ks, k = jax.lax.optimization_barrier((qs, ks, k))
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  return jnp.where(qs[:, None, :, None] == ks[:, None, None, :], s, MASK_VALUE)


def _fwd_slice(q, k, v, qs, ks, stats):
  """Fold one key/value slice into the running (max, sum, output) of every query.
  q [B, H, Lq, D], k/v [B, H, Lk, D], qs [B, Lq], ks [B, Lk]; stats: m, l [B, H, Lq], acc
  [B, H, Lq, D] float32. A row that has seen only masked keys so far holds garbage that
  the first allowed key scales away exactly (exp(MASK_VALUE - real) == 0)."""
  cq, ck = chunk_size(q.shape[2]), chunk_size(k.shape[2])
  kt, vt, kst = _tiles(k, 2, ck), _tiles(v, 2, ck), _tiles(ks, 1, ck)

  def per_query_tile(args):
    q_, qs_, m, l, acc = args

    def per_key_tile(carry, kv):
      m, l, acc = carry
      k_, v_, ks_ = kv
      s = _logits(q_, k_, qs_, ks_)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      scale = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_.dtype), v_, preferred_element_type=jnp.float32)
      return (m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + pv), None

    return jax.lax.scan(per_key_tile, (m, l, acc), (kt, vt, kst))[0]

  m, l, acc = stats
  tiled = (_tiles(q, 2, cq), _tiles(qs, 1, cq), _tiles(m, 2, cq), _tiles(l, 2, cq), _tiles(acc, 2, cq))
  m, l, acc = jax.lax.map(per_query_tile, tiled)
  return _untile(m, 2), _untile(l, 2), _untile(acc, 2)


def _bwd_slice(q, k, v, qs, ks, lse, delta, dout):
  """Gradients from one key/value slice: (dq, dk, dv) float32, shaped as q, k, v.
  p is recomputed from the saved log-sum-exp; ds = p * (dp - delta), delta = rowsum(dout * out)."""
  cq, ck = chunk_size(q.shape[2]), chunk_size(k.shape[2])
  kt, vt, kst = _tiles(k, 2, ck), _tiles(v, 2, ck), _tiles(ks, 1, ck)

  def per_query_tile(dkv, args):
    q_, qs_, lse_, delta_, do_ = args

    def per_key_tile(dq, kv):
      k_, v_, ks_ = kv
      p = jnp.exp(_logits(q_, k_, qs_, ks_) - lse_[..., None])  # [B, H, cq, ck]
      dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do_.dtype), do_, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_, v_, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_[..., None])
      dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k_.dtype), k_, preferred_element_type=jnp.float32)
      dk = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q_.dtype), q_, preferred_element_type=jnp.float32)
      return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(per_key_tile, jnp.zeros(q_.shape, jnp.float32), (kt, vt, kst))
    return (dkv[0] + _untile(dk, 2), dkv[1] + _untile(dv, 2)), dq

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  tiled = (_tiles(q, 2, cq), _tiles(qs, 1, cq), _tiles(lse, 2, cq), _tiles(delta, 2, cq), _tiles(dout, 2, cq))
  (dk, dv), dq = jax.lax.scan(per_query_tile, zeros, tiled)
  return _untile(dq, 2), dk, dv


def _xla_init(q):
  b, h, lq, d = q.shape
  return (jnp.full((b, h, lq), -jnp.inf, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
          jnp.zeros((b, h, lq, d), jnp.float32))


def _xla_finish(stats, dtype):
  m, l, acc = stats
  return (acc / l[..., None]).astype(dtype), m + jnp.log(l)


def _padded_slice(q, k, v, qs, ks):
  """A travelling key/value slice padded to the kernel's lanes and blocks on arrival (it travels
  unpadded: the ring moves no padding); q is padded once, in `_local`."""
  block = flash.block_size(k.shape[2])
  _, k, v, _, ks = flash.pad_operands(q, k, v, qs, ks, 1, block)
  return (q, k, v, qs, ks), (flash.block_size(q.shape[2]), block)


def _flash_init(q):
  return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)


def _flash_fold(q, k, v, qs, ks, stats, interpret):
  """Fold one slice's (output, log-sum-exp) from the block-skipping kernel into the running pair."""
  out, lse = stats
  operands, blocks = _padded_slice(q, k, v, qs, ks)
  out_s, lse_s = flash.forward(*operands, *blocks, interpret, out_dtype=jnp.float32)
  new = jnp.logaddexp(lse, lse_s)
  ref = jnp.where(jnp.isneginf(new), 0.0, new)  # rows no slice has reached yet stay (0, -inf)
  return out * jnp.exp(lse - ref)[..., None] + out_s * jnp.exp(lse_s - ref)[..., None], new


def _flash_grads(q, k, v, qs, ks, lse, delta, dout, interpret):
  (q, kp, vp, qs, ksp), blocks = _padded_slice(q, k, v, qs, ks)
  dq, dk, dv = flash.backward(q, kp, vp, qs, ksp, lse, delta, dout, *blocks, interpret, grad_dtype=jnp.float32)
  lk, dh = k.shape[2:]
  return dq, dk[:, :, :lk, :dh], dv[:, :, :lk, :dh]


# Tiles of one hop, by model.attention: (initial stats, fold a slice, (output, lse), a slice's grads).
TILES = {
    "xla": (_xla_init, lambda *a, interpret: _fwd_slice(*a), _xla_finish,
            lambda *a, interpret: _bwd_slice(*a)),
    "flash": (_flash_init, lambda *a, interpret: _flash_fold(*a, interpret), lambda st, dtype: (st[0].astype(dtype), st[1]),
              lambda *a, interpret: _flash_grads(*a, interpret)),
}


def _ring_forward(q, k, v, qs, ks, axis, perm, hops, tiles, interpret):
  """The forward ring: out [B, H, Lq, D] (q's dtype) and the rows' log-sum-exp [B, H, Lq]."""
  init, fold, finish, _ = TILES[tiles]

  def hop(carry, _):
    (k, v, ks), stats = carry
    nxt = jax.lax.ppermute((k, v, ks), axis, perm)  # issued first: overlaps the compute below
    return (nxt, fold(q, k, v, qs, ks, stats, interpret=interpret)), None

  stats = init(q)
  if hops > 1:
    ((k, v, ks), stats), _ = jax.lax.scan(hop, ((k, v, ks), stats), None, length=hops - 1)
  return finish(fold(q, k, v, qs, ks, stats, interpret=interpret), q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring(q, k, v, qs, ks, axis, perm, hops, tiles, interpret):
  return _ring_forward(q, k, v, qs, ks, axis, perm, hops, tiles, interpret)[0]


def _ring_fwd(q, k, v, qs, ks, axis, perm, hops, tiles, interpret):
  out, lse = _ring_forward(q, k, v, qs, ks, axis, perm, hops, tiles, interpret)
  return out, (q, k, v, qs, ks, out, lse)


def _ring_bwd(axis, perm, hops, tiles, interpret, res, dout):
  q, k, v, qs, ks, out, lse = res
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dout = dout.astype(q.dtype)
  grads = functools.partial(TILES[tiles][3], interpret=interpret)

  def hop(carry, _):
    (k, v, ks), (dk, dv), dq = carry
    nxt = jax.lax.ppermute((k, v, ks), axis, perm)
    dq_, dk_, dv_ = grads(q, k, v, qs, ks, lse, delta, dout)
    # This slice's gradients travel with it: after `hops` hops they are home.
    return (nxt, jax.lax.ppermute((dk + dk_, dv + dv_), axis, perm), dq + dq_), None

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  carry = ((k, v, ks), zeros, jnp.zeros(q.shape, jnp.float32))
  if hops > 1:
    carry, _ = jax.lax.scan(hop, carry, None, length=hops - 1)
  (k, v, ks), (dk, dv), dq = carry
  dq_, dk_, dv_ = grads(q, k, v, qs, ks, lse, delta, dout)
  dk, dv = (dk + dk_).astype(k.dtype), (dv + dv_).astype(v.dtype)  # complete: the last hop home in k's dtype
  if hops > 1:
    dk, dv = jax.lax.ppermute((dk, dv), axis, perm)
  return (dq + dq_).astype(q.dtype), dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_groups(size: int, ulysses: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
  """Devices of a context-parallel axis of `size`, index i = group * ulysses + member:
  the Ulysses groups (neighbours) and the ring's hops (each member to the same member
  of the next group)."""
  rings = size // ulysses
  groups = [[g * ulysses + u for u in range(ulysses)] for g in range(rings)]
  perm = [(g * ulysses + u, ((g + 1) % rings) * ulysses + u) for g in range(rings) for u in range(ulysses)]
  return groups, perm


def ulysses_group(size: int, heads: int) -> int:
  """USP's default group: the most devices of the axis that divide both it and the heads."""
  return max(d for d in range(1, size + 1) if size % d == 0 and heads % d == 0)


def _local(q, k, v, qs, ks, *, axis, size, ulysses, tiles="xla", interpret=True):
  """One device: q/k/v [B, L/size, H/tensor, D] (q pre-scaled) -> the same shape."""
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, L, D]
  groups, perm = ring_groups(size, ulysses)
  if ulysses > 1:  # Ulysses inside the group: whole group's tokens, 1/ulysses of the heads
    q, k, v = (jax.lax.all_to_all(a, axis, 1, 2, tiled=True, axis_index_groups=groups) for a in (q, k, v))
    qs, ks = (jax.lax.all_gather(s, axis, axis=1, tiled=True, axis_index_groups=groups) for s in (qs, ks))
  length, dh = q.shape[2:]
  if tiles == "flash":  # q to the kernel's lanes and blocks; key/value slices per hop (`_padded_slice`)
    q, _, _, qs, _ = flash.pad_operands(q, k, v, qs, ks, flash.block_size(length), 1)
  out = _ring(q, k, v, qs, ks, axis, tuple(perm), size // ulysses, tiles, interpret)[:, :, :length, :dh]
  if ulysses > 1:
    out = jax.lax.all_to_all(out, axis, 2, 1, tiled=True, axis_index_groups=groups)
  return jnp.swapaxes(out, 1, 2)


def ring_attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                ulysses: int = 1, tiles: str = "xla", interpret: bool = True) -> jax.Array:
  """Self-attention with tokens split over the mesh axes of `act_seq` (a ring over them;
  USP when `ulysses` > 1; 0: the largest group that divides both the axis and the heads
  a tensor shard holds). q/k/v [B, L, H, Dh] -> [B, L, H, Dh]. Without a mesh, or with
  the tokens unsplit, it is blockwise (flash-style) attention on one device."""
  from src.mesh import logical_to_spec

  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local(q, k, v, q_segment_ids, kv_segment_ids, axis=None, size=1, ulysses=1, tiles=tiles,
                  interpret=interpret)
  qkv, seg = logical_to_spec(RING_LAYOUT), logical_to_spec(("act_batch", "act_seq"))
  names = _names(qkv[1])
  size = math.prod(mesh.shape[a] for a in names)
  heads = q.shape[2] // math.prod(mesh.shape[a] for a in _names(qkv[2]))
  ulysses = ulysses or ulysses_group(size, heads)
  if q.shape[1] % size:
    raise ValueError(f"ring attention splits a row of {q.shape[1]} tokens over {size} devices: the row length "
                     "must divide by mesh.sequence (pad it with data.seq_len).")
  if size % ulysses or heads % ulysses:
    raise ValueError(f"model.ulysses_degree={ulysses} must divide the context-parallel devices ({size}) and "
                     f"the heads each tensor shard holds ({heads}).")
  local = functools.partial(_local, axis=names if names else None, size=size, ulysses=ulysses, tiles=tiles,
                            interpret=interpret)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                       check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
