"""The task objects (src/tasks): which one a config gets, their batch shapes from the
config, their losses and checks; and the VAE in training: task vae learns, the DiT
trains on pixels encoded in the step and on a latent cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import mesh as M
from src.batch import Packing
from src.tasks import DiTTask, PixelDiTTask, VAETask, make_task
from src.train import train

TINY_VAE = ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1",
            "data.channels=3", "data.frames=5", "data.height=16", "data.width=16", "data.batch_size=8",
            "train.tensorboard=false", "train.ckpt_every=1000"]


def losses(workdir, key="loss"):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r[key] for r in rows if key in r]


@pytest.mark.slow
def test_task_vae_learns_the_synthetic_clips(tmp_path):
  cfg = C.load(None, TINY_VAE + [f"workdir={tmp_path}", "task=vae", "train.steps=80", "train.log_every=10",
                                 "optim.lr=3e-3", "optim.warmup_steps=5", "train.eval_every=80", "train.eval_batches=1"])
  train(cfg)
  curve = losses(tmp_path)
  assert np.mean(curve[-2:]) < 0.6 * curve[0], curve
  assert losses(tmp_path, "val/loss")  # held-out reconstruction is logged too


@pytest.mark.slow
def test_dit_trains_on_pixels_encoded_in_the_step_and_samples_pixels(tmp_path):
  from src.generate import generate
  from src.runs import load_task_run

  cfg = C.load(None, TINY_VAE + [
      f"workdir={tmp_path}", "vae.enabled=true", "model.variant=tiny", "model.in_channels=4",
      "model.patch=[1,1,1]", "model.num_classes=10", "train.steps=3", "train.log_every=1",
  ])
  metrics = train(cfg)
  assert np.isfinite(metrics["loss"]) and metrics["tokens_per_s"] > 0
  cfg, task, graphdef, params = load_task_run(tmp_path)
  specs = task.sample_specs(2)
  assert specs[0].shape == (2, 2, 2)  # 5 frames at 16x16 -> 2 latent frames at 2x2
  frozen = task.sampling_frozen(M.make_mesh(cfg.mesh), M.make_rules())
  videos = generate(graphdef, params, cfg, specs, steps=2, frozen=frozen)
  assert videos[0].shape == (5, 16, 16, 3)


def test_bad_vae_shapes_fail_at_start_up():
  with pytest.raises(C.ConfigError, match="1 \\+ 4k frames"):
    make_task(C.load(None, TINY_VAE + ["vae.enabled=true", "data.frames=4", "model.in_channels=4"]))
  with pytest.raises(C.ConfigError, match="vae.z_dim"):
    make_task(C.load(None, TINY_VAE + ["vae.enabled=true", "model.in_channels=16"]))


@pytest.mark.slow
def test_latent_cache_round_trip_trains_a_packed_dit(tmp_path):
  """src.encode writes mixed-shape latents; the DiT trains on them with packing."""
  from src.data.latents import LatentSource
  from src.encode import main as encode_main

  mixed = ["data.area=1024", "data.frame_counts=[1,5]", "data.image_fraction=0.3", "data.seq_len=64",
           "data.synthetic.num_examples=12", "model.patch=[1,1,1]", "model.cond_dim=8"]
  rc = encode_main(["--out", str(tmp_path / "cache")] + TINY_VAE + mixed + ["vae.enabled=true", "model.in_channels=4"])
  assert rc == 0
  cache = LatentSource(tmp_path / "cache")
  assert len(cache) == 12
  shapes = {cache[i]["video"].shape for i in range(12)}
  assert len(shapes) > 1 and all(s[-1] == 4 and s[1] * s[2] <= 16 for s in shapes)  # 1024 px area / 8^2
  assert cache[0]["text"].shape == (8, 8)
  cfg = C.load(None, TINY_VAE + [
      "data.seq_len=64", "model.patch=[1,1,1]", "model.cond_dim=8",
      f"workdir={tmp_path / 'run'}", "data.source=latents", f"data.data_dir={tmp_path / 'cache'}",
      "data.channels=4", "model.in_channels=4", "model.variant=tiny", "train.steps=3", "train.log_every=3"])
  metrics = train(cfg)
  assert np.isfinite(metrics["loss"])


# The task objects themselves.

LATENT_DIT = ["model.variant=tiny", "model.num_classes=10", "model.cond_dim=8", "data.text_len=4",
              "data.area=64", "data.frame_counts=[1,2]", "data.seq_len=96", "data.max_segments=4", "data.batch_size=4"]
PIXEL_DIT = TINY_VAE + ["vae.enabled=true", "model.variant=tiny", "model.in_channels=4", "model.patch=[1,1,1]",
                        "model.cond_dim=8", "data.text_len=4", "data.batch_size=4"]
VAE = TINY_VAE + ["task=vae", "data.batch_size=4"]


@pytest.mark.parametrize("overrides, kind", [
    ([], DiTTask), (LATENT_DIT, DiTTask), (PIXEL_DIT, PixelDiTTask), (VAE, VAETask),
    (PIXEL_DIT + ["data.source=latents", "data.seq_len=8"], DiTTask),  # a latent cache is latents already
])
def test_make_task_picks_the_task(overrides, kind):
  assert type(make_task(C.load(None, overrides))) is kind


@pytest.mark.parametrize("overrides", [LATENT_DIT, PIXEL_DIT, VAE], ids=["dit", "pixel_dit", "vae"])
def test_batch_shapes_from_the_config_are_the_batches_shapes(overrides):
  """What the step is compiled for (no data read) is what the pipeline delivers."""
  task = make_task(C.load(None, overrides))
  batch = next(task.batches())
  spec = task.batch_shapes()
  assert jax.tree.structure(batch) == jax.tree.structure(spec)
  for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(spec)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  real, total = task.count_tokens(batch)
  assert 0 < real <= total


def test_dit_tokens_are_the_real_ones_of_the_rows():
  task = make_task(C.load(None, LATENT_DIT))
  batch = next(task.batches())
  seg = batch.packing.segment_ids
  assert task.count_tokens(batch) == (int((seg > 0).sum()), seg.size)


@pytest.mark.parametrize("overrides", [LATENT_DIT, PIXEL_DIT], ids=["dit", "pixel_dit"])
def test_the_model_never_sees_the_clean_tokens(overrides):
  """The DiT is called with the noisy tokens, the time and the packing only."""
  task = make_task(C.load(None, overrides))
  model = task.build_model(nnx.Rngs(0))
  frozen = task.load_frozen(M.make_mesh(C.MeshConfig(), jax.devices()[:1]), M.make_rules())
  batch = jax.tree.map(jnp.asarray, next(task.batches()))
  clean = task.to_tokens(batch, jax.random.split(jax.random.key(3), 4)[3], frozen).tokens
  calls = []

  def spy(tokens, time, packing, drop=None, key=None):
    calls.append((tokens, packing))
    return jnp.zeros_like(tokens)

  loss = task.loss(spy, batch, jax.random.key(3), frozen)
  (tokens, packing), = calls
  assert isinstance(packing, Packing) and not hasattr(packing, "tokens")
  assert tokens.shape == clean.shape and float(jnp.abs(tokens - clean).max()) > 0.1
  assert np.isfinite(float(loss)) and float(loss) > 0  # a zero prediction of a nonzero target
  del model


def test_abstract_frozen_is_the_loaded_frozen_as_shapes():
  task = make_task(C.load(None, PIXEL_DIT))
  mesh, rules = M.make_mesh(C.MeshConfig()), M.make_rules()
  real, abstract = task.load_frozen(mesh, rules), task.abstract_frozen(mesh, rules)
  layout = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
  assert layout(real) == layout(abstract)
  assert make_task(C.load(None, LATENT_DIT)).abstract_frozen(mesh, rules) == {}


def test_eval_levels_and_sample_specs():
  task = make_task(C.load(None, PIXEL_DIT + ["train.eval_times=[0.25,0.75]"]))
  assert task.eval_levels() == {"loss_t0.25": 0.25, "loss_t0.75": 0.75}
  specs = task.sample_specs(3)
  assert len(specs) == 3 and all(s.shape == (2, 2, 2) for s in specs)  # 5 px frames at 16x16 -> latents
  assert all(s.caption for s in specs) and all(s.label == -1 for s in specs)  # captions, no class table
  assert make_task(C.load(None, VAE)).eval_levels() == {}  # its eval_metrics name themselves


def test_task_checks_name_the_keys():
  with pytest.raises(C.ConfigError, match="model.in_channels"):
    make_task(C.load(None, ["data.channels=3"]))
  with pytest.raises(C.ConfigError, match="data.seq_len"):
    make_task(C.load(None, LATENT_DIT + ["data.seq_len=16"]))
  with pytest.raises(C.ConfigError, match="vae.in_channels"):
    make_task(C.load(None, VAE + ["data.channels=4"]))


def test_a_vae_run_is_a_vae_checkpoint_and_exports_to_diffusers(tmp_path, caplog):
  """A task=vae run writes input | reconstruction samples and names its held-out metrics;
  its directory (or one step in it) is then a vae.checkpoint (EMA or raw weights) and
  `src.convert export` writes it as a diffusers AutoencoderKLWan that loads back the same."""
  from src import convert
  from src.pretrained import load_vae
  from src.runs import load_run

  run = tmp_path / "vae_run"
  train(C.load(None, VAE + [f"workdir={run}", "data.batch_size=8", "train.steps=4", "train.log_every=2", "train.eval_every=4",
                            "train.eval_batches=1", "train.sample_every=4", "train.sample_count=2",
                            "optim.lr=3e-3", "optim.warmup_steps=1"]))
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  val = next(r for r in rows if "val/loss" in r)
  assert {"val/l1", "val/mse", "val/kl", "val/psnr_db"} <= set(val) and "val/loss_t0" not in val, val
  from PIL import Image
  grid = np.asarray(Image.open(run / "samples" / "step_0000004-ema.png"))
  assert grid.shape[0] >= 2 * 16 * 4 and grid.shape[1] >= 5 * (2 * 16 + 2) * 4  # 2 rows, 5 frames of input|recon

  vae_keys = ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1"]
  user = lambda checkpoint, *more: C.load(None, vae_keys + [f"vae.checkpoint={checkpoint}", *more]).vae
  flat = lambda state: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(state, nnx.Param))}
  for weights in ("ema", "raw"):
    want = flat(load_run(run, use_ema=weights == "ema")[2])
    for where in (run, run / "checkpoints" / "4"):
      got = flat(load_vae(user(where, f"vae.checkpoint_weights={weights}")))
      assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert any(not np.array_equal(a, b) for a, b in zip(flat(load_run(run)[2]).values(),
                                                        flat(load_run(run, use_ema=False)[2]).values()))

  convert.main(["export", "--workdir", str(run), "--dst", str(tmp_path / "exported")])
  assert (tmp_path / "exported" / "config.json").is_file()
  got, want = flat(load_vae(user(tmp_path / "exported", "vae.latents_mean=[]"))), flat(load_run(run, use_ema=False)[2])
  assert all(np.array_equal(got[k], want[k]) for k in want)

  dit_run = tmp_path / "dit_run"
  train(C.load(None, LATENT_DIT + [f"workdir={dit_run}", "data.batch_size=8", "train.steps=1",
                                   "train.tensorboard=false"]))
  with pytest.raises(C.ConfigError, match="is a task=dit run, not a VAE"):
    load_vae(user(dit_run))


def test_an_exported_vae_loads_in_diffusers_and_encodes_the_same(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from src.pretrained import export_diffusers_vae

  cfg = C.load(None, ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1"]).vae
  from src.models.vae import VideoVAE

  ours = VideoVAE(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  export_diffusers_vae(nnx.state(ours, nnx.Param), cfg, tmp_path / "vae")
  ref = diffusers.AutoencoderKLWan.from_pretrained(tmp_path / "vae")  # strict: every tensor named and shaped
  x = np.random.RandomState(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(x.transpose(0, 4, 1, 2, 3))).latent_dist.mean.numpy().transpose(0, 2, 3, 4, 1)
  np.testing.assert_allclose(np.asarray(ours.encode(jnp.asarray(x))[0]), want, atol=2e-4)


def test_sample_sizes_are_the_data_units_and_a_bad_one_names_the_valid_sizes():
  pixels = make_task(C.load(None, PIXEL_DIT))  # a VAE: pixels (8x spatial, 4x temporal; patch 1)
  assert pixels.size_error((5, 16, 24)) is None and pixels.latent_shape((5, 16, 24)) == (2, 2, 3)
  assert "the height a multiple of 8" in pixels.size_error((5, 9, 16))
  assert "frames must be 1 + 4k" in pixels.size_error((4, 16, 16))
  cache = make_task(C.load(None, PIXEL_DIT + ["data.source=latents", "data.seq_len=8"]))  # a VAE's latent cache
  assert type(cache) is DiTTask and cache.latent_shape((5, 16, 16)) == (2, 2, 2) and cache.frame_slots() == 2
  latents = make_task(C.load(None, LATENT_DIT))  # no VAE: the data are latents
  assert latents.size_error((2, 8, 8)) is None and "model.patch=(1, 2, 2)" in latents.size_error((2, 9, 8))


def test_a_failed_encode_leaves_no_cache_and_an_existing_one_is_kept(tmp_path):
  from src.data.latents import LatentSource, LatentWriter

  writer = LatentWriter(tmp_path / "cache")
  writer.write(np.zeros((1, 2, 2, 4)), 0, "a red disc")
  writer.abort()  # what src.encode does when encoding fails
  assert not list((tmp_path / "cache").iterdir())
  with pytest.raises(FileNotFoundError):
    LatentSource(tmp_path / "cache")
  writer = LatentWriter(tmp_path / "cache")
  writer.write(np.zeros((1, 2, 2, 4)), 0, "a red disc")
  writer.close({"z_dim": 4})
  assert len(LatentSource(tmp_path / "cache")) == 1
  with pytest.raises(FileExistsError, match="already holds a latent cache"):
    LatentWriter(tmp_path / "cache")


def test_a_latent_cache_that_does_not_fit_the_run_is_refused_naming_the_keys(tmp_path):
  """DiTTask.check reads the cache's metadata.json: the latent width, the VAE that
  encoded it (with vae.enabled) and the umT5 width must be the run's."""
  from src.data.latents import METADATA

  (tmp_path / METADATA).write_text(json.dumps(dict(z_dim=4, text_encoder="precomputed", cond_dim=8,
                                                   vae=C.to_dict(C.load(None, TINY_VAE))["vae"])))
  run = ["data.source=latents", f"data.data_dir={tmp_path}", "model.variant=tiny", "model.patch=[1,1,1]",
         "data.seq_len=64", "data.area=16", "data.frame_counts=[1,2]"]
  make_task(C.load(None, run + ["model.in_channels=4", "data.channels=4"]))  # fits: no error
  with pytest.raises(C.ConfigError, match="holds 4-channel latents but model.in_channels=16"):
    make_task(C.load(None, run + ["model.in_channels=16", "data.channels=16"]))
  pixels = TINY_VAE + ["vae.enabled=true", "model.in_channels=4", "data.area=1024", "data.frame_counts=[1,5]"]
  make_task(C.load(None, run + pixels))  # the same VAE: fits
  with pytest.raises(C.ConfigError, match=r"vae.num_res_blocks=1 there, 2 here"):
    make_task(C.load(None, run + pixels + ["vae.num_res_blocks=2"]))


def test_a_latent_cache_of_other_captions_than_umt5_ones_is_refused(tmp_path, tiny_umt5):
  from src.data.latents import METADATA
  from src.text_encoder import read_umt5_config

  width = read_umt5_config(str(tiny_umt5)).d_model
  run = ["data.source=latents", f"data.data_dir={tmp_path}", "model.variant=tiny", "model.in_channels=4",
         "data.channels=4", "model.text_encoder=umt5", f"model.cond_dim={width}", f"text.checkpoint={tiny_umt5}"]
  (tmp_path / METADATA).write_text(json.dumps(dict(z_dim=4, text_encoder="umt5", cond_dim=width)))
  make_task(C.load(None, run))  # umT5 embeddings of the run's width: fits
  (tmp_path / METADATA).write_text(json.dumps(dict(z_dim=4, text_encoder="precomputed", cond_dim=width)))
  with pytest.raises(C.ConfigError, match=f"holds precomputed captions of width {width}"):
    make_task(C.load(None, run))

