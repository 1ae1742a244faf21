"""`python -m src.sample --workdir RUN [--label N | --prompt TEXT] ... --out PATH.{mp4,gif,png}`
`python -m src.sample --pretrained WAN_ROOT --prompt TEXT [--negative-prompt TEXT] --size 832x480 --frames 81`

Generates from the newest checkpoint of a run (EMA weights unless --no-ema), or from a
diffusers Wan 2.1 model root (transformer/, vae/, text_encoder/ + tokenizer/: the Wan
pipeline of `src.wan_pipeline`, as diffusers' WanPipeline), and writes one video file
per sample and a PNG grid of all of them (rows: samples, columns: frames). A run's
generation is `src.generate` (which the trainer's periodic samples use too).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src import config as config_lib
from src import media, samplers
from src import mesh as mesh_lib
from src.checkpoint import CheckpointNotFoundError
from src.generate import Spec, generate
from src.runs import load_task_run
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
  p.add_argument("--label", type=int, help="class label (class-conditional models)")
  p.add_argument("--prompt", help="caption (caption-conditioned models)")
  p.add_argument("--negative-prompt", default="",
                 help="umT5 captions: what guidance steers away from (default: the empty prompt, the null caption)")
  p.add_argument("--frames", type=int, help="latent frames (default: from the run's data.frames); "
                 "--pretrained: video frames, 1 + 4k (default 81)")
  p.add_argument("--height", type=int, help="latent height (default: from the run's data.height)")
  p.add_argument("--width", type=int, help="latent width (default: from the run's data.width)")
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
  frozen = task.sampling_frozen(mesh, mesh_lib.make_rules())  # the VAE, the text encoder
  # The run's data sizes: pixels for a DiT that encoded pixels in the step, else latents.
  shape = task.latent_shape((args.frames or cfg.data.frames, args.height or cfg.data.height,
                             args.width or cfg.data.width))
  label = -1 if args.label is None else args.label
  specs = [Spec(shape, label, args.prompt)] * args.num
  videos = []
  for i in tqdm(range(args.num), desc="sampling", unit="video", file=sys.stderr):
    videos += generate(graphdef, params, cfg, specs[i:i + 1], steps=args.steps, guidance=args.cfg,
                       method=args.sampler, seed=args.seed + i, frozen=frozen, negative_prompt=args.negative_prompt)
  write(out, videos, args.scale)
  return 0


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
  import jax

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
