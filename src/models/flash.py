"""Block-skipping flash attention for packed rows: a Pallas TPU kernel with segment ids.

A packed row holds many examples side by side (`segment_ids` 1, 1, ..., 2, 2, ..., 0
for padding), and a query sees only keys of its own example. Flash and splash attention
with segment ids still visit every (query block, key block) pair of the row and mask
most of them away: a row of 16 equal examples does 16 times the useful work. Examples are
contiguous in a row, so a block pair can only hold a visible (query, key) pair when the
query block's segment-id range [min, max] overlaps the key block's. This kernel visits,
for each query block, only the contiguous run of key blocks from the first to the last
that overlaps it (padding, segment 0 at the row's end, counts as the last example;
and, in the backward pass, for each key block the run of query
blocks). The grid still has every pair; a skipped step maps its input blocks to the
nearest visited one, so the TPU pipeline issues no copy for it, and runs no compute.

Correctness does not depend on contiguity: pairs inside a run that do not overlap are
computed and masked, pairs outside cannot hold a visible pair. A query row that matches no
key (only the callers' block padding can) gets a finite, meaningless output and no
gradient; callers slice it off.

Interface: q [B, H, Lq, D] (already scaled), k/v [B, H, Lk, D], lengths multiples of
the blocks, D a multiple of 128 (callers pad); q_seg [B, Lq], kv_seg [B, Lk] int32.
Off TPU the kernels run in Pallas's interpreter (tests, CPU), on TPU through Mosaic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Masked logits (here, in ring attention and in attention.py's XLA path): a large finite
# value, not -inf, so a fully masked row stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES, SUBLANES = 128, 8  # TPU vreg tile: per-row statistics are kept broadcast over lanes
BLOCK = 512  # query and key tokens per block (each side), at most
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
PAD_KV = -1  # segment id of padded keys: no query ever matches it
_PAD_ORDER = 1 << 30  # padding's place in the order of segment ids (`_ordered`)


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad, constant_values=value)


def pad_operands(q, k, v, q_seg, kv_seg, block_q: int, block_kv: int):
  """q/k/v [B, H, L, D] and segment ids [B, L] padded for a TPU kernel: D zero-padded to the
  lanes, lengths to the blocks. Padded queries join the padding segment 0; padded keys take
  PAD_KV, which no query has (callers slice the padded queries off)."""
  q, k, v = (_pad_to(_pad_to(a, 3, LANES), 2, n) for a, n in ((q, block_q), (k, block_kv), (v, block_kv)))
  return q, k, v, _pad_to(q_seg, 1, block_q), _pad_to(kv_seg, 1, block_kv, PAD_KV)


def block_size(length: int, limit: int = BLOCK) -> int:
  """The block for a sequence of `length`: `limit`, or the length rounded up to 128 when shorter."""
  return min(limit, -(-length // LANES) * LANES)


def _ordered(seg: jax.Array) -> jax.Array:
  """Segment ids in row order: padding (0, and -1 for block padding) comes after every
  example, so it sorts last; one-to-one, so ranges still decide overlap."""
  return jnp.where(seg > 0, seg, _PAD_ORDER - seg)


def block_runs(q_seg: jax.Array, kv_seg: jax.Array, block_q: int, block_kv: int):
  """Per-block visiting runs from segment ids (q_seg [B, Lq], kv_seg [B, Lk]).

  Returns (kv_lo, kv_hi) [B * nq] and (q_lo, q_hi) [B * nk], int32, flattened for the
  kernels' scalar memory: the first and last key block a query block visits, and the
  first and last query block a key block visits; an empty run is (0, -1)."""
  b = q_seg.shape[0]
  qb, kb = (_ordered(s).reshape(b, -1, n) for s, n in ((q_seg, block_q), (kv_seg, block_kv)))
  qmin, qmax, kmin, kmax = qb.min(-1), qb.max(-1), kb.min(-1), kb.max(-1)
  overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])  # [B, nq, nk]

  def run(ov):  # first/last True along the last axis; (0, -1) when none
    n = ov.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    lo = jnp.min(jnp.where(ov, idx, n), axis=-1)
    hi = jnp.max(jnp.where(ov, idx, -1), axis=-1)
    return jnp.where(hi < 0, 0, lo).reshape(-1), hi.reshape(-1)

  return run(overlap), run(jnp.swapaxes(overlap, 1, 2))


def executed_fraction(q_seg: np.ndarray, kv_seg: np.ndarray, block_q: int, block_kv: int) -> float:
  """Share of the (query block, key block) pairs of the rows that the kernel computes."""
  (lo, hi), _ = block_runs(jnp.asarray(q_seg), jnp.asarray(kv_seg), block_q, block_kv)
  nq, nk = q_seg.shape[1] // block_q, kv_seg.shape[1] // block_kv
  return float(np.sum(np.asarray(hi) - np.asarray(lo) + 1)) / (q_seg.shape[0] * nq * nk)


def _visit(lo_ref, hi_ref, run, step):
  """(visit this step?, the block index the step loads: clamped into run `run`)."""
  lo, hi = lo_ref[run], hi_ref[run]
  return (step >= lo) & (step <= hi), jnp.clip(step, lo, jnp.maximum(hi, lo))


def _scores(q_ref, k_ref, qs_ref, ks_ref):
  """Masked logits [bq, bk] of one block pair, and the mask (same segment)."""
  same = qs_ref[:, :1] == ks_ref[:1, :]  # [bq, 1] == [1, bk]
  s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
  return jnp.where(same, s, MASK_VALUE), same


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, nq):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_visit(lo_ref, hi_ref, b * nq + i, j)[0])
  def _block():
    s, _ = _scores(q_ref, k_ref, qs_ref, ks_ref)
    m_prev = m_sc[...]  # [bq, LANES], every lane the same
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0  # a row that visited no block: output 0, log-sum-exp -inf (it weighs nothing)
    o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref):
  """Backward of one block pair: p [bq, bk] and ds = p * (dp - di)."""
  s, same = _scores(q_ref, k_ref, qs_ref, ks_ref)
  p = jnp.where(same, jnp.exp(s - lse_ref[:, :1]), 0.0)
  dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
  return p, p * (dp - di_ref[:, :1])


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, nk):
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_visit(lo_ref, hi_ref, b * nk + j, i)[0])
  def _block():
    p, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref)
    dv_sc[...] += jax.lax.dot(p.T.astype(do_ref.dtype), do_ref[...], preferred_element_type=jnp.float32)
    dk_sc[...] += jax.lax.dot(ds.T.astype(q_ref.dtype), q_ref[...], preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref, dq_ref, dq_sc, *, nq):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_visit(lo_ref, hi_ref, b * nq + i, j)[0])
  def _block():
    _, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref)
    dq_sc[...] += jax.lax.dot(ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _specs(bq: int, bk: int, d: int, n_outer: int, q_outer: bool):
  """Block specs of (q-side, kv-side, q segment ids, kv segment ids, q-row statistics).
  The grid is (B, H, outer, inner); `q_outer`: query blocks are the outer loop (forward,
  dq), else key blocks are (dkv). The inner side's block is clamped into its run."""
  def sides(b, o, n, lo_ref, hi_ref):
    inner = _visit(lo_ref, hi_ref, b * n_outer + o, n)[1]
    return (o, inner) if q_outer else (inner, o)

  def qmap(b, h, o, n, lo, hi):
    return b, h, sides(b, o, n, lo, hi)[0], 0

  def kmap(b, h, o, n, lo, hi):
    return b, h, sides(b, o, n, lo, hi)[1], 0

  return (pl.BlockSpec((None, None, bq, d), qmap), pl.BlockSpec((None, None, bk, d), kmap),
          pl.BlockSpec((None, bq, LANES), lambda b, h, o, n, lo, hi: (b, sides(b, o, n, lo, hi)[0], 0)),
          pl.BlockSpec((None, SUBLANES, bk), lambda b, h, o, n, lo, hi: (b, 0, sides(b, o, n, lo, hi)[1])),
          pl.BlockSpec((None, None, bq, LANES), qmap))


