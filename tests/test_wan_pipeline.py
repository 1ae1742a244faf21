"""Wan 2.1 generation equal to diffusers' `WanPipeline`: the same initial noise and text
embeddings give the same latents and frames, with the flow-match Euler and the UniPC
schedulers, with and without guidance."""

import numpy as np
import pytest

from src.wan_pipeline import WanPipeline, from_tokens, to_tokens

FRAMES, HEIGHT, WIDTH = 5, 32, 48  # pixels: latents 2 x 4 x 6


@pytest.fixture(scope="module")
def pipelines(tiny_wan):
  import diffusers

  root, torch_model = tiny_wan
  vae = diffusers.AutoencoderKLWan.from_pretrained(root / "vae").eval()
  return WanPipeline.from_pretrained(root), torch_model, vae


def _scheduler(method, shift):
  import diffusers

  if method == "unipc":
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=shift, num_train_timesteps=1000)
  return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("method, guidance, steps", [("unipc", 5.0, 6), ("unipc", 1.0, 4), ("flow_euler", 4.0, 5),
                                                     ("flow_euler", 1.0, 3)])
def test_generation_equals_diffusers(pipelines, method, guidance, steps):
  import diffusers
  import torch

  ours, torch_model, vae = pipelines
  rng = np.random.default_rng(steps)
  shape = ours.latent_shape(FRAMES, HEIGHT, WIDTH)
  latents = rng.normal(size=(1, *shape)).astype(np.float32)
  text, negative = (rng.normal(size=(1, 7, 24)).astype(np.float32) for _ in range(2))
  ref = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=torch_model, vae=vae,
                              scheduler=_scheduler(method, 3.0))
  kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance,
                prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(negative))
  with torch.no_grad():
    want_latents = ref(latents=torch.from_numpy(latents), output_type="latent", **kwargs).frames.numpy()
    want_frames = ref(latents=torch.from_numpy(latents), output_type="np", **kwargs).frames
  got_latents = ours(latents, text, negative, steps=steps, guidance=guidance, method=method, shift=3.0,
                     output="latent")
  assert np.abs(want_latents - latents).max() > 0.1  # the sampler moved the latents
  np.testing.assert_allclose(got_latents, want_latents, atol=1e-3, rtol=0)
  got_frames = ours(latents, text, negative, steps=steps, guidance=guidance, method=method, shift=3.0)
  assert got_frames.shape == want_frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
  np.testing.assert_allclose(got_frames, want_frames, atol=1e-3, rtol=0)


def test_guidance_uses_the_negative_prompt(pipelines):
  ours, _, _ = pipelines
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(1, *ours.latent_shape(FRAMES, HEIGHT, WIDTH))).astype(np.float32)
  text, negative = (rng.normal(size=(1, 7, 24)).astype(np.float32) for _ in range(2))
  run = lambda neg: ours(latents, text, neg, steps=2, guidance=5.0, output="latent")
  assert np.abs(run(negative) - run(0 * negative)).max() > 1e-3


def test_tokens_round_trip():
  x = np.random.default_rng(0).normal(size=(2, 4, 3, 4, 6)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(from_tokens(to_tokens(x, (1, 2, 2)), x.shape[1:], (1, 2, 2))), x)


def test_sizes_the_vae_cannot_code_are_refused(pipelines):
  with pytest.raises(ValueError, match="1 \\+ 4k frames"):
    pipelines[0].latent_shape(6, HEIGHT, WIDTH)


def _expected_png(pipe, text, negative, seed=0, steps=2):
  import jax

  from src import media

  noise = jax.random.normal(jax.random.key(seed), (1, *pipe.latent_shape(FRAMES, HEIGHT, WIDTH)))
  frames = pipe(noise, text, negative, steps=steps, guidance=5.0, method="unipc")
  return media.grid([frames[0] * 2.0 - 1.0], 1)  # as the .png writer lays the frames out


def _written_png(path):
  from PIL import Image

  return np.asarray(Image.open(path))[..., :3]


def test_cli_with_text_embeddings(pipelines, tiny_wan, tmp_path):
  from src import sample

  ours = pipelines[0]
  rng = np.random.default_rng(1)
  text, negative = (rng.normal(size=(7, 24)).astype(np.float32) for _ in range(2))
  np.savez(tmp_path / "emb.npz", prompt=text, negative=negative)
  args = ["--pretrained", str(tiny_wan[0]), "--text-embeddings", str(tmp_path / "emb.npz"), "--size",
          f"{WIDTH}x{HEIGHT}", "--frames", str(FRAMES), "--steps", "2", "--num", "1", "--out", str(tmp_path / "s.png")]
  assert sample.main(args) == 0
  written = _written_png(tmp_path / "s-0.png")  # the frames side by side
  want = _expected_png(ours, text[None], negative[None])
  np.testing.assert_array_equal(written, want[..., :3])
  np.savez(tmp_path / "no_negative.npz", prompt=text)
  assert sample.main(args[:3] + [str(tmp_path / "no_negative.npz")] + args[4:]) == 2  # guidance needs one
  assert sample.main(args[:-6] + ["--frames", "6"] + args[-4:]) == 2  # not 1 + 4k frames


