"""The documented own-videos path (docs/data.md), end to end on CPU: a generated folder
of videos of several sizes and lengths, images and bad files -> src.data.build -> a VAE
trained with task=vae (configs/clips_vae.yaml) -> src.encode, train and validation
splits (configs/encode_wan21.yaml) -> a DiT on the cache (configs/clips_dit.yaml) ->
src.sample. Each stage runs its command line with its preset and the same pixel-unit
data keys, shrunk to a tiny VAE and DiT."""

import dataclasses
import json
import shlex

import numpy as np
import pytest
import yaml

from PIL import Image

from src import config as C

# Tiny stand-ins for the presets' sizes; the same list for every stage.
TINY_VAE = ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1"]
PIXELS = ["data.area=1024", "data.frame_counts=[1,5,9]", "data.seq_len=64"]  # 32x32 px a frame, 1 + 4k frames
DIT = ["model.variant=tiny", "model.in_channels=4", "model.patch=[1,1,1]", "model.cond_dim=16",
       "model.dtype=float32", "model.remat=none", "data.text_len=24"]
RUN = ["train.tensorboard=false", "train.log_every=1", "data.prefetch=1"]

VIDEOS = {  # file -> (frames, height, width, fps): several sizes, aspect ratios and lengths
    "wide.mp4": (12, 24, 40, 12), "tall.mp4": (10, 40, 24, 12), "square.webm": (16, 32, 32, 16),
    "long.mp4": (30, 28, 36, 24), "tiny.gif": (6, 20, 20, 8), "one.mp4": (1, 24, 24, 8),
}
IMAGES = {"still.png": (30, 20), "photo.jpg": (24, 36)}


def write_clip(path, frames, height, width, fps):
  """A bright square moving right over a dark background."""
  import av
  fmt, codec, pix = {".mp4": ("mp4", "libx264", "yuv420p"), ".webm": ("webm", "libvpx-vp9", "yuv420p"),
                     ".gif": ("gif", "gif", "rgb8")}[path.suffix]
  with av.open(str(path), "w", format=fmt) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, pix
    for i in range(frames):
      image = np.full((height, width, 3), 30, np.uint8)
      x = (2 * i) % (width - 8)
      image[height // 3: height // 3 + 8, x: x + 8] = (230, 60, 40)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_folder(root):
  root.mkdir()
  for name, spec in VIDEOS.items():
    write_clip(root / name, *spec)
  rng = np.random.default_rng(0)
  for name, (h, w) in IMAGES.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / name)
  (root / "broken.mp4").write_bytes((root / "wide.mp4").read_bytes()[:700])  # truncated
  (root / "noise.webm").write_bytes(rng.bytes(3000))
  Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(root / "grey.png")  # one channel
  good = sorted([*VIDEOS, *IMAGES])
  lines = ["file,caption,label"] + [f'{n},"a red square moving right, {n}",{i}' for i, n in enumerate(good)]
  lines += ["broken.mp4,a broken clip,0", "noise.webm,noise,0", "grey.png,grey,0"]
  (root / "captions.csv").write_text("\n".join(lines) + "\n")
  return good


def test_the_presets_of_the_stages_agree_on_the_data_keys():
  """configs/clips_dit.yaml trains on the cache configs/encode_wan21.yaml writes: its data
  keys (pixels) must be the encode's, and both VAEs the one configs/clips_vae.yaml trains."""
  names = ("encode_wan21", "clips_dit", "clips_vae")
  encode, dit, _ = (yaml.safe_load(open(f"configs/{name}.yaml")) for name in names)
  per_stage = {"source", "data_dir", "batch_size", "max_segments", "text_len"}
  shared = set(encode["data"]) - per_stage
  assert shared <= set(dit["data"]), shared - set(dit["data"])
  assert {k: dit["data"][k] for k in shared} == {k: encode["data"][k] for k in shared}
  assert dit["model"]["patch"] == encode["model"]["patch"] and dit["model"]["in_channels"] == 16
  loaded = [C.load(f"configs/{name}.yaml", []) for name in ("encode_wan21", "clips_dit", "clips_vae")]
  assert loaded[0].vae == loaded[1].vae == dataclasses.replace(loaded[2].vae, enabled=True)  # one VAE architecture
  assert loaded[2].data.channels == loaded[1].data.channels == 3  # pixels in every stage


def documented_commands() -> list[list[str]]:
  """The `python -m ...` command lines of docs/data.md's first bash block, as words."""
  text = open("docs/data.md").read()
  block = text[text.index("```bash") + 7: text.index("```", text.index("```bash") + 7)]
  lines = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("python -m ")]
  return [shlex.split(line)[2:] for line in lines]


