"""The umT5 / T5 v1.1 encoder against transformers, its sharded import, and src.weights.

Every fixture is made here: tiny random checkpoints written by transformers (those
tests skip without torch/transformers) or by `save_pretrained_umt5` (no torch).
"""

import dataclasses
import json
import shutil
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from src import mesh as M
from src import weights
from src.config import MeshConfig
from src.models.umt5 import UMT5Config, UMT5Encoder, relative_position_bucket
from src.pretrained import WeightsError
from src.text_encoder import hf_sources, load_pretrained_umt5, read_umt5_config, save_pretrained_umt5

# d_model != heads * d_kv, so a transposed or mis-split projection cannot fit; 8 buckets
# up to distance 20 put 24 tokens through the exact, log-spaced and clipped buckets.
SIZES = dict(vocab_size=300, d_model=40, d_kv=6, d_ff=48, num_layers=3, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20)
TINY = UMT5Config(**SIZES)
Q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"

encode = nnx.jit(lambda enc, ids, mask: enc(ids, mask))


def inputs(batch=8, length=24, seed=0):
  """(ids, mask) [B, L] int32: row 0 full, then right- and left-padded rows."""
  rng = np.random.RandomState(seed)
  mask = np.ones((batch, length), np.int32)
  for row in range(1, batch):
    pad = rng.randint(1, length // 2)
    if row % 2:
      mask[row, length - pad:] = 0
    else:
      mask[row, :pad] = 0
  return rng.randint(1, SIZES["vocab_size"], (batch, length)).astype(np.int32) * mask, mask


def hf_reference(model, ids, mask) -> np.ndarray:
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
  return out.last_hidden_state.numpy()


def hf_checkpoint(directory, model_type: str, **save_kwargs):
  """A random transformers encoder with every weight perturbed (norm scales are not
  ones, no tensor is zero), saved with save_pretrained; returns the model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model_cls, config_cls = {"umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
                           "t5": (transformers.T5EncoderModel, transformers.T5Config)}[model_type]
  torch.manual_seed(0)
  model = model_cls(config_cls(**SIZES, feed_forward_proj="gated-gelu")).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, **save_kwargs)
  return model


def assert_close_on_tokens(got, want, mask, atol):
  assert np.abs(want).mean() > 0.1  # the check is not vacuous
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() <= atol, np.abs(got[real] - want[real]).max()


def flat_params(enc) -> dict:
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(enc, nnx.Param))}


def random_encoder(cfg: UMT5Config, seed=0) -> UMT5Encoder:
  """A random UMT5Encoder whose norm scales are perturbed away from ones too."""
  enc = UMT5Encoder(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(enc, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
  nnx.update(enc, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  return enc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory, encoder) of a random umT5 written by save_pretrained_umt5 (no torch)."""
  enc = random_encoder(TINY)
  return save_pretrained_umt5(enc, TINY, tmp_path_factory.mktemp("ours") / "umt5"), enc


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
  """(directory, model): a transformers umT5 saved in several shards plus an index."""
  directory = tmp_path_factory.mktemp("hf") / "text_encoder"
  model = hf_checkpoint(directory, "umt5", max_shard_size="20KB")
  assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 1
  return directory, model


# (a) Agreement with transformers.


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_matches_transformers(tmp_path, model_type):
  """umT5 (a bias table per layer) and T5 v1.1 (layer 0's, shared) equal transformers'
  last hidden state on padded rows; the model root layout (text_encoder/) is found."""
  model = hf_checkpoint(tmp_path / "text_encoder", model_type)
  with safe_open(tmp_path / "text_encoder" / "model.safetensors", framework="numpy") as f:
    biases = [k for k in f.keys() if "relative_attention_bias" in k]
  assert len(biases) == (TINY.num_layers if model_type == "umt5" else 1)
  ids, mask = inputs()
  enc = load_pretrained_umt5(tmp_path)
  assert read_umt5_config(tmp_path) == dataclasses.replace(TINY, model_type=model_type)
  assert_close_on_tokens(np.asarray(encode(enc, ids, mask)), hf_reference(model, ids, mask), mask, atol=1e-4)


def test_buckets_match_transformers():
  """Every relative position in [-20000, 20000] lands in transformers' bucket, at the
  umT5 sizes (32 buckets, distance 128) and at others."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  rel = np.arange(-20000, 20001)
  for buckets, distance in [(32, 128), (8, 20), (64, 256), (16, 4096)]:
    cfg = transformers.UMT5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance)
    want = transformers.models.umt5.modeling_umt5.UMT5Attention(cfg)._relative_position_bucket(torch.tensor(rel))
    np.testing.assert_array_equal(relative_position_bucket(rel, buckets, distance), want.numpy())


def test_bfloat16_compute_is_close_and_keeps_float32_parameters(saved):
  directory, _ = saved
  ids, mask = inputs()
  full = np.asarray(encode(load_pretrained_umt5(directory), ids, mask))
  enc = load_pretrained_umt5(directory, dtype="bfloat16")
  assert {v.dtype for v in flat_params(enc).values()} == {np.dtype("float32")}
  half = np.asarray(encode(enc, ids, mask))
  assert half.dtype == np.float32
  err = np.abs(half - full).max() / np.abs(full).max()
  assert 0 < err < 0.05, err


# (b) The sharded import.


class CountingOpen:
  """safe_open, counting the bytes every get_slice(name)[...] returns, by tensor."""

  def __init__(self):
    self.bytes = Counter()

  def __call__(self, path, framework):
    return _Handle(safe_open(path, framework=framework), self.bytes)


class _Handle:
  def __init__(self, handle, counts):
    self.handle, self.counts = handle, counts

  def __getattr__(self, attr):
    return getattr(self.handle, attr)

  def get_slice(self, name):
    return _Slice(self.handle.get_slice(name), name, self.counts)


class _Slice:
  def __init__(self, piece, name, counts):
    self.piece, self.name, self.counts = piece, name, counts

  def __getattr__(self, attr):
    return getattr(self.piece, attr)

  def __getitem__(self, index):
    block = self.piece[index]
    self.counts[self.name] += block.nbytes
    return block


MESHES = {  # name: (mesh sizes, rules overrides)
    "fsdp2_tensor4": (MeshConfig(data=1, fsdp=2, sequence=1, tensor=4), {}),
    "fsdp8": (MeshConfig(data=1, fsdp=8, sequence=1, tensor=1), {}),
    # head_dim split instead of heads: q/k/v blocks are strided in HF's fused axis
    "head_dim_split": (MeshConfig(data=1, fsdp=4, sequence=1, tensor=2), {"heads": None, "head_dim": "tensor"}),
}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_import_reads_only_each_shard(hf_sharded, monkeypatch, name):
  """Sharded as the rules say; each parameter's reads total the bytes of its distinct
  device blocks (replicas read once); the output equals one device's."""
  directory, _ = hf_sharded
  sizes, overrides = MESHES[name]
  mesh, rules = M.make_mesh(sizes), M.make_rules(overrides)
  ids, mask = inputs()
  plain = np.asarray(encode(load_pretrained_umt5(directory), ids, mask))
  counting = CountingOpen()
  monkeypatch.setattr(weights, "safe_open", counting)
  enc = load_pretrained_umt5(directory, mesh=mesh, rules=rules)
  sources, split = hf_sources(read_umt5_config(directory)), 0
  for path, var in nnx.to_flat_state(nnx.state(enc, nnx.Param)):
    value = var.get_value()
    assert value.sharding.spec == M.logical_to_spec(var.get_metadata()["out_sharding"], rules), path
    blocks = {tuple((i.start, i.stop) for i in s.index): s.data.nbytes for s in value.addressable_shards}
    # Reading a block takes at least its bytes, so equal totals mean each distinct
    # block (replicas share one) was read once and alone.
    assert sum(counting.bytes[v.name] for v in sources[path].views) == sum(blocks.values()), path
    split += max(blocks.values()) < value.nbytes
  assert split >= 8  # the test covers sharded parameters, not only replicated ones
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharded = np.asarray(nnx.jit(lambda e, i, m: e(i, m))(enc, ids, mask))  # fresh jit: rules are read when tracing
  np.testing.assert_allclose(sharded, plain, atol=1e-5, rtol=0)


# (c) Tensors that do not fit.


def _edit_checkpoint(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


BAD = {  # case: (edit of the tensors, what the error must say)
    "missing": (lambda t: t.pop("encoder.block.2.layer.1.DenseReluDense.wo.weight"),
                r"missing tensor 'encoder\.block\.2\.layer\.1\.DenseReluDense\.wo\.weight'.*blocks\.wo\.kernel"),
    "unexpected": (lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.extra.weight": t[Q0]}),
                   r"unexpected tensor.*'?encoder\.block\.0\.layer\.0\.SelfAttention\.extra\.weight"),
    "mis-shaped": (lambda t: t.update({Q0: np.ascontiguousarray(t[Q0].T)}),
                   r"tensor 'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight' has shape \(40, 24\).*\(24, 40\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_tensor_that_does_not_fit_is_named(saved, tmp_path, case):
  edit, message = BAD[case]
  directory = _edit_checkpoint(saved[0], tmp_path / case, edit)
  with pytest.raises(WeightsError, match=message):
    load_pretrained_umt5(directory)


def test_the_tied_embedding_duplicate_is_accepted_once(saved, tmp_path):
  """shared.weight alone (transformers 5), both copies, or only the encoder's copy."""
  directory, enc = saved
  both = _edit_checkpoint(directory, tmp_path / "both",
                          lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"]}))
  only_encoder = _edit_checkpoint(directory, tmp_path / "encoder",
                                  lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
  for path in (both, only_encoder):
    np.testing.assert_array_equal(flat_params(load_pretrained_umt5(path))[("embed", "table")],
                                  flat_params(enc)[("embed", "table")])


def test_config_errors_name_the_key(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf(), "feed_forward_proj": "relu"}))
  with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
    read_umt5_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in TINY.to_hf().items() if k != "d_kv"}))
  with pytest.raises(ValueError, match="d_kv"):
    read_umt5_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained_umt5(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    read_umt5_config(tmp_path / "nowhere")


# (d) Writing the HF layout.


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_save_load_round_trip_is_exact_and_transformers_agrees(tmp_path, model_type):
  cfg = dataclasses.replace(TINY, model_type=model_type)
  enc = random_encoder(cfg, seed=4)
  directory = save_pretrained_umt5(enc, cfg, tmp_path / model_type)
  loaded, want = flat_params(load_pretrained_umt5(directory)), flat_params(enc)
  assert loaded.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(loaded[path], want[path], err_msg=str(path))
  ids, mask = inputs()
  ours = np.asarray(encode(enc, ids, mask))
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  model_cls = transformers.UMT5EncoderModel if model_type == "umt5" else transformers.T5EncoderModel
  model, info = model_cls.from_pretrained(directory, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert_close_on_tokens(ours, hf_reference(model.eval(), ids, mask), mask, atol=1e-4)


def test_bfloat16_tensors_are_read_too(saved, tmp_path):
  """Checkpoints stored in bf16 (a dtype numpy lacks) load as their float32 values."""
  directory, _ = saved
  half = _edit_checkpoint(directory, tmp_path / "bf16",
                          lambda t: t.update({k: v.astype(jax.numpy.bfloat16) for k, v in t.items()}))
  with safe_open(half / "model.safetensors", framework="numpy") as f:
    assert f.get_slice(Q0).get_dtype() == "BF16"
  got, want = flat_params(load_pretrained_umt5(half)), flat_params(load_pretrained_umt5(directory))
  for path in want:
    np.testing.assert_array_equal(got[path], np.asarray(want[path]).astype(jax.numpy.bfloat16).astype(np.float32))


# src.weights on its own.


def test_a_view_reads_any_block_of_a_reshaped_transposed_tensor(tmp_path):
  """Random blocks of target = src.reshape(2, 3, 4, 5).transpose(3, 0, 2, 1) equal the
  same block of the full target, reading only the block's bytes."""
  src = np.arange(6 * 20, dtype=np.float32).reshape(6, 20)
  save_file({"w": src}, tmp_path / "w.safetensors")
  source = weights.Source((weights.View("w", ((2, 3), (4, 5)), (3, 0, 2, 1)),))
  full = src.reshape(2, 3, 4, 5).transpose(3, 0, 2, 1)
  assert source.shape == full.shape
  rng = np.random.RandomState(0)
  with weights.Checkpoint(tmp_path, "w.safetensors") as ckpt:
    for _ in range(50):
      starts = [rng.randint(0, d) for d in full.shape]
      index = tuple(slice(a, rng.randint(a + 1, d + 1)) for a, d in zip(starts, full.shape))
      before = ckpt.bytes_read
      np.testing.assert_array_equal(weights._read_block(ckpt, source, np.float32, index), full[index])
      assert ckpt.bytes_read - before == full[index].nbytes
  back = weights.to_tensors({"k": source}, {"k": full})["w"]
  np.testing.assert_array_equal(back, src)
