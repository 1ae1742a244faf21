"""The DiT: adaLN-Zero start, golden sharding, scan == unrolled, RoPE, conditioning."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import mesh as M
from src.batch import Packing, PackedBatch
from src.config import Config, DataConfig, MeshConfig, ModelConfig
from src.models import attention
from src.models.dit import VARIANTS, DiT, dimensions
from src.state import create_model
from src.tasks import make_task

CFG = ModelConfig(variant="tiny", num_classes=5, cond_dim=12, patch=(1, 2, 2), in_channels=3)


def make_batch(rows=2, grid=(2, 4, 4), text_len=3, cond_dim=12, patch_dim=12, seed=0):
  """One example per row, with its (t, h, w) positions: the unpacked case."""
  rng = np.random.default_rng(seed)
  t, h, w = grid
  n = t * h * w
  pos = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(n, 3)
  packing = Packing(
      segment_ids=jnp.ones((rows, n), jnp.int32),
      positions=jnp.asarray(np.broadcast_to(pos, (rows, n, 3)), jnp.int32),
      grid=jnp.asarray(np.broadcast_to(grid, (rows, 1, 3)), jnp.int32),
      labels=jnp.asarray(rng.integers(0, 5, (rows, 1)), jnp.int32),
      cond=jnp.asarray(rng.normal(size=(rows, text_len, cond_dim)), jnp.float32),
      cond_segment_ids=jnp.ones((rows, text_len), jnp.int32),
  )
  return PackedBatch(tokens=jnp.asarray(rng.normal(size=(rows, n, patch_dim)), jnp.float32), packing=packing)


def perturbed(model, scale=0.05, seed=1):
  """Random values in every parameter, so zero-initialised paths carry signal too.
  Returns the model's forward pass, jitted (eager NNX calls are slow on CPU)."""
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return Forward(graphdef, jax.tree.unflatten(tree, leaves))


class Forward:
  """A jitted `model(tokens, time, packing, drop)` over explicit (graphdef, params)."""

  def __init__(self, graphdef, params):
    self.graphdef, self.params = graphdef, params
    self._fn = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))

  def __call__(self, tokens, time, packing, drop=None):
    return self._fn(self.params, tokens, time, packing, drop)


@pytest.fixture(scope="module")
def model():
  """The test DiT with random values in every parameter (built once: NNX init is eager)."""
  return perturbed(DiT(CFG, rngs=nnx.Rngs(0)))


def test_new_model_outputs_exactly_zero():
  model = Forward(*nnx.split(DiT(CFG, rngs=nnx.Rngs(0))))
  b = make_batch()
  out = model(b.tokens, jnp.full((2, 1), 500.0), b.packing)
  assert out.shape == b.tokens.shape and out.dtype == jnp.float32
  assert not np.any(np.asarray(out))


def test_variants_follow_the_dit_paper():
  assert [dimensions(ModelConfig(variant=v))[:3] for v in ("S", "B", "L", "XL")] == [
      (12, 384, 6), (12, 768, 12), (24, 1024, 16), (28, 1152, 16)]
  assert dimensions(ModelConfig(variant="S", depth=3)) == (3, 384, 6)
  assert set(VARIANTS) >= {"tiny", "S", "B", "L", "XL"}


