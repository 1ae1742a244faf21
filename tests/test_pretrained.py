"""The one VAE loader, `load_vae(cfg)`: architecture from the checkpoint, runtime fields
(dtype, chunk_frames) from the config, conflicting sizes named; random init without one.

The checkpoints are Orbax copies (`save_vae`) of a tiny random VideoVAE, so no torch is
needed; the diffusers-directory test needs the `interop` extra and skips without it.
"""

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src.config import VAEConfig
from src.models.vae import Conv, VideoVAE
from src.pretrained import CheckpointConfigError, load_vae, read_vae_config, save_vae

SAVED = VAEConfig(enabled=True, base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
SEED = 3

encode = nnx.jit(lambda m, x: m.encode(x)[0])  # posterior mean (float32 whatever the compute dtype)
decode = nnx.jit(lambda m, z: m.decode(z))


def make_vae(cfg: VAEConfig, seed: int) -> VideoVAE:
  return VideoVAE(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))  # rbg: threefry compiles slowly on CPU


def params_of(vae):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def assert_same_params(got, want):
  want, got = params_of(want), params_of(got)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def conv_dtypes(vae):
  return {jnp.dtype(m.dtype).name for _, m in nnx.iter_modules(vae) if isinstance(m, Conv)}


def video(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, shape), jnp.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(Orbax directory, the VideoVAE saved in it): float32, chunk_frames 4."""
  vae = make_vae(SAVED, SEED)
  return save_vae(vae, SAVED, tmp_path_factory.mktemp("vae") / "orbax"), vae


def user_config(checkpoint, **changes) -> VAEConfig:
  return dataclasses.replace(SAVED, checkpoint=str(checkpoint), **changes)


def test_checkpoint_keeps_the_configured_dtype_and_chunking(saved):
  directory, original = saved
  vae = load_vae(user_config(directory, dtype="bfloat16", chunk_frames=8))
  assert (vae.cfg.dtype, vae.cfg.chunk_frames, vae.chunk_frames) == ("bfloat16", 8, 8)
  assert conv_dtypes(vae) == {"bfloat16"}
  assert_same_params(vae, original)  # the saved weights, in float32 (only the compute is bf16)
  # The computation follows: bf16 activations (decode returns them), the values of a bf16
  # model with these weights, not those of the float32 original.
  x = video((1, 5, 16, 16, 3))
  mean = encode(vae, x)
  np.testing.assert_array_equal(mean, encode(make_vae(dataclasses.replace(SAVED, dtype="bfloat16"), SEED), x))
  assert np.abs(mean - encode(original, x)).max() > 1e-4
  assert decode(vae, mean).dtype == jnp.bfloat16
  # Chunked encoding scans over 8-frame chunks: 16 frames after the first are 2 steps.
  jaxpr = str(jax.make_jaxpr(lambda v: vae.encode_chunked(v))(video((1, 17, 16, 16, 3))))
  assert re.findall(r"length=(\d+)", jaxpr) == ["2"]


def test_conflicting_sizes_are_all_named(saved):
  directory, _ = saved
  cfg = user_config(directory, z_dim=8, base_dim=16, latents_mean=[0.0] * 8, latents_std=[])
  with pytest.raises(CheckpointConfigError) as e:
    load_vae(cfg)
  assert isinstance(e.value, ValueError)
  msg = str(e.value)
  assert "vae.z_dim: config 8, checkpoint 4" in msg
  assert "vae.base_dim: config 16, checkpoint 8" in msg
  assert f"vae.latents_mean: config {[0.0] * 8}, checkpoint {SAVED.latents_mean}" in msg
  assert "checkpoint's values" in msg and "vae.checkpoint empty" in msg
  assert not re.search(r"vae\.(dim_mult|num_res_blocks|in_channels|temporal_downsample|latents_std)", msg)


def test_conflicting_lists_are_named(saved):
  directory, _ = saved
  cfg = user_config(directory, dim_mult=[1, 2, 2], temporal_downsample=[False, True], latents_mean=[],
                    latents_std=[])
  with pytest.raises(CheckpointConfigError, match=re.escape("vae.dim_mult: config [1, 2, 2], checkpoint [1, 2, 2, 2]")):
    load_vae(cfg)


def test_matching_config_loads(saved):
  directory, original = saved
  assert read_vae_config(directory) == SAVED
  vae = load_vae(user_config(directory))
  assert vae.cfg == user_config(directory) and conv_dtypes(vae) == {"float32"}
  assert_same_params(vae, original)
  # Empty latent statistics are taken from the checkpoint, not replaced by 0 and 1.
  vae = load_vae(user_config(directory, latents_mean=[], latents_std=[]))
  assert vae.latents_mean == tuple(SAVED.latents_mean) and vae.latents_std == tuple(SAVED.latents_std)
  assert vae.cfg.latents_mean == SAVED.latents_mean


def test_no_checkpoint_is_the_seeded_random_vae(caplog):
  cfg = dataclasses.replace(SAVED, checkpoint="")
  with caplog.at_level(logging.WARNING, logger="src.pretrained"):
    vae = load_vae(cfg, seed=5)
  assert "randomly initialised" in caplog.text
  assert vae.cfg == cfg
  assert_same_params(vae, make_vae(cfg, 5))
  assert not np.array_equal(vae.encoder.conv_in.kernel[...], make_vae(cfg, 0).encoder.conv_in.kernel[...])


def test_diffusers_directory_keeps_the_configured_runtime_fields(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=SAVED.latents_mean,
                                   latents_std=SAVED.latents_std)
  ref.save_pretrained(tmp_path / "vae")  # a model root with vae/
  vae = load_vae(user_config(tmp_path, dtype="bfloat16", chunk_frames=8, latents_mean=[], latents_std=[]))
  assert (vae.chunk_frames, conv_dtypes(vae)) == (8, {"bfloat16"})
  assert vae.latents_std == tuple(SAVED.latents_std)
  want = ref.encoder.conv_in.weight.detach().numpy().transpose(2, 3, 4, 1, 0)  # [Cout, Cin, *k] -> [*k, Cin, Cout]
  np.testing.assert_array_equal(vae.encoder.conv_in.kernel[...], want)
  with pytest.raises(CheckpointConfigError, match="vae.z_dim: config 16, checkpoint 4"):
    load_vae(user_config(tmp_path, z_dim=16, latents_mean=[], latents_std=[]))
