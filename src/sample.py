"""`python -m src.sample --workdir RUN [--label N | --prompt TEXT] ... --out PATH.{mp4,gif,png}`

Generates from the newest checkpoint of a run (EMA weights unless --no-ema), writes one
video file per sample and a PNG grid of all of them (rows: samples, columns: frames).
The generation itself is `src.generate` (which the trainer's periodic samples use too).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
  p.add_argument("--workdir", required=True, help="run directory with checkpoints/")
  p.add_argument("--label", type=int, help="class label (class-conditional models)")
  p.add_argument("--prompt", help="caption (caption-conditioned models)")
  p.add_argument("--negative-prompt", default="",
                 help="umT5 captions: what guidance steers away from (default: the empty prompt, the null caption)")
  p.add_argument("--frames", type=int, help="latent frames (default: from the run's data.frames)")
  p.add_argument("--height", type=int, help="latent height (default: from the run's data.height)")
  p.add_argument("--width", type=int, help="latent width (default: from the run's data.width)")
  p.add_argument("--num", type=int, default=4, help="samples to make")
  p.add_argument("--steps", type=int, default=50, help="sampler steps")
  p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1: none)")
  p.add_argument("--sampler", choices=samplers.FLOW_SAMPLERS + samplers.DIFFUSION_SAMPLERS,
                 help="default: euler (flow) / ddim (diffusion)")
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
  out.parent.mkdir(parents=True, exist_ok=True)
  for i, video in enumerate(videos):
    media.write_video(out.with_name(f"{out.stem}-{i}{out.suffix}"), video, args.scale)
  media.write_png(out.with_name(f"{out.stem}.grid.png"), media.grid(videos, args.scale))
  log.info("wrote %d samples and %s", len(videos), out.with_name(f"{out.stem}.grid.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
