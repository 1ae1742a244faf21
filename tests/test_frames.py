"""Per-frame noise levels (`src.frames`): image-to-video, continuation, keyframes and
diffusion forcing in the packed layout, in training, in the loss and in every sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import frames, objectives
from src.generate import Spec, generate
from src.models.dit import DiT
from src.models.layers import to_tokens
from src.models.patch import pack_rows, patchify
from tests.test_dit import CFG, alone, as_jnp, perturbed

F = 4  # slots per example: the most patch frames below
# (shape, mode, per-frame model times): one example of each mode; given frames are at time 0.
MODES = [
    ((3, 4, 4), "t2v", [600.0] * F),
    ((4, 2, 4), "i2v", [0.0] + [450.0] * 3),
    ((4, 4, 2), "continuation", [0.0, 0.0, 300.0, 300.0]),
    ((3, 2, 2), "keyframes", [0.0, 800.0, 0.0, 0.0]),  # slot 3 is past its 3 frames: unread
    ((4, 2, 2), "independent", [100.0, 350.0, 650.0, 900.0]),
]


def mode_examples(seed=0):
  rng = np.random.default_rng(seed)
  examples = []
  for i, (shape, _, _) in enumerate(MODES):
    tokens, positions, grid = patchify(rng.normal(size=(*shape, 3)).astype(np.float32), (1, 2, 2))
    examples.append(dict(tokens=tokens, positions=positions, grid=np.asarray(grid), label=np.int32(i),
                         text=rng.normal(size=(3, 12)).astype(np.float32)))
  return examples


@pytest.fixture(scope="module")
def model():
  return perturbed(DiT(CFG, rngs=nnx.Rngs(0)))


def packed_row(examples, pad=9):
  return as_jnp(pack_rows(examples, sum(len(e["tokens"]) for e in examples) + pad, max_segments=len(examples)))


def test_a_row_of_every_mode_equals_each_example_alone(model):
  examples = mode_examples()
  row = packed_row(examples)
  times = jnp.asarray([[m[2] for m in MODES]])  # [1, K, F]
  out = model(row.tokens, times, row.packing)
  seg = np.asarray(row.packing.segment_ids[0])
  for k, ex in enumerate(examples):
    t_alone = times[:, k:k + 1, :ex["grid"][0]]  # alone, with only as many slots as it has frames
    ref = model(alone(ex).tokens, t_alone, alone(ex).packing)
    np.testing.assert_allclose(out[0, seg == k + 1], ref[0], atol=1e-5, rtol=0)
  # The levels are read per frame: the i2v example at its noisy frames' time throughout differs.
  single = alone(examples[1])
  per_example = model(single.tokens, jnp.full((1, 1), 450.0), single.packing)
  per_frame = model(single.tokens, times[:, 1:2], single.packing)
  assert float(jnp.abs(per_frame - per_example).max()) > 1e-3


def test_equal_levels_per_frame_are_the_per_example_model(model):
  examples = mode_examples(seed=1)
  row = packed_row(examples)
  t = jnp.asarray([[120.0, 340.0, 560.0, 780.0, 990.0]])
  a = model(row.tokens, t, row.packing)
  b = model(row.tokens, jnp.repeat(t[..., None], F, axis=-1), row.packing)
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_packed_gradient_of_every_mode_is_the_sum_alone(model):
  graphdef, params = model.graphdef, model.params
  examples = mode_examples(seed=2)
  rng = np.random.default_rng(3)
  targets = [rng.normal(size=e["tokens"].shape).astype(np.float32) for e in examples]
  times = jnp.asarray([[m[2] for m in MODES]])
  keep = times > 0  # the given frames (time 0) are out of the loss

  def sse(p, batch, t, target, keep):
    out = nnx.merge(graphdef, p)(batch.tokens, t, batch.packing)
    pk = batch.packing
    inside = (pk.segment_ids > 0) & to_tokens(keep, pk.segment_ids, pk.positions[..., 0])
    return jnp.sum(jnp.where(inside[..., None], out - target, 0.0) ** 2)

  row = packed_row(examples, pad=5)
  packed_target = np.zeros(row.tokens.shape, np.float32)
  seg = np.asarray(row.packing.segment_ids[0])
  for k, tgt in enumerate(targets):
    packed_target[0, seg == k + 1] = tgt
  grad = jax.jit(jax.grad(sse))
  g_packed = grad(params, row, times, packed_target, keep)
  g_alone = [grad(params, alone(e), times[:, k:k + 1], tgt[None], keep[:, k:k + 1])
             for k, (e, tgt) in enumerate(zip(examples, targets))]
  g_sum = jax.tree.map(lambda *g: sum(g), *g_alone)
  for gp, gs in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_sum)):
    scale = float(jnp.linalg.norm(gs.ravel())) + 1e-12
    assert float(jnp.linalg.norm((gp - gs).ravel())) <= 1e-5 * scale


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_the_loss_ignores_the_target_on_given_frames(reduction):
  c = objectives.ObjectiveConfig(loss_reduction=reduction)
  rng = np.random.default_rng(0)
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
  frame_ids = jnp.asarray([[0, 0, 1, 1, 0, 1, 2, 0]])
  keep = jnp.asarray([[[False, True, True], [True, False, True]]])  # example 1: frame 0 given; 2: frame 1
  weight = jnp.ones((1, 2, 3))
  pred, target = (jnp.asarray(rng.normal(size=(1, 8, 3)), jnp.float32) for _ in range(2))
  given = np.asarray(~to_tokens(keep, seg, frame_ids) | (seg == 0))
  loss = lambda p, tg: objectives.masked_loss(c, p, tg, seg, weight, frame_ids, keep)
  base, g_base = loss(pred, target), jax.grad(loss)(pred, target)
  bad_target = jnp.where(given[..., None], jnp.nan, target)
  bad_pred = jnp.where(given[..., None], 1e30, pred)
  assert float(loss(bad_pred, bad_target)) == float(base)
  np.testing.assert_array_equal(jax.grad(loss)(bad_pred, bad_target), g_base)
  assert np.all(np.asarray(g_base)[given] == 0) and np.any(np.asarray(g_base)[~given] != 0)
  # And the given tokens are really out: the loss is the plain one over the kept tokens alone.
  kept = ~given[0]
  err = np.mean((np.asarray(pred) - np.asarray(target))[0] ** 2, -1)
  if reduction == "token":
    want = err[kept].mean()
  else:
    s = np.asarray(seg[0])
    want = np.mean([err[kept & (s == k)].mean() for k in (1, 2)])
  assert float(base) == pytest.approx(want, rel=1e-6)


def config(**conditioning):
  return C.load(None, ["model.variant=tiny", "data.channels=4", *(f"conditioning.{k}={v}" for k, v in
                                                                   conditioning.items())])


def test_drawn_modes_give_the_frames_they_name():
  cfg = config(t2v=1, i2v=1, continuation=1, keyframes=1, independent=1, continuation_frames="[2,3]")
  rows, slots = 4000, 6
  n = jnp.asarray(np.random.default_rng(0).integers(1, slots + 1, size=(rows, 1)))  # frames of each example
  key = jax.random.key(0)
  given, mode = frames.given_frames(cfg.conditioning, jax.random.split(key, 3)[0], n, slots)  # as `draw` does
  given, mode, n = np.asarray(given)[:, 0], np.asarray(mode)[:, 0], np.asarray(n)[:, 0]
  assert np.all(np.bincount(mode, minlength=5) > 0.17 * rows)  # each of five modes about a fifth
  f = np.arange(slots)
  for g, m, k in zip(given, mode, n):
    if m in (frames.T2V, frames.INDEPENDENT) or k == 1:
      assert not g.any()  # nothing given; a 1-frame clip is never all given
    elif m == frames.I2V:
      assert list(f[g]) == [0]
    elif m == frames.CONTINUATION:
      assert list(f[g]) == list(range(g.sum())) and min(2, k - 1) <= g.sum() <= min(3, k - 1)
    else:
      assert list(f[g]) == ([0, k - 1] if k > 2 else [])
  t = jnp.full((rows, 1), 0.5)
  grid = jnp.stack([jnp.asarray(n)[:, None], jnp.ones((rows, 1), int), jnp.ones((rows, 1), int)], -1)
  time, keep = frames.draw(cfg, key, t, grid, slots)
  time, keep = np.asarray(time)[:, 0], np.asarray(keep)[:, 0]
  np.testing.assert_array_equal(keep, ~given)
  assert np.all(time[~keep] == 0.0)
  plain = (mode != frames.INDEPENDENT)[:, None] & keep
  assert np.all(time[plain] == 0.5)
  independent = time[mode == frames.INDEPENDENT]
  assert np.std(independent, axis=1).min() > 0  # every frame its own level


def test_given_frames_get_the_augmentation_level():
  cfg = config(t2v=0, i2v=1, noise=0.1)
  grid = jnp.asarray([[[3, 1, 1]]] * 500)
  time, keep = frames.draw(cfg, jax.random.key(1), jnp.full((500, 1), 0.7), grid, 3)
  level = np.asarray(time)[:, 0, 0]
  assert not np.asarray(keep)[:, 0, 0].any() and 0 <= level.min() and level.max() <= 0.1 and level.std() > 0.02
  assert np.all(np.asarray(time)[:, 0, 1:] == np.float32(0.7))


@pytest.mark.parametrize("overrides, message", [
    (["conditioning.t2v=0"], "all 0"),
    (["conditioning.i2v=0.5", "model.patch=[2,2,2]", "data.frames=4"], "model.patch[0]=2"),
    (["conditioning.continuation=1", "conditioning.continuation_frames=[3,1]"], "continuation_frames"),
    (["conditioning.keyframes=-1"], "conditioning.keyframes"),
])
def test_bad_conditioning_is_a_config_error(overrides, message):
  from src.tasks import make_task

  with pytest.raises(C.ConfigError, match=message.replace("[", r"\[")):
    make_task(C.load(None, ["model.variant=tiny", "data.channels=4", *overrides]))


DIFFUSION = ["objective.kind=diffusion", "objective.prediction=v"]
EVERY_MODE = [f"conditioning.{m}=1" for m in frames.MODES] + ["conditioning.noise=0.05"]


@pytest.mark.parametrize("objective", [[], DIFFUSION], ids=["flow", "diffusion"])
def test_the_task_loss_of_a_packed_batch_of_every_mode(objective):
  """The training loss with every mode in the mix, on packed rows of mixed shapes: finite,
  with finite gradients, and not the t2v loss (the per-frame path is taken)."""
  from tests.test_tasks import LATENT_DIT
  from src.tasks import make_task

  losses = []
  for extra in ([], EVERY_MODE):
    task = make_task(C.load(None, LATENT_DIT + objective + ["data.frame_counts=[1,2,3]"] + extra))
    assert task.frame_slots() == 3
    model = task.build_model(nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, next(task.batches()))
    assert int(batch.packing.grid[..., 0].max()) == 3 and int((batch.packing.grid[..., 0] > 0).sum(1).max()) > 1
    graphdef, params = nnx.split(model)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: task.loss(nnx.merge(graphdef, p), batch, jax.random.key(0))))(
        params)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    losses.append(float(loss))
  assert losses[0] != losses[1]


@pytest.mark.parametrize("method, overrides", [
    ("euler", []), ("heun", []), ("flow_euler", []), ("unipc", []), ("ddim", DIFFUSION), ("ddpm", DIFFUSION)])
def test_every_sampler_returns_the_given_frames_and_reads_them(method, overrides):
  cfg = C.load(None, ["model.variant=tiny", "model.num_classes=3", "data.channels=4", *overrides])
  graphdef, params = nnx.split(DiT(cfg.model, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  rng = np.random.default_rng(0)
  first, ends = (rng.normal(size=(4, 4, 6, 4)).astype(np.float32) for _ in range(2))
  specs = [Spec((4, 4, 6), 1, None, first, (0,)), Spec((2, 4, 4), 2),  # i2v, t2v, keyframes in one call
           Spec((4, 4, 6), 0, None, ends, (0, 3))]
  run = lambda s: generate(graphdef, params, cfg, s, steps=4, guidance=2.0, method=method, seed=3)
  videos = run(specs)
  assert [v.shape for v in videos] == [(4, 4, 6, 4), (2, 4, 4, 4), (4, 4, 6, 4)]
  np.testing.assert_array_equal(videos[0][0], first[0])  # bit-identical
  np.testing.assert_array_equal(videos[2][[0, 3]], ends[[0, 3]])
  changed = first.copy()
  changed[0] += 1.0
  again = run([Spec((4, 4, 6), 1, None, changed, (0,))] + specs[1:])
  np.testing.assert_array_equal(again[0][0], changed[0])
  assert float(np.abs(again[0][1:] - videos[0][1:]).max()) > 1e-3  # the model reads the given frame
  np.testing.assert_array_equal(again[1], videos[1])  # and only its own example does


def test_a_spec_cannot_be_given_frames_it_does_not_have():
  with pytest.raises(ValueError, match="cannot be given frames"):
    Spec((2, 4, 4), given=np.zeros((2, 4, 4, 4)), given_frames=(2,))
  with pytest.raises(ValueError, match="cannot be given frames"):
    Spec((2, 4, 4), given=np.zeros((3, 4, 4, 4)), given_frames=(0,))


def test_wan_per_frame_timesteps_match_diffusers_per_token_timesteps(tiny_wan):
  """Wan 2.2 TI2V's per-token timestep in diffusers, constant over each latent frame,
  is our per-frame time table."""
  import torch

  from src import wan

  root, torch_model = tiny_wan
  model = wan.load_pretrained_wan(root)
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(2, 4, 3, 4, 6)).astype(np.float32)
  per_frame = np.array([[0.0, 500.0, 500.0], [0.0, 0.0, 900.0]], np.float32)  # i2v and continuation
  text = rng.normal(size=(2, 5, 24)).astype(np.float32)
  ours = np.asarray(wan.wan_forward(model, latents, per_frame, text))
  patch = torch_model.config.patch_size
  per_token = np.repeat(per_frame, (4 // patch[1]) * (6 // patch[2]), axis=1)  # frame-major token order
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(latents), torch.from_numpy(per_token), torch.from_numpy(text),
                      return_dict=False)[0].numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  plain = np.asarray(wan.wan_forward(model, latents, per_frame[:, 1], text))  # one time for the whole clip
  assert np.abs(plain - ours)[:, :, 0].max() > 1e-3


@pytest.mark.slow
def test_image_video_and_keyframes_from_the_command_line(tmp_path):
  """A pixel DiT trained with i2v (per-frame time through the VAE step), then sampled
  from an image, a video prefix and two keyframes; the video begins with the image."""
  import argparse

  pytest.importorskip("av")  # the video prefix is an mp4 (the `video` extra)
  from src import media, sample
  from src import mesh as M
  from src.runs import load_task_run
  from src.train import train
  from tests.test_tasks import TINY_VAE

  run = tmp_path / "run"
  train(C.load(None, TINY_VAE + [f"workdir={run}", "vae.enabled=true", "model.variant=tiny", "model.in_channels=4",
                                 "model.patch=[1,1,1]", "model.num_classes=10", "data.frames=9", "train.steps=2",
                                 "train.log_every=1", "conditioning.t2v=0", "conditioning.i2v=1",
                                 "conditioning.continuation=1", "conditioning.keyframes=1"]))
  rng = np.random.default_rng(0)
  images = [tmp_path / f"{n}.png" for n in ("first", "last")]
  for path in images:
    media.write_png(path, rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8))  # resized and cropped to 16x16
  prefix = tmp_path / "prefix.mp4"
  media.write_video(prefix, rng.uniform(-1, 1, size=(8, 16, 16, 3)).astype(np.float32))
  for given in (["--image", str(images[0])], ["--video", str(prefix)], ["--keyframes", *map(str, images)]):
    out = tmp_path / f"{given[0][2:]}.png"
    assert sample.main(["--workdir", str(run), *given, "--label", "3", "--num", "1", "--steps", "2",
                        "--out", str(out)]) == 0
    assert out.with_name(f"{out.stem}-0.png").exists()
  assert sample.main(["--workdir", str(run), "--image", str(tmp_path / "missing.png"), "--out",
                      str(tmp_path / "x.png")]) == 2

  cfg, task, graphdef, params = load_task_run(run)
  frozen = task.sampling_frozen(M.make_mesh(cfg.mesh), M.make_rules())
  shape = (3, 2, 2)  # 9 frames at 16x16 -> 3 latent frames at 2x2
  args = argparse.Namespace(image=None, video=str(prefix), keyframes=None)
  latents, idx = sample.given_from_files(args, cfg, frozen, shape)
  assert idx == (0, 1)  # 8 frames of video: its first 5 are 2 latent frames, leaving 1 to generate
  args = argparse.Namespace(image=str(images[0]), video=None, keyframes=None)
  latents, idx = sample.given_from_files(args, cfg, frozen, shape)
  assert idx == (0,)
  video = generate(graphdef, params, cfg, [Spec(shape, 3, None, latents, idx)], steps=2, frozen=frozen)[0]
  vae = frozen["vae"].model()
  alone_decoded = np.asarray(vae.decode(vae.denormalize(jnp.asarray(latents[None, :1]))))[0, 0]
  assert video.shape == (9, 16, 16, 3)
  np.testing.assert_allclose(video[0], alone_decoded, atol=1e-5)  # causal: frame 0 is the image's own decode
  with pytest.raises(ValueError, match="need a run with a VAE"):
    sample.given_from_files(args, cfg, {}, shape)


def foreground_stats(video):
  """Per frame: the mean colour [C] of the pixels that are not background, and their
  centroid (y, x); the synthetic clips' background is -1 in every channel."""
  stats = []
  for frame in np.asarray(video, np.float32):
    mask = frame.max(-1) > -0.5
    if not mask.any():
      mask = frame.max(-1) >= frame.max(-1).max()  # a sample with nothing drawn: its brightest pixels
    yy, xx = np.nonzero(mask)
    stats.append((frame[mask].mean(0), np.array([yy.mean(), xx.mean()])))
  return stats


