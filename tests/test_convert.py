"""Weight import: diffusers AutoencoderKLWan -> VideoVAE (src.pretrained), bad weights, the CLI (src.convert).

The reference tests need the `interop` extra (torch, diffusers) and skip without it;
the rest write diffusers-layout files from a VideoVAE with numpy alone.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from src.convert import main
from src.pretrained import (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, WeightsError, diffusers_vae_name, load_pretrained_vae,
                            vae_config_from_diffusers, vae_params_from_diffusers)
from src.models.vae import VideoVAE

ROOT = Path(__file__).resolve().parents[1]
TINY_DIFFUSERS = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                      latents_std=[1.5, 0.5, 1.0, 2.0])

encode = nnx.jit(lambda m, x: m.encode(x)[0])  # posterior mean
encode_posterior = nnx.jit(lambda m, x: m.encode(x))
decode = nnx.jit(lambda m, z: m.decode(z))


def video(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, shape), jnp.float32)


def export_diffusers(vae, directory: Path) -> Path:
  """Write `vae` in the diffusers layout: the inverse of the converter's mapping."""
  tensors = {}
  for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
    name, value = diffusers_vae_name(path), np.asarray(var[...])
    if path[-1] == "kernel":  # [*k, Cin, Cout] -> [Cout, Cin, *k]
      value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    elif path[-1] == "gamma":  # attention norms are 2D (per frame), the others 3D
      value = value.reshape(-1, 1, 1) if "attentions" in name else value.reshape(-1, 1, 1, 1)
    tensors[name] = np.ascontiguousarray(value)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, directory / DIFFUSERS_WEIGHTS)
  (directory / DIFFUSERS_CONFIG).write_text(json.dumps(dict(TINY_DIFFUSERS, _class_name="AutoencoderKLWan")))
  return directory


def params_of(vae):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  cfg = vae_config_from_diffusers(TINY_DIFFUSERS)
  vae = VideoVAE(cfg, rngs=nnx.Rngs(jax.random.key(3, impl="rbg")))  # rbg: threefry compiles slowly on CPU
  return export_diffusers(vae, tmp_path_factory.mktemp("diffusers")), vae


def edited_copy(src: Path, dst: Path, edit) -> Path:
  shutil.copytree(src, dst)
  tensors = load_file(src / DIFFUSERS_WEIGHTS)
  edit(tensors)
  save_file(tensors, dst / DIFFUSERS_WEIGHTS)
  return dst


def test_diffusers_directory_loads_exactly(exported):
  directory, vae = exported
  loaded, cfg = load_pretrained_vae(directory)
  assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (8, 4, [1, 2, 2, 2], 1)
  assert cfg.latents_std == TINY_DIFFUSERS["latents_std"]
  want, got = params_of(vae), params_of(loaded)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_missing_tensor_is_named(exported, tmp_path):
  name = "decoder.up_blocks.0.upsamplers.0.time_conv.weight"
  bad = edited_copy(exported[0], tmp_path / "bad", lambda t: t.pop(name))
  with pytest.raises(WeightsError, match=f"missing tensor '{name}'"):
    load_pretrained_vae(bad)


def test_misshaped_tensor_is_named(exported, tmp_path):
  name = "encoder.down_blocks.0.conv1.weight"
  bad = edited_copy(exported[0], tmp_path / "bad", lambda t: t.update({name: t[name][:, :, :2]}))
  with pytest.raises(WeightsError, match=f"tensor '{name}' has shape"):
    load_pretrained_vae(bad)


def test_unexpected_tensor_is_named(exported, tmp_path):
  bad = edited_copy(exported[0], tmp_path / "bad", lambda t: t.update({"encoder.extra.weight": np.zeros(3)}))
  with pytest.raises(WeightsError, match="encoder.extra.weight"):
    load_pretrained_vae(bad)