def _call(kernel, name, runs, grid, in_specs, out_specs, out_shape, scratch, interpret):
  return pl.pallas_call(
      kernel, name=name, out_shape=out_shape, interpret=interpret,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
  )(*runs)


def _lanes(seg_q, seg_kv, lq, lk):
  b = seg_q.shape[0]
  return (jax.lax.broadcast_in_dim(seg_q, (b, lq, LANES), (0, 1)),
          jax.lax.broadcast_in_dim(seg_kv, (b, SUBLANES, lk), (0, 2)))


def forward(q, k, v, q_seg, kv_seg, block_q: int, block_kv: int, interpret: bool, out_dtype=None):
  """(out [B, H, Lq, D] in `out_dtype` (default q's), log-sum-exp [B, H, Lq] float32, -inf for a
  row that visited no block). Ring attention folds these per key/value slice."""
  (b, h, lq, d), lk = q.shape, k.shape[2]
  nq, nk = lq // block_q, lk // block_kv
  kv_run, _ = block_runs(q_seg, kv_seg, block_q, block_kv)
  qspec, kspec, qsspec, ksspec, statspec = _specs(block_q, block_kv, d, nq, q_outer=True)
  out, lse = _call(
      functools.partial(_fwd_kernel, nq=nq), "packed_flash_fwd_residuals",
      (*kv_run, q, k, v, *_lanes(q_seg, kv_seg, lq, lk)), (b, h, nq, nk),
      [qspec, kspec, kspec, qsspec, ksspec], [qspec, statspec],
      [jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype), jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32)],
      [pltpu.VMEM((block_q, LANES), jnp.float32)] * 2 + [pltpu.VMEM((block_q, d), jnp.float32)], interpret)
  return out, lse[..., 0]


