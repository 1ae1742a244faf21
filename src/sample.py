"""`python -m src.sample --workdir RUN [--label N | --prompt TEXT] ... --out PATH.{mp4,gif,png}`
`python -m src.sample --workdir RUN --image FIRST.png | --video PREFIX.mp4 | --keyframes FIRST.png LAST.png ...`
`python -m src.sample --pretrained WAN_ROOT --prompt TEXT [--negative-prompt TEXT] --size 832x480 --frames 81`

Generates from the newest checkpoint of a run (EMA weights unless --no-ema), or from a
diffusers Wan 2.1 model root (transformer/, vae/, text_encoder/ + tokenizer/: the Wan
pipeline of `src.wan_pipeline`, as diffusers' WanPipeline), and writes one video file
per sample and a PNG grid of all of them (rows: samples, columns: frames). A run's
generation is `src.generate` (which the trainer's periodic samples use too).

Given frames (a run with a VAE; `src.frames`): `--image` is the first frame
(image-to-video), `--video` a clip the sample continues (its first 1 + 4k frames, the
most that leave a latent frame to generate), `--keyframes` the first and the last frame.
They are encoded by the run's VAE, held fixed through sampling, and the video begins
(and with keyframes ends) with them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from src import config as config_lib
from src import media, samplers
from src import mesh as mesh_lib
from src.checkpoint import CheckpointNotFoundError
from src.data import video as video_lib
from src.data.video import BadInput
from src.generate import Spec, generate
from src.runs import check_base, load_task_run
from src.tasks import DiTTask

log = logging.getLogger("src.sample")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m src.sample", description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="run directory with checkpoints/")
  source.add_argument("--pretrained", help="diffusers Wan 2.1 model root (transformer/, vae/, text_encoder/, tokenizer/)")
  p.add_argument("--size", default="832x480", help="--pretrained: WIDTHxHEIGHT in pixels (multiples of 16)")
  p.add_argument("--text-embeddings", help="--pretrained without text_encoder/: .npz with 'prompt' [L, D] "
                 "(and 'negative') umT5 embeddings, zero past the caption, as WanPipeline's prompt_embeds")
  p.add_argument("--shift", type=float, help="--pretrained: flow shift (default: scheduler/ of the root, else 3.0)")
  p.add_argument("--lora", help="--pretrained: a diffusers Wan LoRA file (.safetensors) folded into the transformer")
  p.add_argument("--lora-scale", type=float, default=1.0, help="--pretrained: the LoRA's strength")
  given = p.add_mutually_exclusive_group()
  given.add_argument("--image", help="--workdir: image-to-video, a PNG/JPEG that is the first frame")
  given.add_argument("--video", help="--workdir: continuation, a video whose first frames begin the sample")
  given.add_argument("--keyframes", nargs=2, metavar=("FIRST", "LAST"), help="--workdir: the first and last frames")
  p.add_argument("--label", type=int, help="class label (class-conditional models)")
  p.add_argument("--prompt", help="caption (caption-conditioned models)")
  p.add_argument("--negative-prompt", default="",
                 help="umT5 captions: what guidance steers away from (default: the empty prompt, the null caption)")
  p.add_argument("--frames", type=int, help="frames, in the run's data units: video frames (1 + 4k) for a run "
                 "with a VAE, else latent frames (default: the run's data.frames); --pretrained: 1 + 4k (default 81)")
  p.add_argument("--height", type=int, help="height: pixels for a run with a VAE, else latents (default: data.height)")
  p.add_argument("--width", type=int, help="width: pixels for a run with a VAE, else latents (default: data.width)")
  p.add_argument("--num", type=int, default=4, help="samples to make")
  p.add_argument("--steps", type=int, default=50, help="sampler steps")
  p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1: none; default 4, --pretrained 5)")
  p.add_argument("--sampler", choices=samplers.FLOW_SAMPLERS + samplers.DIFFUSION_SAMPLERS,
                 help="default: euler (flow) / ddim (diffusion); --pretrained: unipc (Wan's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
  p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the written files")
  p.add_argument("--out", default="samples.gif", help="PATH.{mp4,gif,png}: sample i goes to PATH-i.EXT; grid PATH.grid.png")
  return p.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = Path(args.out)
  if out.suffix not in (".mp4", ".gif", ".png"):
    print(f"error: --out {out}: expected a .mp4, .gif or .png file", file=sys.stderr)
    return 2
  if args.pretrained:
    try:
      videos = sample_pretrained(args)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    write(out, videos, 1)
    return 0
  args.cfg = 4.0 if args.cfg is None else args.cfg
  try:
    cfg, task, graphdef, params = load_task_run(args.workdir, use_ema=not args.no_ema)
  except (CheckpointNotFoundError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if cfg.model.cond_dim and args.label is not None and args.prompt is None:
    print("error: this model is also caption-conditioned: give --prompt too", file=sys.stderr)
    return 2
  if not isinstance(task, DiTTask):
    print(f"error: {args.workdir} trained a {type(task).__name__}, not a DiT: nothing to sample", file=sys.stderr)
    return 2
  mesh = mesh_lib.make_mesh(cfg.mesh)
  frozen = task.sampling_frozen(mesh, mesh_lib.make_rules())  # the VAE, the text encoder, a LoRA run's base
  try:
    if task.trains_adapters:  # the adapters mean something only on the base they were trained on
      check_base(args.workdir, task, frozen["base"])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # The run's data sizes: pixels for a run with a VAE, else latents.
  size = (args.frames or cfg.data.frames, args.height or cfg.data.height, args.width or cfg.data.width)
  if task.size_error(size):
    print(f"error: cannot sample {task.size_error(size)}", file=sys.stderr)
    return 2
  shape = task.latent_shape(size)
  label = -1 if args.label is None else args.label
  try:
    given, given_frames = given_from_files(args, cfg, frozen, shape)
  except (ValueError, OSError, BadInput) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  specs = [Spec(shape, label, args.prompt, given, given_frames)] * args.num
  videos = []
  for i in tqdm(range(args.num), desc="sampling", unit="video", file=sys.stderr):
    videos += generate(graphdef, params, cfg, specs[i:i + 1], steps=args.steps, guidance=args.cfg,
                       method=args.sampler, seed=args.seed + i, frozen=frozen, negative_prompt=args.negative_prompt)
  write(out, videos, args.scale)
  return 0


def given_from_files(args, cfg, frozen: dict, shape) -> tuple:
  """(latents [T, H, W, C], frame indices) of --image / --video / --keyframes for a
  sample of latent `shape`, encoded by the run's VAE; (None, ()) for none."""
  if not (args.image or args.video or args.keyframes):
    return None, ()
  if "vae" not in frozen:
    raise ValueError("--image, --video and --keyframes need a run with a VAE (vae.enabled): the frames are pixels "
                     "it encodes")
  if (args.video or args.keyframes) and shape[0] < 2:
    raise ValueError(f"--{'video' if args.video else 'keyframes'} needs a sample of at least 2 latent frames "
                     f"(--frames); this one has {shape[0]}")
  ft, fs = cfg.vae.compression()
  size = (shape[1] * fs, shape[2] * fs)  # pixels
  read = lambda path: video_lib.read_image(Path(path).read_bytes())  # uint8 [1, H, W, 3]
  if args.video:
    total = 1 + ft * (shape[0] - 1)  # pixel frames of the sample
    clip = video_lib.read_video(Path(args.video).read_bytes(), lambda n, fps: np.arange(min(n, total - ft)),
                                lambda h, w: size)
    pixels = [clip[:1 + ft * ((len(clip) - 1) // ft)]]  # 1 + 4k frames: k + 1 latent frames
  elif args.image:
    pixels = [read(args.image)]
  else:  # the last keyframe: a still held for `ft` frames, whose last latent frame it is
    first, last = (read(p) for p in args.keyframes)
    pixels = [first, np.concatenate([last] * (1 + ft))]
  latents = [encode_given(frozen["vae"], video_lib.to_unit_range(video_lib.resize(v, size))) for v in pixels]
  given = np.zeros((*shape, cfg.model.in_channels), np.float32)
  if args.keyframes:
    given[0], given[-1] = latents[0][0], latents[1][-1]
    return given, (0, shape[0] - 1)
  given[:len(latents[0])] = latents[0]
  return given, tuple(range(len(latents[0])))


def encode_given(vae, pixels: np.ndarray) -> np.ndarray:
  """Pixels [T, H, W, 3] in [-1, 1] -> the normalised latent mean [t, h, w, C], as the DiT sees latents."""
  return np.asarray(_encode(vae, jnp.asarray(pixels)[None]))[0]


@jax.jit
def _encode(vae, pixels):
  model = vae.model()
  return model.normalize(model.encode(pixels)[0])


def write(out: Path, videos: list, scale: int) -> None:
  """Videos [T, H, W, C] in [-1, 1] as PATH-i.EXT, and their grid as PATH.grid.png."""
  out.parent.mkdir(parents=True, exist_ok=True)
  for i, video in enumerate(videos):
    media.write_video(out.with_name(f"{out.stem}-{i}{out.suffix}"), video, scale)
  media.write_png(out.with_name(f"{out.stem}.grid.png"), media.grid(videos, scale))
  log.info("wrote %d samples and %s", len(videos), out.with_name(f"{out.stem}.grid.png"))


def pretrained_embeddings(args, pipe) -> tuple:
  """(prompt, negative) embeddings [1, L, D]: from --text-embeddings, else umT5."""
  if args.text_embeddings:
    with np.load(args.text_embeddings) as f:
      if "prompt" not in f:
        raise ValueError(f"--text-embeddings {args.text_embeddings}: no 'prompt' array (found {sorted(f)})")
      text = f["prompt"].reshape(1, *f["prompt"].shape[-2:]).astype(np.float32)
      if "negative" not in f and (args.cfg is None or args.cfg > 1.0):
        raise ValueError(f"--text-embeddings {args.text_embeddings}: guidance needs a 'negative' array too (the "
                         "negative prompt's embeddings; the empty prompt's for none), or --cfg 1")
      negative = f["negative"].reshape(1, *f["negative"].shape[-2:]).astype(np.float32) if "negative" in f else text
    return text, negative
  if args.prompt is None:
    raise ValueError("--pretrained needs --prompt (or --text-embeddings)")
  return tuple(pipe.encode_prompt([p]) for p in (args.prompt, args.negative_prompt))


def sample_pretrained(args) -> list:
  """Videos [T, H, W, 3] in [-1, 1] from a diffusers Wan root, one per seed."""
  from src.wan_pipeline import WanPipeline

  width, height = (int(v) for v in args.size.lower().split("x"))
  pipe = WanPipeline.from_pretrained(args.pretrained, lora=args.lora, lora_scale=args.lora_scale)
  shape = pipe.latent_shape(args.frames or 81, height, width)
  text, negative = pretrained_embeddings(args, pipe)
  videos = []
  for i in tqdm(range(args.num), desc="sampling", unit="video", file=sys.stderr):
    noise = jax.random.normal(jax.random.key(args.seed + i), (1, *shape))
    frames = pipe(noise, text, negative, steps=args.steps, guidance=5.0 if args.cfg is None else args.cfg,
                  method=args.sampler or "unipc", shift=args.shift)
    videos.append(frames[0] * 2.0 - 1.0)
  return videos


if __name__ == "__main__":
  sys.exit(main())