def test_cli_with_the_umt5_text_encoder(tiny_wan, tiny_umt5, tmp_path):
  """A model root with text_encoder/ and tokenizer/: the prompt and the negative prompt
  are encoded by umT5 (padded to 512 tokens, zeros past the caption) as in Wan."""
  import shutil

  import jax
  from flax import nnx

  from src import sample
  from src.models.umt5 import UMT5Config, UMT5Encoder
  from src.text_encoder import save_pretrained_umt5

  root = tmp_path / "root"
  for part in ("transformer", "vae"):
    shutil.copytree(tiny_wan[0] / part, root / part)
  shutil.copytree(tiny_umt5 / "tokenizer", root / "tokenizer")
  cfg = UMT5Config(vocab_size=56, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3)
  save_pretrained_umt5(UMT5Encoder(cfg, rngs=nnx.Rngs(jax.random.key(3))), cfg, root / "text_encoder")
  pipe = WanPipeline.from_pretrained(root)
  text = pipe.encode_prompt(["a red square moving left"])
  from src.batch import TEXT_PAD
  from src.data.sources import caption_ids

  n = int((caption_ids("a red square moving left", 512, str(root / "tokenizer")) != TEXT_PAD).sum())
  assert text.shape == (1, 512, 24) and 1 < n < 512
  assert np.all(np.abs(np.asarray(text)[0, :n]).sum(-1) > 0) and not np.any(np.asarray(text)[0, n:])
  assert sample.main(["--pretrained", str(root), "--prompt", "a red square moving left", "--negative-prompt",
                      "a blue circle", "--size", f"{WIDTH}x{HEIGHT}", "--frames", str(FRAMES), "--steps", "2",
                      "--num", "1", "--out", str(tmp_path / "s.png")]) == 0
  want = _expected_png(pipe, text, pipe.encode_prompt(["a blue circle"]))
  np.testing.assert_array_equal(_written_png(tmp_path / "s-0.png"), want[..., :3])


def test_cli_with_a_lora_file(pipelines, tiny_wan, tmp_path):
  """--lora FILE folds a diffusers Wan LoRA into the transformer: the output is the
  merged model's; --lora-scale 0 is the base again."""
  from flax import nnx
  from safetensors.numpy import save_file

  from src import sample, wan, wan_lora
  from src.pretrained import WeightsError

  ours = pipelines[0]
  m = ours.model.cfg
  rng = np.random.default_rng(5)
  adapters, params = {}, wan.host_params(nnx.state(ours.model))
  for layer in [("blocks", "attn", "q"), ("blocks", "attn", "k"), ("blocks", "fc1")]:
    kernel = params[layer + ("kernel",)]
    adapters[layer + ("lora_a",)] = rng.normal(size=kernel.shape[:2] + (3,)).astype(np.float32)
    adapters[layer + ("lora_b",)] = 0.3 * rng.normal(size=(kernel.shape[0], 3) + kernel.shape[2:]).astype(np.float32)
  wan_lora.export_lora(adapters, m, 1.0, tmp_path / "style.safetensors")
  text, negative = (rng.normal(size=(7, 24)).astype(np.float32) for _ in range(2))
  np.savez(tmp_path / "emb.npz", prompt=text, negative=negative)
  args = ["--pretrained", str(tiny_wan[0]), "--text-embeddings", str(tmp_path / "emb.npz"), "--size",
          f"{WIDTH}x{HEIGHT}", "--frames", str(FRAMES), "--steps", "2", "--num", "1", "--lora",
          str(tmp_path / "style.safetensors")]
  assert sample.main(args + ["--out", str(tmp_path / "a.png")]) == 0
  merged = WanPipeline(wan_lora.merge_lora(ours.model, adapters, 0.7), ours.vae, shift=ours.shift)
  assert sample.main(args + ["--lora-scale", "0.7", "--out", str(tmp_path / "b.png")]) == 0
  np.testing.assert_array_equal(_written_png(tmp_path / "b-0.png"), _expected_png(merged, text[None], negative[None])[..., :3])
  assert np.abs(_written_png(tmp_path / "a-0.png").astype(int) - _written_png(tmp_path / "b-0.png")).max() > 0
  assert sample.main(args + ["--lora-scale", "0", "--out", str(tmp_path / "c.png")]) == 0
  np.testing.assert_array_equal(_written_png(tmp_path / "c-0.png"), _expected_png(ours, text[None], negative[None])[..., :3])
  save_file({"transformer.nowhere.lora_A.weight": np.zeros((3, 4), np.float32)}, tmp_path / "bad.safetensors")
  with pytest.raises(WeightsError, match="'transformer.nowhere.lora_A.weight' adapts no module"):
    wan_lora.load_lora(tmp_path / "bad.safetensors", m)
  assert sample.main(args[:-1] + [str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "d.png")]) == 2
