"""The sample-quality measure (`src.quality`) of a trained run on the synthetic data:
samples drawn for the first N held-out captions (and labels), judged against what each
asks for (shape, colour, motion), next to the same measure on the real held-out clips.

    python -m src.train --config configs/smoke.yaml workdir=runs/smoke_q
    python benchmarks/sample_quality.py --workdir runs/smoke_q --num 48

The numbers are CPU results of one seed; the README quotes the smoke preset's.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from src.data.sources import clip_source
from src.generate import Spec, generate
from src.quality import Ask, judge, pass_fraction
from src.runs import load_run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=48, help="held-out requests to sample")
  p.add_argument("--steps", type=int, default=25, help="sampler steps (the trainer's default)")
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
  args = p.parse_args()
  cfg, graphdef, params = load_run(args.workdir, use_ema=not args.raw)
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
      motion_ok=float(np.mean([j["motion_along"] > j["motion_across"] for j in judged if "motion_along" in j] or [np.nan])))
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