def test_golden_sharding_on_a_2x2x2_mesh():
  cfg = Config(model=dataclasses.replace(CFG, width=128, heads=4), data=DataConfig(channels=CFG.in_channels))
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=2))
  rules = M.make_rules()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: DiT(cfg.model, rngs=nnx.Rngs(0)))
  _, params = create_model(make_task(cfg), mesh, rules, cfg.seed)
  names = {path: v.get_metadata()["out_sharding"] for path, v in nnx.to_flat_state(nnx.state(abstract))}
  values = dict(nnx.to_flat_state(params))
  assert names.keys() == values.keys()
  sharded = 0
  for path, logical in names.items():
    value = values[path][...]
    assert len(logical) == value.ndim, path
    assert value.sharding.spec == M.logical_to_spec(logical, rules), path
    if value.size >= 128 * 128:  # every large parameter is split over the mesh
      assert value.addressable_shards[0].data.size < value.size, path
      sharded += 1
  assert sharded >= 8
  # The stacked block kernels carry the layer axis first, unsharded.
  assert names[("blocks", "fc1", "kernel")] == ("layers", "embed", "mlp")
  assert values[("blocks", "fc1", "kernel")][...].sharding.spec == jax.P(None, "fsdp", "tensor")


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_scan_equals_unrolled_and_remat_keeps_gradients(remat):
  b = make_batch()
  t = jnp.array([[250.0], [750.0]])
  outs, grads = [], []
  for scan in (True, False):
    cfg = dataclasses.replace(CFG, scan_layers=scan, remat=remat)
    model = perturbed(DiT(cfg, rngs=nnx.Rngs(0)))
    f = lambda p: jnp.sum(nnx.merge(model.graphdef, p)(b.tokens, t, b.packing) ** 2)
    outs.append(model(b.tokens, t, b.packing))
    grads.append(jax.jit(jax.grad(f))(model.params))
  assert float(jnp.abs(outs[0]).max()) > 1e-3
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(g0, g1, atol=1e-5, rtol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters(model):
  bf16 = perturbed(DiT(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0)))
  ref = model
  b = make_batch()
  out = bf16(b.tokens, jnp.full((2, 1), 100.0), b.packing)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params))
  assert out.dtype == jnp.float32
  expect = ref(b.tokens, jnp.full((2, 1), 100.0), b.packing)
  assert float(jnp.abs(out - expect).max()) < 0.05 * float(jnp.abs(expect).max()) + 1e-2


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  hd = 24
  q = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)

  def score(pq, pk):
    cq, sq = attention.rope_angles(jnp.array([[pq]]), hd, 10000.0)
    ck, sk = attention.rope_angles(jnp.array([[pk]]), hd, 10000.0)
    return float(jnp.sum(attention.apply_rope(q, cq, sq) * attention.apply_rope(k, ck, sk)))

  base = score((1, 2, 3), (0, 5, 1))
  assert score((4, 7, 5), (3, 10, 3)) == pytest.approx(base, rel=1e-5)
  assert score((1, 2, 3), (0, 5, 2)) != pytest.approx(base, rel=1e-3)  # w moves the score
  assert score((1, 2, 3), (1, 5, 1)) != pytest.approx(base, rel=1e-3)  # t moves the score
  assert sum(attention.rope_dims(hd)) == hd


def test_conditioning_reaches_the_output(model):
  b = make_batch()
  t = jnp.full((2, 1), 300.0)
  p = b.packing
  base = model(b.tokens, t, p)
  other_label = p.replace(labels=(p.labels + 1) % 5)
  other_caption = p.replace(cond=p.cond + 1.0)
  assert float(jnp.abs(model(b.tokens, t, other_label) - base).max()) > 1e-4
  assert float(jnp.abs(model(b.tokens, t, other_caption) - base).max()) > 1e-4
  assert float(jnp.abs(model(b.tokens, t + 100, p) - base).max()) > 1e-4
  # Dropped conditioning: label and caption no longer matter.
  drop = jnp.ones((2, 1), bool)
  dropped = model(b.tokens, t, p, drop)
  np.testing.assert_allclose(model(b.tokens, t, other_label, drop), dropped, atol=1e-6)
  np.testing.assert_allclose(model(b.tokens, t, other_caption, drop), dropped, atol=1e-6)


# --- packing: several examples of different shapes share one row -----------------

from src.models.patch import pack_rows, patchify  # noqa: E402

PACK_SHAPES = [(2, 4, 4), (1, 6, 4), (3, 2, 6)]  # a clip, an image, a longer thin clip


def packed_examples(seed=0, text_len=3):
  rng = np.random.default_rng(seed)
  examples = []
  for i, shape in enumerate(PACK_SHAPES):
    tokens, positions, grid = patchify(rng.normal(size=(*shape, 3)).astype(np.float32), (1, 2, 2))
    examples.append(dict(tokens=tokens, positions=positions, grid=np.asarray(grid), label=np.int32(i + 1),
                         text=rng.normal(size=(text_len, 12)).astype(np.float32)))
  return examples


