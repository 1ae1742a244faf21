"""The Wan 2.1 transformer: imported from the diffusers layout, the same outputs as
diffusers' `WanTransformer3DModel`, sharded import, the Orbax copy and the export."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import wan
from src.batch import Packing
from src.models.patch import patchify, unpatchify
from src.pretrained import CheckpointConfigError, WeightsError

SHAPES = [(3, 4, 6), (1, 8, 4)]  # latent (T, H, W) of the two examples


def _inputs(shape, batch=2, text_len=5, seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.normal(size=(batch, 4, *shape)).astype(np.float32)
  timestep = rng.uniform(0, 1000, size=batch).astype(np.float32)
  text = rng.normal(size=(batch, text_len, 24)).astype(np.float32)
  return latents, timestep, text


def _reference(torch_model, latents, timestep, text):
  import torch

  with torch.no_grad():
    out = torch_model(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)
  return out[0].numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_same_output_as_diffusers(tiny_wan, shape):
  root, torch_model = tiny_wan
  model = wan.load_pretrained_wan(root)
  inputs = _inputs(shape)
  ours = np.asarray(wan.wan_forward(model, *inputs))
  ref = _reference(torch_model, *inputs)
  assert ours.shape == ref.shape
  assert np.abs(ref).max() > 0.1  # a real output, not near-zero everywhere
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_packed_row_gives_each_example_its_own_output(tiny_wan):
  root, torch_model = tiny_wan
  model = wan.load_pretrained_wan(root)
  examples = [_inputs(shape, batch=1, text_len=n, seed=i) for i, (shape, n) in enumerate(zip(SHAPES, (5, 3)))]
  tokens, positions, grids = zip(*(patchify(lat[0].transpose(1, 2, 3, 0), (1, 2, 2)) for lat, _, _ in examples))
  n = [len(t) for t in tokens]
  seq = sum(n) + 4  # and some padding
  seg = np.zeros((1, seq), np.int32)
  seg[0, :n[0]], seg[0, n[0]:sum(n)] = 1, 2
  pad = lambda a: np.concatenate([np.concatenate(a), np.zeros((seq - sum(n), a[0].shape[1]), a[0].dtype)])[None]
  texts = [text[0] for _, _, text in examples]
  packing = Packing(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pad(positions)),
                    grid=jnp.asarray(np.array(grids, np.int32)[None]), labels=jnp.full((1, 2), -1, jnp.int32),
                    cond=jnp.asarray(np.concatenate(texts)[None]),
                    cond_segment_ids=jnp.asarray(np.repeat([1, 2], [len(t) for t in texts])[None].astype(np.int32)))
  time = jnp.asarray([[examples[0][1][0], examples[1][1][0]]])
  out = np.asarray(model(jnp.asarray(pad(tokens)), time, packing))[0]
  for i, (lat, ts, text) in enumerate(examples):
    start = sum(n[:i])
    video = unpatchify(out[start:start + n[i]], grids[i], (1, 2, 2), 4).transpose(3, 0, 1, 2)
    np.testing.assert_allclose(video, _reference(torch_model, lat, ts, text)[0], atol=1e-4, rtol=0)


def _flat(model_or_state):
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(fsdp=2, tensor=4)])
def test_sharded_import_reads_only_each_devices_blocks(tiny_wan, axes, monkeypatch):
  """On 8 devices the parameters equal the unsharded import; each parameter's reads
  total the bytes of its distinct device blocks (replicas read once), and no single
  read of a sharded parameter is larger than one device's block: a whole tensor (let
  alone the model) is never materialised for one shard."""
  from src import mesh as mesh_lib
  from src import weights
  from src.config import MeshConfig

  root, _ = tiny_wan
  reference = _flat(wan.load_pretrained_wan(root))
  reads: dict[str, list[int]] = {}
  real_read = weights.Checkpoint.read

  def counting(self, name, index):
    block = real_read(self, name, index)
    reads.setdefault(name, []).append(block.nbytes)
    return block

  monkeypatch.setattr(weights.Checkpoint, "read", counting)
  mesh = mesh_lib.make_mesh(MeshConfig(**{"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **axes}))
  model = wan.load_pretrained_wan(root, mesh=mesh)
  sources, split = wan.sources(model.cfg), 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    blocks = {tuple((i.start, i.stop) for i in s.index): s.data.nbytes for s in value.addressable_shards}
    names = [v.name for v in sources[path].views]
    assert sum(sum(reads[n]) for n in names) == sum(blocks.values()), path
    if max(blocks.values()) < value.nbytes:
      split += 1
      layer_block = max(blocks.values()) // (len(names) if sources[path].stacked else 1)
      assert max(max(reads[n]) for n in names) <= max(layer_block, 1), path
    np.testing.assert_array_equal(np.asarray(jax.device_get(value)), reference[path], err_msg=str(path))
  assert split >= 10  # the test covers sharded parameters, not only replicated ones


def test_a_merged_view_reads_any_block(tmp_path):
  """A Conv3d-like weight [D, C, kt, kh, kw] as [kt*kh*kw*C, D] (merged axes) and the
  RoPE-permuted q kernel: any block equals the same block of the full target."""
  from safetensors.numpy import save_file

  from src import weights

  conv = np.arange(6 * 2 * 1 * 2 * 2, dtype=np.float32).reshape(6, 2, 1, 2, 2)
  q = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)  # [N*Dh, D], N=2, Dh=4
  save_file({"conv": conv, "q": q}, tmp_path / "w.safetensors")
  cases = {"conv": (weights.View("conv", ((6,), (2,), (1,), (2,), (2,)), (2, 3, 4, 1, 0), (4, 1)),
                    conv.transpose(2, 3, 4, 1, 0).reshape(8, 6)),
           "q": (weights.View("q", ((2, 2, 2), (6,)), (3, 0, 2, 1), (1, 1, 2)),
                 q.reshape(2, 2, 2, 6).transpose(3, 0, 2, 1).reshape(6, 2, 4))}
  # Wan pair (2i, 2i+1) -> our (i, i + Dh/2): head 0's dims [0, 2, 1, 3]
  np.testing.assert_array_equal(cases["q"][1][:, 0, :], q[[0, 2, 1, 3]].T)
  rng = np.random.RandomState(0)
  with weights.Checkpoint(tmp_path, "w.safetensors") as ckpt:
    for view, full in cases.values():
      source = weights.Source((view,))
      assert source.shape == full.shape
      for _ in range(30):
        starts = [rng.randint(0, d) for d in full.shape]
        index = tuple(slice(a, rng.randint(a + 1, d + 1)) for a, d in zip(starts, full.shape))
        np.testing.assert_array_equal(weights._read_block(ckpt, source, np.float32, index), full[index])
      back = weights.to_tensors({"k": source}, {"k": full})[view.name]
      np.testing.assert_array_equal(back, conv if view.name == "conv" else q)


def test_bad_checkpoints_name_the_tensor(tiny_wan, tmp_path):
  import shutil

  from safetensors.numpy import load_file, save_file

  root, _ = tiny_wan
  src = root / "transformer"

  def variant(edit):
    dst = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = {}
    for f in src.glob("*.safetensors"):
      tensors.update(load_file(f))
    edit(tensors)
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
    return dst

  with pytest.raises(WeightsError, match="missing tensor 'blocks.1.attn2.to_k.weight'"):
    wan.load_pretrained_wan(variant(lambda t: t.pop("blocks.1.attn2.to_k.weight")))
  with pytest.raises(WeightsError, match="unexpected tensor.*extra.weight"):
    wan.load_pretrained_wan(variant(lambda t: t.update({"extra.weight": np.zeros(3, np.float32)})))
  with pytest.raises(WeightsError, match="'proj_out.bias' has shape"):
    wan.load_pretrained_wan(variant(lambda t: t.update({"proj_out.bias": np.zeros(3, np.float32)})))
  import dataclasses

  wrong = dataclasses.replace(wan.model_config(wan.read_config(root)), depth=3)
  with pytest.raises(CheckpointConfigError, match="model.depth: config 3, checkpoint 2"):
    wan.load_pretrained_wan(root, cfg=wrong)
  with pytest.raises(FileNotFoundError, match="neither a diffusers Wan transformer"):
    wan.load_pretrained_wan(tmp_path)


def test_orbax_copy_and_export_round_trip(tiny_wan, tmp_path):
  """The Orbax copy loads the same parameters; the export is the diffusers checkpoint
  again (every tensor equal), sharded with an index when asked, and diffusers loads it."""
  import torch
  from diffusers import WanTransformer3DModel
  from safetensors.numpy import load_file

  root, torch_model = tiny_wan
  model = wan.load_pretrained_wan(root)
  params = nnx.state(model, nnx.Param)
  wan.save_orbax(params, model.cfg, tmp_path / "orbax")
  again = wan.load_pretrained_wan(tmp_path / "orbax")
  for k, v in _flat(model).items():
    np.testing.assert_array_equal(_flat(again)[k], v)
  out = wan.export_diffusers(params, model.cfg, tmp_path / "export", max_shard_bytes=30_000)
  index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  exported = {}
  for f in set(index["weight_map"].values()):
    exported.update(load_file(out / f))
  reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert exported.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(exported[k], reference[k], err_msg=k)
  loaded = WanTransformer3DModel.from_pretrained(out).eval()
  inputs = _inputs(SHAPES[0])
  np.testing.assert_allclose(_reference(loaded, *inputs), _reference(torch_model, *inputs), atol=0)
  assert torch.cuda.is_available() is False


@pytest.mark.parametrize("variant, layers", [("wan2.1-t2v-1.3b", 30), ("wan2.1-t2v-14b", 40)])
def test_published_sizes_map_every_tensor(variant, layers):
  """The published 1.3B and 14B layouts (diffusers' own module on the meta device:
  shapes only) map tensor for tensor onto our variants."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from src.config import ModelConfig
  from src.models.dit import dimensions, mlp_width

  sizes = {"wan2.1-t2v-1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
           "wan2.1-t2v-14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)}[variant]
  with torch.device("meta"):
    ref = diffusers.WanTransformer3DModel(**sizes)
  ours = ModelConfig(variant=variant, text_encoder="umt5", in_channels=16, cond_dim=4096)
  theirs = wan.model_config(dict(ref.config))
  assert (dimensions(theirs), mlp_width(theirs)) == (dimensions(ours), mlp_width(ours))
  wan.check_fits(ours, dict(ref.config), variant)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  got = {v.name: v.source_shape for s in wan.sources(ours).values() for v in s.views}
  assert got == want
  n = sum(math.prod(s) for s in want.values())
  assert n == sum(math.prod(s.shape) for s in wan.sources(ours).values())
  assert dimensions(ours)[0] == layers