def continuation_errors(videos, truths):
  """Mean colour error (L1 over channels) and centroid distance (pixels) over the
  frames after the first."""
  colour, place = [], []
  for video, truth in zip(videos, truths):
    for (c, p), (tc, tp) in list(zip(foreground_stats(video), foreground_stats(truth)))[1:]:
      colour.append(np.abs(c - tc).mean())
      place.append(np.linalg.norm(p - tp))
  return float(np.mean(colour)), float(np.mean(place))


@pytest.mark.slow
def test_an_i2v_run_continues_the_given_frame(tmp_path):
  """Trained a third t2v, two thirds i2v on unlabelled moving shapes, the model continues a
  held-out clip's first frame: its later frames keep that clip's colour and place far
  better than a sample of the same model without the frame."""
  from src.data.sources import clip_source
  from src.runs import load_run
  from src.train import train

  cfg = C.load(None, [f"workdir={tmp_path}", "model.variant=tiny", "model.depth=4", "model.width=128",
                      "model.scan_layers=false", "data.channels=4", "data.frames=4", "data.height=16",
                      "data.width=16", "data.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=20",
                      "train.steps=400", "train.log_every=50", "train.ckpt_every=1000", "train.tensorboard=false",
                      "conditioning.t2v=1", "conditioning.i2v=2"])
  train(cfg)
  cfg, graphdef, params = load_run(tmp_path, use_ema=False)
  source = clip_source(cfg.data, cfg.seed, split="validation")
  truths = [source[i]["video"] for i in range(8)]
  i2v = [Spec((4, 16, 16), given=v, given_frames=(0,)) for v in truths]
  t2v = [Spec((4, 16, 16)) for _ in truths]
  videos = generate(graphdef, params, cfg, i2v + t2v, steps=20, seed=1)
  colour_i2v, place_i2v = continuation_errors(videos[:8], truths)
  colour_t2v, place_t2v = continuation_errors(videos[8:], truths)
  print(f"colour error {colour_i2v:.3f} vs {colour_t2v:.3f}, centroid error {place_i2v:.2f} vs {place_t2v:.2f} px")
  assert colour_i2v < 0.5 * colour_t2v and place_i2v < 0.6 * place_t2v


@pytest.mark.slow
def test_the_readme_conditioning_command_trains_packed_rows_of_mixed_modes(tmp_path):
  import re
  import shlex
  from pathlib import Path

  from src.train import train

  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  block = re.search(r"```bash\n(python -m src.train --config configs/smoke.yaml conditioning[^`]*)```", readme)
  argv = shlex.split(block.group(1).replace("\\\n", " "))
  overrides = argv[argv.index("configs/smoke.yaml") + 1:]
  cfg = C.load(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml", overrides + [
      f"workdir={tmp_path}", "train.steps=3", "train.log_every=1", "train.sample_every=0", "train.eval_every=0",
      "train.tensorboard=false"])
  assert frames.per_frame(cfg.conditioning) and cfg.data.max_segments > 1  # packed rows, every mode
  metrics = train(cfg)
  assert np.isfinite(metrics["loss"])