def as_jnp(batch):
  return jax.tree.map(jnp.asarray, batch)


def alone(example):
  return as_jnp(pack_rows([example], len(example["tokens"]), 1))


def test_packed_row_equals_each_example_alone(model):
  examples = packed_examples()
  seq_len = sum(len(e["tokens"]) for e in examples) + 10  # with padding at the end
  row = as_jnp(pack_rows(examples, seq_len, max_segments=4))
  times = jnp.array([[100.0, 500.0, 900.0, 0.0]])
  drop = jnp.array([[False, True, False, False]])
  out = model(row.tokens, times, row.packing, drop)  # [1, L, P]
  seg = np.asarray(row.packing.segment_ids[0])
  for k, ex in enumerate(examples):
    single = alone(ex)
    ref = model(single.tokens, times[:, k:k + 1], single.packing, drop[:, k:k + 1])
    np.testing.assert_allclose(out[0, seg == k + 1], ref[0], atol=1e-5, rtol=0)
  assert float(jnp.abs(out[0, seg == 1]).max()) > 1e-3  # the check is not vacuous


def test_packed_gradient_is_the_sum_of_gradients_alone(model):
  graphdef, params = model.graphdef, model.params
  examples = packed_examples(seed=1)
  rng = np.random.default_rng(2)
  targets = [rng.normal(size=e["tokens"].shape).astype(np.float32) for e in examples]
  times = jnp.array([[300.0, 20.0, 700.0]])

  def sse(p, batch, t, target):
    out = nnx.merge(graphdef, p)(batch.tokens, t, batch.packing)
    real = (batch.packing.segment_ids > 0)[..., None]
    return jnp.sum(jnp.where(real, out - target, 0.0) ** 2)

  seq_len = sum(len(e["tokens"]) for e in examples) + 7
  row = as_jnp(pack_rows([dict(e, tokens=e["tokens"]) for e in examples], seq_len, max_segments=3))
  packed_target = np.zeros(row.tokens.shape, np.float32)
  seg = np.asarray(row.packing.segment_ids[0])
  for k, tgt in enumerate(targets):
    packed_target[0, seg == k + 1] = tgt
  grad = jax.jit(jax.grad(sse))
  g_packed = grad(params, row, times, packed_target)
  g_alone = [grad(params, alone(e), times[:, k:k + 1], tgt[None])
             for k, (e, tgt) in enumerate(zip(examples, targets))]
  g_sum = jax.tree.map(lambda *g: sum(g), *g_alone)
  for gp, gs in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_sum)):
    scale = float(jnp.linalg.norm(gs.ravel())) + 1e-12
    assert float(jnp.linalg.norm((gp - gs).ravel())) <= 1e-5 * scale


def test_padding_is_inert(model):
  examples = packed_examples(seed=3)
  seq_len = sum(len(e["tokens"]) for e in examples) + 12
  row = pack_rows(examples, seq_len, max_segments=5)  # 2 empty slots: padded cond too
  times = jnp.array([[10.0, 400.0, 800.0, 0.0, 0.0]])
  base = model(jnp.asarray(row.tokens), times, as_jnp(row.packing))
  rng = np.random.default_rng(4)
  noisy = jax.tree.map(np.copy, row)
  p = noisy.packing
  pad = row.packing.segment_ids == 0
  noisy.tokens[pad] = rng.normal(size=noisy.tokens[pad].shape) * 100
  p.positions[pad] = rng.integers(0, 50, size=p.positions[pad].shape)
  cpad = row.packing.cond_segment_ids == 0
  p.cond[cpad] = rng.normal(size=p.cond[cpad].shape) * 100
  other_times = times.at[:, 3:].set(999.0)
  out = model(jnp.asarray(noisy.tokens), other_times, as_jnp(noisy.packing))
  real = ~pad[0]
  np.testing.assert_allclose(out[0, real], base[0, real], atol=1e-6, rtol=0)