def test_missing_or_unrecognised_directory(exported, tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_pretrained_vae(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="neither an Orbax"):
    load_pretrained_vae(tmp_path)
  (tmp_path / "only_config").mkdir()
  shutil.copy(exported[0] / DIFFUSERS_CONFIG, tmp_path / "only_config")
  with pytest.raises(FileNotFoundError, match=DIFFUSERS_WEIGHTS):
    load_pretrained_vae(tmp_path / "only_config")


def test_other_vae_layouts_are_refused():
  with pytest.raises(ValueError, match="is_residual"):
    vae_config_from_diffusers(dict(TINY_DIFFUSERS, is_residual=True))  # the Wan 2.2 VAE


def test_help(capsys):
  for argv in (["--help"], ["vae", "--help"]):
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 0
  out = capsys.readouterr().out
  assert "vae" in out and "--src" in out and "--dst" in out


def test_cli_round_trip(exported, tmp_path):
  directory, _ = exported
  dst = tmp_path / "orbax"
  cmd = [sys.executable, "-m", "src.convert", "vae", "--src", str(directory), "--dst", str(dst)]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
  from_diffusers, cfg = load_pretrained_vae(directory)
  from_orbax, cfg_orbax = load_pretrained_vae(dst)
  assert cfg_orbax == cfg
  want, got = params_of(from_diffusers), params_of(from_orbax)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  x = video((1, 5, 16, 16, 3))
  np.testing.assert_array_equal(encode(from_orbax, x), encode(from_diffusers, x))
  with pytest.raises(SystemExit, match="exists"):  # no silent overwrite
    main(["vae", "--src", str(directory), "--dst", str(dst)])
  with pytest.raises(SystemExit, match="not found"):
    main(["vae", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "out")])


# Agreement with diffusers itself (torch on CPU, float32).


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(**TINY_DIFFUSERS).eval()
  with torch.no_grad():  # non-unit norm scales, so a misplaced gamma shows
    for name, p in ref.named_parameters():
      if name.endswith("gamma"):
        p.uniform_(0.5, 1.5)
  directory = tmp_path_factory.mktemp("reference")
  ref.save_pretrained(directory)
  return ref, load_pretrained_vae(directory)[0]


@pytest.mark.parametrize("frames", [9, 1])  # a 1 + 4k-frame clip and an image
def test_matches_diffusers(reference, frames):
  import torch
  ref, vae = reference
  x = video((1, frames, 16, 24, 3), seed=frames)
  to_torch = lambda a: torch.from_numpy(np.array(a)).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
  to_numpy = lambda t: t.permute(0, 2, 3, 4, 1).numpy()
  with torch.no_grad():
    posterior = ref.encode(to_torch(x)).latent_dist
    want_mean, want_logvar = to_numpy(posterior.mean), to_numpy(posterior.logvar)
    want_video = to_numpy(ref.decode(posterior.mean).sample)
  mean, logvar = encode_posterior(vae, x)
  assert mean.shape == want_mean.shape == (1, 1 + (frames - 1) // 4, 2, 3, 4)
  np.testing.assert_allclose(mean, want_mean, atol=1e-4)
  np.testing.assert_allclose(logvar, want_logvar, atol=1e-4)
  assert np.mean(np.abs(want_video) < 1) > 0.9  # the comparison is not just of clipped values
  np.testing.assert_allclose(decode(vae, want_mean), want_video, atol=1e-4)


def test_published_wan21_layout_maps():
  """Every tensor of the full-size Wan 2.1 VAE maps onto VideoVAE (names and shapes)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):  # shapes only, no memory
    ref = diffusers.AutoencoderKLWan()
  cfg = vae_config_from_diffusers(dict(ref.config))
  assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult) == (96, 16, [1, 2, 4, 4])
  zero = np.zeros((), np.float32)
  tensors = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in ref.state_dict().items()}
  params = vae_params_from_diffusers(tensors, cfg)
  assert sum(a.size for a in jax.tree.leaves(params)) == sum(t.size for t in tensors.values())