def backward(q, k, v, q_seg, kv_seg, lse, di, dout, block_q: int, block_kv: int, interpret: bool, grad_dtype=None):
  """(dq, dk, dv) from the rows' log-sum-exp and di = rowsum(dout * out) [B, H, Lq] (both of the
  whole attention, so ring attention can take each slice's share); gradients in `grad_dtype`
  (default the inputs')."""
  (b, h, lq, d), lk = q.shape, k.shape[2]
  nq, nk = lq // block_q, lk // block_kv
  kv_run, q_run = block_runs(q_seg, kv_seg, block_q, block_kv)
  stats = tuple(jax.lax.broadcast_in_dim(x, (b, h, lq, LANES), (0, 1, 2)) for x in (lse, di))
  operands = (q, k, v, *_lanes(q_seg, kv_seg, lq, lk), *stats, dout)
  qspec, kspec, qsspec, ksspec, statspec = _specs(block_q, block_kv, d, nk, q_outer=False)
  dk, dv = _call(
      functools.partial(_dkv_kernel, nk=nk), "packed_flash_dkv", (*q_run, *operands), (b, h, nk, nq),
      [qspec, kspec, kspec, qsspec, ksspec, statspec, statspec, qspec], [kspec, kspec],
      [jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype), jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)],
      [pltpu.VMEM((block_kv, d), jnp.float32)] * 2, interpret)
  qspec, kspec, qsspec, ksspec, statspec = _specs(block_q, block_kv, d, nq, q_outer=True)
  dq = _call(
      functools.partial(_dq_kernel, nq=nq), "packed_flash_dq", (*kv_run, *operands), (b, h, nq, nk),
      [qspec, kspec, kspec, qsspec, ksspec, statspec, statspec, qspec], qspec,
      jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype), [pltpu.VMEM((block_q, d), jnp.float32)], interpret)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def packed_flash(q, k, v, q_seg, kv_seg, block_q: int, block_kv: int, interpret: bool):
  """Attention of q [B, H, Lq, D] (pre-scaled) over k/v [B, H, Lk, D] where segment ids match."""
  return forward(q, k, v, q_seg, kv_seg, block_q, block_kv, interpret)[0]


def _fwd_rule(q, k, v, q_seg, kv_seg, block_q, block_kv, interpret):
  out, lse = forward(q, k, v, q_seg, kv_seg, block_q, block_kv, interpret)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _bwd_rule(block_q, block_kv, interpret, res, dout):
  q, k, v, q_seg, kv_seg, out, lse = res
  di = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dq, dk, dv = backward(q, k, v, q_seg, kv_seg, lse, di, dout, block_q, block_kv, interpret)
  return dq, dk, dv, None, None


packed_flash.defvjp(_fwd_rule, _bwd_rule)