def test_byte_text_encoder_packs_like_any_caption():
  """Byte captions: each example's output depends only on its own caption, packed or alone."""
  from src.models.text import caption_bytes, positions_in_segment

  cfg = dataclasses.replace(CFG, text_encoder="bytes", text_depth=1)
  model = perturbed(DiT(cfg, rngs=nnx.Rngs(0)))
  examples = packed_examples(seed=5)
  for ex, caption in zip(examples, ["a red disc", "two blue squares moving up", "é"]):
    ex["text"] = caption_bytes(caption, 6)
  seq_len = sum(len(e["tokens"]) for e in examples) + 4
  row = as_jnp(pack_rows(examples, seq_len, max_segments=3))
  p = row.packing
  assert p.cond.dtype == jnp.int32 and p.cond.shape == (1, 18)
  times = jnp.array([[100.0, 500.0, 900.0]])
  out = model(row.tokens, times, p)
  seg = np.asarray(p.segment_ids[0])
  for k, ex in enumerate(examples):
    single = alone(ex)
    np.testing.assert_allclose(out[0, seg == k + 1], model(single.tokens, times[:, k:k + 1], single.packing)[0],
                               atol=1e-5)
  other = p.replace(cond=p.cond.at[0, :6].set(jnp.asarray(caption_bytes("a green diamond", 6))))
  changed = np.abs(np.asarray(model(row.tokens, times, other) - out)).max(axis=-1)[0]
  assert changed[seg == 1].max() > 1e-4 and changed[seg > 1].max() == 0.0  # only example 1 moves
  np.testing.assert_array_equal(positions_in_segment(jnp.array([[1, 1, 1, 2, 2, 0]])), [[0, 1, 2, 0, 1, 0]])


def test_context_parallel_attention_equals_the_plain_result(model):
  """Tokens split over `sequence` (4 devices) with packing: Ulysses all-to-all inside
  attention, and the packed row's output is the single-device one."""
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=1, sequence=4, tensor=1))
  examples = packed_examples(seed=6)
  row = pack_rows(examples, 96, max_segments=4)
  # The second row: the same packing, other tokens (the first row's, reversed along L).
  batch = as_jnp(PackedBatch(tokens=np.concatenate([row.tokens, row.tokens[:, ::-1]]),
                             packing=jax.tree.map(lambda v: np.concatenate([v, v]), row.packing)))
  times = jnp.array([[100.0, 500.0, 900.0, 0.0]] * 2)
  expect = model(batch.tokens, times, batch.packing)
  fn = jax.jit(lambda p, *a: nnx.merge(model.graphdef, p)(*a))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(M.make_rules()):
    hlo = fn.lower(model.params, batch.tokens, times, batch.packing).compile().as_text()
    got = fn(model.params, batch.tokens, times, batch.packing)
  assert "all-to-all" in hlo
  np.testing.assert_allclose(got, expect, atol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "flash"])
