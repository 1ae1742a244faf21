"""The sample-quality measure (`src.quality`) of a trained run on the synthetic data:
samples drawn for the first N held-out captions (and labels), judged against what each
asks for (shape, colour, motion), next to the same measure on the real held-out clips.
And a probe of whether the model reads the caption's direction at all, more sensitive
than the samples: `direction_loss_ratio` is the validation loss (at t = 0.5 and 0.7, on
the held-out clips of 3 or more frames) with each caption's direction replaced by its
opposite, over the loss with the true captions. 1.000 means the direction is ignored;
real clips moving the asked way make a model that uses it score above 1.

    python -m src.train --config configs/smoke.yaml workdir=runs/smoke_q
    python benchmarks/sample_quality.py --workdir runs/smoke_q --num 48

The numbers are CPU results of one seed; the README quotes the smoke preset's.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from src.data.sources import DIRECTIONS, clip_source
from src.generate import Spec, generate, pack_specs
from src.quality import MOTION_FRAMES, Ask, judge, pass_fraction
from src.runs import load_task_run
from src.state import merged

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
assert set(OPPOSITE) == set(DIRECTIONS)


def _packed(cfg, examples, captions):
  """The clips with these captions packed into rows of data.seq_len: every frame "given"
  makes the packed tokens the clip itself (a run without a VAE: the clips are the latents)."""
  specs = [Spec(ex["video"].shape[:3], int(ex["label"]), caption, given=ex["video"],
                given_frames=tuple(range(ex["video"].shape[0]))) for ex, caption in zip(examples, captions)]
  return jax.tree.map(jnp.asarray, pack_specs(cfg, specs, seq_len=cfg.data.seq_len)[0])


def direction_loss_ratio(cfg, task, graphdef, params, examples, levels=(0.5, 0.7), seeds=4) -> float:
  """Loss with every caption's direction reversed / loss with the true captions (see the module doc)."""
  moving = [e for e in examples if e["video"].shape[0] >= MOTION_FRAMES and e["caption"].split()[-1] in OPPOSITE]
  if not moving or cfg.vae.enabled or not cfg.model.cond_dim or cfg.model.text_encoder == "umt5" or not cfg.data.seq_len:
    return float("nan")  # the probe packs latent clips and stand-in captions itself
  true = _packed(cfg, moving, [e["caption"] for e in moving])
  reversed_ = _packed(cfg, moving, [" ".join(e["caption"].split()[:-1] + [OPPOSITE[e["caption"].split()[-1]]])
                                    for e in moving])
  loss = jax.jit(lambda params, batch, level, key: task.eval_loss(merged(graphdef, params, {}), batch, level, key))
  keys = [jax.random.key(s) for s in range(seeds)]
  mean = lambda batch: np.mean([float(loss(params, batch, lv, k)) for lv in levels for k in keys])
  return float(mean(reversed_) / mean(true))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=48, help="held-out requests to sample")
  p.add_argument("--steps", type=int, default=25, help="sampler steps (the trainer's default)")
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
  args = p.parse_args()
  cfg, task, graphdef, params = load_task_run(args.workdir, use_ema=not args.raw)
  source = clip_source(cfg.data, cfg.seed, max(cfg.model.patch[1:]), "validation")
  examples = [source[i] for i in range(args.num)]
  asks = [Ask.of(e["label"], e["caption"]) for e in examples]
  specs = [Spec(e["video"].shape[:3], e["label"] if cfg.model.num_classes else -1,
                e["caption"] if cfg.model.cond_dim else None) for e in examples]
  samples = []
  for i in range(0, len(specs), 8):
    samples += generate(graphdef, params, cfg, specs[i:i + 8], steps=args.steps, guidance=args.guidance, seed=i)
  judged = [judge(s, a) for s, a in zip(samples, asks)]
  report = dict(
      workdir=args.workdir, weights="raw" if args.raw else "ema", samples=len(samples),
      sample_pass=pass_fraction(samples, asks), real_pass=pass_fraction([e["video"] for e in examples], asks),
      colour_ok=float(np.mean([j["colour_error"] < 0.45 for j in judged])),
      shape_ok=float(np.mean([j["iou"] >= 0.5 and j["kind_share"] >= 0.5 for j in judged])),
      motion_ok=float(np.mean([j["motion_along"] > j["motion_across"] for j in judged if "motion_along" in j] or [np.nan])),
      direction_loss_ratio=direction_loss_ratio(cfg, task, graphdef, params,
                                                [source[i] for i in range(max(args.num, 200))]))
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
