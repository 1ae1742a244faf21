"""The cheapest `model.remat` policy that fits a topology, from compiled TPU programs.

    python -m benchmarks.remat_search --config configs/dit_1b.yaml --topology v5p-256 [--step-time] \
        [--policies none dots ...] [key.sub=value ...]

Compiles the train step with `src.aot` for each policy in ORDER (least recomputation
first: nothing, every dot, the projections, attention only; then the same with host
offload; full remat last) and stops at the first whose program fits the chip's HBM.
With --step-time, adds the TPU compiler's estimate of that policy's step (every layer
counted: `src.aot.step_seconds`, two more small compiles). Prints one JSON line: the
chosen policy, its `src.aot` report, and the per-chip GiB of every policy tried. A
compile a policy takes 5-25 minutes on a 2-core host; nothing here runs on a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from src import aot
from src import config as config_lib
from src import mesh as mesh_lib
from src.tasks import make_task

ORDER = ("none", "dots", "dots_no_batch", "attention", "offload_dots_no_batch", "offload_attention",
         "offload_inputs", "full")


def search(cfg, topo, policies=ORDER, step_time: bool = False) -> dict:
  """The first of `policies` whose step fits: {"remat", "report", "tried": {policy: GiB or error}}."""
  tried = {}
  for policy in policies:
    trial = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=policy))
    report = aot.compile_for_topology(trial, topo)
    tried[policy] = report.get("total_gib", report.get("error"))
    logging.warning("remat=%s: %s GiB a chip, fits: %s", policy, tried[policy], report["fits"])
    if report["fits"]:
      if step_time:
        task = make_task(trial)
        if not task.scans_layers:
          raise aot.AotError("--step-time here needs model.scan_layers=true")
        mesh = mesh_lib.make_mesh(trial.mesh, aot.topology_devices(topo))
        report["step_seconds"] = aot.step_seconds(
            task, mesh, mesh_lib.make_rules(trial.mesh.rules), None, topo, report["flops_per_chip"],
            report["model_flops_per_step"] / report["chips"])
      return dict(remat=policy, report=report, tried=tried)
  return dict(remat=None, report=None, tried=tried)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", help="YAML preset")
  p.add_argument("--topology", required=True, help="v5p-8, v6e-256, ... (src.aot)")
  p.add_argument("--policies", nargs="+", default=list(ORDER), choices=ORDER, help="policies to try, in order")
  p.add_argument("--step-time", action="store_true", help="the compiler's step estimate for the chosen policy")
  p.add_argument("overrides", nargs="*", metavar="key.sub=value")
  args = p.parse_args(argv)
  try:
    cfg = config_lib.load(args.config, args.overrides)
    result = search(cfg, aot.parse_topology(args.topology), args.policies, args.step_time)
  except (config_lib.ConfigError, aot.AotError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(dict(bench="remat_search", config=args.config, topology=args.topology, **result)))
  return 0 if result["remat"] else 1


if __name__ == "__main__":
  sys.exit(main())