@pytest.mark.parametrize("mesh_sizes", [None, (2, 1, 1, 4)])
def test_pallas_kernels_equal_xla_attention(model, mesh_sizes, impl):
  """The TPU kernels with segment ids (splash; flash, which skips other examples' blocks),
  interpreted on CPU, on a packed row with padding and empty conditioning slots; alone and
  under shard_map on 8 devices."""
  examples = packed_examples(seed=7)
  row = pack_rows(examples, 96, max_segments=4)
  batch = as_jnp(jax.tree.map(lambda v: np.concatenate([v, v]), row))
  times = jnp.array([[100.0, 500.0, 900.0, 0.0]] * 2)
  expect = model(batch.tokens, times, batch.packing)
  graphdef = nnx.graphdef(DiT(dataclasses.replace(CFG, attention=impl), rngs=nnx.Rngs(0)))
  fn = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  if mesh_sizes is None:
    got = fn(model.params, batch.tokens, times, batch.packing)
  else:
    with jax.set_mesh(M.make_mesh(MeshConfig(*mesh_sizes))), nnx.logical_axis_rules(M.make_rules()):
      got = fn(model.params, batch.tokens, times, batch.packing)
  real = np.asarray(batch.packing.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expect)[real], atol=2e-5)
  if mesh_sizes is None:  # and it trains: the same gradients, all finite
    def loss(g, p):
      return jnp.sum(jnp.where(real[..., None], nnx.merge(g, p)(batch.tokens, times, batch.packing), 0.0) ** 2)
    g_splash = jax.jit(jax.grad(functools.partial(loss, graphdef), argnums=0))(model.params)
    g_xla = jax.jit(jax.grad(functools.partial(loss, model.graphdef), argnums=0))(model.params)
    for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_long_sequences_take_larger_splash_tiles(model, monkeypatch):
  """The tile doubles until the kernel's q x kv block grid is small enough for the TPU's
  scalar memory (Wan 720p x 81: 75,600 tokens take 512); a larger tile (forced here on a
  short row, padded from 96 to 256 tokens) gives the same attention."""
  from src.models import attention as A

  assert A.splash_block(4352, 4352) == 128 and A.splash_block(32760, 32760) == 256
  assert A.splash_block(75600, 75600) == 512 and A.splash_block(10**7, 10**7) == A.SPLASH_MAX_BLOCK
  monkeypatch.setattr(A, "SPLASH_GRID_PAIRS", 0)
  monkeypatch.setattr(A, "SPLASH_MAX_BLOCK", 256)
  assert A.splash_block(96, 96) == 256
  row = pack_rows(packed_examples(seed=7), 96, max_segments=4)
  batch = as_jnp(row)
  times = jnp.array([[100.0, 500.0, 900.0, 0.0]])
  expect = model(batch.tokens, times, batch.packing)
  graphdef = nnx.graphdef(DiT(dataclasses.replace(CFG, attention="splash"), rngs=nnx.Rngs(0)))
  got = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(model.params, batch.tokens, times, batch.packing)
  real = np.asarray(batch.packing.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expect)[real], atol=2e-5)


def test_cudnn_path_passes_the_packing_mask_as_bias(model, monkeypatch):
  """attention=cudnn hands q/k/v and the packing bias to jax.nn.dot_product_attention
  with implementation='cudnn'. No GPU here: the call is redirected to the same
  function's XLA implementation, which must then equal our own attention (bf16)."""
  examples = packed_examples(seed=8)
  row = pack_rows(examples, 96, max_segments=4)
  batch = as_jnp(jax.tree.map(lambda v: np.concatenate([v, v]), row))
  times = jnp.array([[100.0, 500.0, 900.0, 0.0]] * 2)
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  with pytest.raises(ValueError, match="model.dtype=bfloat16"):  # float32 compute: refused, not cast
    nnx.merge(nnx.graphdef(DiT(dataclasses.replace(CFG, attention="cudnn"), rngs=nnx.Rngs(0))), model.params)(
        batch.tokens, times, batch.packing)
  calls, original = [], jax.nn.dot_product_attention

  def as_xla(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    calls.append((implementation, q.dtype, bias.shape, bias.dtype))
    return original(q, k, v, bias, mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  outs = {}
  for impl in ("xla", "cudnn"):
    graphdef = nnx.graphdef(DiT(dataclasses.replace(bf16, attention=impl), rngs=nnx.Rngs(0)))
    outs[impl] = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(model.params, batch.tokens, times, batch.packing))
  b, length = batch.packing.segment_ids.shape
  # Self- and cross-attention, in every layer's trace (the stacked layers trace once).
  assert {c[0] for c in calls} == {"cudnn"} and {c[1] for c in calls} == {jnp.dtype(jnp.bfloat16)}
  assert (b, 1, length, length) in {c[2] for c in calls}
  # The mask bias survives the cast to half precision as a finite number (no -inf rows).
  seg = batch.packing.segment_ids
  bias = attention.make_mask(seg, seg, "cudnn").bias
  assert np.isfinite(np.asarray(bias.astype(jnp.float16))).all() and float(bias.min()) < -1e4
  real = np.asarray(seg) > 0
  scale = np.abs(outs["xla"][real]).max()
  np.testing.assert_allclose(outs["cudnn"][real], outs["xla"][real], atol=0.02 * scale + 1e-2)