@pytest.mark.slow
def test_a_folder_of_own_videos_to_sampled_videos(tmp_path, capsys):
  """docs/data.md's commands, as written there plus the tiny sizes, on a generated folder."""
  pytest.importorskip("av")  # the project's `video` extra
  from src.data import build
  from src.data.latents import LatentSource
  from src.encode import main as encode_main
  from src.sample import main as sample_main
  from src.train import main as train_main

  good = write_folder(tmp_path / "clips")
  data, vae_run, cache, dit_run = (tmp_path / n for n in ("data", "vae_run", "latents", "dit_run"))
  paths = {"clips/": tmp_path / "clips", "clips/captions.csv": tmp_path / "clips" / "captions.csv",
           "data/my_clips": data, "runs/my_vae": vae_run, "latents/": cache, "runs/my_dit": dit_run,
           "samples/square.mp4": tmp_path / "sample.gif"}

  def swap(word):
    key, eq, value = word.rpartition("=")
    return f"{key}={paths[value]}" if eq and value in paths else str(paths.get(word, word))

  commands = [[swap(w) for w in words] for words in documented_commands()]
  assert [c[0] for c in commands] == ["src.data.build", "src.train", "src.encode", "src.encode", "src.train",
                                      "src.sample"], commands
  build_cmd, vae_cmd, encode_train, encode_val, dit_cmd, sample_cmd = (c[1:] for c in commands)

  # 1. The dataset: the three bad files are left out and named, 2 files held out.
  assert build.main(build_cmd + ["--val_count", "2"]) == 0
  report = json.loads(next(data.rglob(build.REPORT)).read_text())
  assert set(report["skipped"]) == {"broken.mp4", "noise.webm", "grey.png"}
  assert report["train"]["files"] == len(good) - 2 and report["validation"]["files"] == 2

  # 2. A VAE trained on it (fixed-shape clips, pixels): reconstructions and metrics.
  assert train_main(vae_cmd + [*TINY_VAE, *RUN, "data.frames=5", "data.height=16", "data.width=16",
                               "data.batch_size=8", "train.steps=4", "train.ckpt_every=4", "train.eval_every=4",
                               "train.eval_batches=1", "train.sample_every=4", "optim.warmup_steps=1"]) == 0
  rows = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
  assert any("val/psnr_db" in r for r in rows)
  assert sorted(p.name for p in (vae_run / "samples").glob("*.png")) == ["step_0000004-ema.png"]

  # 3. The latent cache, both splits, through the trained VAE: stills and 1-frame clips
  # stay one latent frame, every clip keeps its own size.
  for command in (encode_train, encode_val):
    assert encode_main(command + [*TINY_VAE, *PIXELS, *DIT]) == 0
  train_cache, val_cache = LatentSource(cache), LatentSource(cache / "validation")
  assert len(train_cache) == len(good) - 2 and len(val_cache) == 2
  shapes = [train_cache[i]["video"].shape for i in range(len(train_cache))]
  assert all(s[-1] == 4 and s[0] in (1, 2, 3) and s[1] * s[2] <= 1024 // 64 for s in shapes), shapes
  assert len({s[1:3] for s in shapes}) > 1  # aspect ratios kept
  assert sum(s[0] == 1 for s in shapes) >= 2  # the images (and the 1-frame clip) are one latent frame

  # A run whose VAE or latent width is not the cache's is refused at start-up, naming the keys.
  capsys.readouterr()
  assert train_main(dit_cmd + [f"workdir={tmp_path / 'wrong'}", *TINY_VAE, *PIXELS, *DIT, "vae.base_dim=16"]) == 2
  assert "vae.base_dim=8 there, 16 here" in capsys.readouterr().err

  # 4. The DiT on the cache: the same pixel keys; its samples are decoded through the VAE.
  assert train_main(dit_cmd + [*TINY_VAE, *PIXELS, *DIT, *RUN, "data.batch_size=8", "data.frames=5",
                               "data.height=32", "data.width=32", "train.steps=3", "train.ckpt_every=3",
                               "train.eval_every=3", "train.eval_batches=1", "train.sample_every=3",
                               "optim.warmup_steps=1"]) == 0
  rows = [json.loads(line) for line in (dit_run / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all() and any("val/loss" in r for r in rows)
  gifs = [Image.open(p) for p in sorted((dit_run / "samples").glob("step_0000003-ema-*.gif"))]
  assert gifs and (dit_run / "samples" / "step_0000003-ema.png").is_file()
  # Decoded: 1 + 4k video frames at 8x the latent sides (GIFs at 4x scale), not latent grids.
  assert all(g.n_frames in (1, 5, 9) and g.size[0] % 32 == 0 and g.size[1] % 32 == 0 for g in gifs)
  assert max(g.n_frames for g in gifs) >= 5, [g.n_frames for g in gifs]

  # 5. A sample, sizes in pixels; an impossible size names the valid ones.
  assert sample_main(sample_cmd + ["--frames", "5", "--height", "32", "--width", "24", "--steps", "2", "--num", "1",
                                   "--scale", "1"]) == 0
  video = Image.open(tmp_path / "sample-0.gif")
  assert video.n_frames == 5 and video.size == (24, 32)  # (width, height) in pixels
  capsys.readouterr()
  assert sample_main(sample_cmd + ["--height", "9"]) != 0
  assert "the height a multiple of 8" in capsys.readouterr().err  # the valid sizes
