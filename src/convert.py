"""Import pretrained weights from the diffusers layout, and export ours back to it; no
PyTorch at run time.

    python -m src.convert vae --src DIR --dst DIR
    python -m src.convert wan --src DIR --dst DIR
    python -m src.convert export --workdir RUN [--ema] --dst DIR
    python -m src.convert export --workdir LORA_RUN [--ema] --lora-only --dst FILE.safetensors
    python -m src.convert export --workdir VAE_RUN [--ema] --dst DIR

`vae` reads a diffusers `AutoencoderKLWan` directory (`config.json` +
`diffusion_pytorch_model.safetensors`, e.g. the `vae/` folder of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers) and writes an Orbax checkpoint (`params`, `config`)
that `vae.checkpoint` reads. `wan` does the same for a `WanTransformer3DModel`
directory (the `transformer/` folder, sharded safetensors + index): an Orbax copy that
`model.init_from` and `load_pretrained_wan` read faster. `export` writes a run's newest
checkpoint (raw or EMA weights) as a diffusers `transformer/` directory that
`WanTransformer3DModel.from_pretrained` loads; of a LoRA run, the adapters as the LoRA
file diffusers' Wan pipelines load (`load_lora_weights`), or merged into the base
(`--merge`); of a `task=vae` run, a diffusers `AutoencoderKLWan` directory (which
`vae.checkpoint` reads too). Every tensor must be used exactly once
with the expected shape; anything else is an error naming it.

For parity checks in a few lines:

    from src.convert import load_pretrained_wan, wan_forward
    model = load_pretrained_wan(DIR)            # a diffusers directory or the Orbax copy
    out = wan_forward(model, latents, timestep, text)   # diffusers-layout arrays

The mappings and loaders live in `src.pretrained` (VAE) and `src.wan` (transformer);
this is the command line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from src import wan, wan_lora
from src.checkpoint import CheckpointNotFoundError
from src.pretrained import export_diffusers_vae, load_pretrained_vae, save_vae
from src import lora as lora_lib
from src.runs import load_base, load_task_run
from src.tasks import VAETask
from src.wan import load_pretrained_wan, wan_forward  # noqa: F401 (the parity API above)

log = logging.getLogger(__name__)


def convert_vae(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
  """Read the diffusers (or Orbax) VAE in `src` and write it as an Orbax checkpoint to `dst`."""
  model, cfg = load_pretrained_vae(src)
  n = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  dst = save_vae(model, cfg, dst, overwrite=overwrite)
  log.info("wrote %d VAE parameters to %s", n, dst)
  return dst


def convert_wan(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
  """Read the diffusers Wan transformer in `src` and write our Orbax copy to `dst`."""
  model = load_pretrained_wan(src)
  params = nnx.state(model, nnx.Param)
  dst = wan.save_orbax(params, model.cfg, dst, overwrite=overwrite)
  log.info("wrote %d transformer parameters to %s", sum(v.size for v in jax.tree.leaves(params)), dst)
  return dst


def export_run(workdir: str | Path, dst: str | Path, use_ema: bool = False, dtype: str = "float32",
               max_shard_gb: float = 5.0, lora_only: bool = False, merge: bool = False) -> Path:
  """The newest checkpoint of the run in `workdir` as a diffusers transformer directory;
  a LoRA run's adapters as one diffusers LoRA file (`lora_only`), or folded into its
  base and exported whole (`merge`)."""
  cfg, task, _, params = load_task_run(workdir, use_ema=use_ema)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  if isinstance(task, VAETask):  # a trained VAE: a diffusers AutoencoderKLWan, which vae.checkpoint also reads
    if lora_only or merge:
      raise ValueError(f"{workdir} is a task=vae run: export it without --lora-only / --merge")
    return export_diffusers_vae(params, cfg.vae, dst, dtype=np_dtype)
  if not task.trains_adapters:
    if lora_only or merge:
      raise ValueError(f"{workdir} is not a LoRA run (lora.rank=0): export it without --lora-only / --merge")
    return wan.export_diffusers(params, cfg.model, dst, dtype=np_dtype, max_shard_bytes=int(max_shard_gb * 1e9))
  scale = lora_lib.scale(cfg.lora)
  if lora_only:
    return wan_lora.export_lora(params, cfg.model, scale, dst, dtype=np_dtype)
  if not merge:
    raise ValueError(f"{workdir} is a LoRA run: export its adapters (--lora-only) or the merged model (--merge)")
  base = load_base(workdir, task)
  merged = lora_lib.merged_kernels(wan.host_params(base), wan.host_params(params), scale)
  return wan.export_diffusers(merged, cfg.model, dst, dtype=np_dtype, max_shard_bytes=int(max_shard_gb * 1e9))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m src.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="model", required=True, metavar="{vae,wan,export}")
  vae = sub.add_parser(
      "vae", help="Wan 2.1 video VAE (diffusers AutoencoderKLWan) -> Orbax",
      description="Convert a diffusers AutoencoderKLWan directory (config.json + "
      "diffusion_pytorch_model.safetensors) into an Orbax checkpoint that vae.checkpoint "
      "and src.pretrained.load_vae() read. A missing, unexpected or mis-shaped tensor is an error.")
  transformer = sub.add_parser(
      "wan", help="Wan 2.1 transformer (diffusers WanTransformer3DModel) -> Orbax",
      description="Convert a diffusers WanTransformer3DModel directory (config.json + safetensors shards and "
      "their index; or a model root with transformer/) into the Orbax copy that model.init_from reads.")
  for p, what in ((vae, "vae/"), (transformer, "transformer/")):
    p.add_argument("--src", required=True, help=f"diffusers directory (or a model root with a {what} folder)")
    p.add_argument("--dst", required=True, help="output Orbax directory")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
  export = sub.add_parser(
      "export", help="a run's DiT -> diffusers WanTransformer3DModel directory (a VAE run: AutoencoderKLWan)",
      description="Write the newest checkpoint of a run (a Wan-sized DiT) as a diffusers transformer/ "
      "directory: config.json and safetensors shards with their index, loadable by "
      "WanTransformer3DModel.from_pretrained (and so by WanPipeline and ComfyUI's diffusers loader). "
      "A task=vae run is written as a diffusers AutoencoderKLWan directory (the pipeline's vae/ folder).")
  export.add_argument("--workdir", required=True, help="run directory with checkpoints/")
  export.add_argument("--dst", required=True, help="output directory (the pipeline's transformer/ folder)")
  export.add_argument("--ema", action="store_true", help="export the EMA weights (default: the raw weights)")
  export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="tensor dtype written")
  export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (diffusers: 5)")
  lora = export.add_mutually_exclusive_group()
  lora.add_argument("--lora-only", action="store_true",
                    help="a LoRA run: write its adapters as one diffusers LoRA file (--dst FILE.safetensors)")
  lora.add_argument("--merge", action="store_true", help="a LoRA run: fold the adapters into the base, export it whole")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  args = parse_args(argv)
  try:
    if args.model == "vae":
      convert_vae(args.src, args.dst, overwrite=args.overwrite)
    elif args.model == "wan":
      convert_wan(args.src, args.dst, overwrite=args.overwrite)
    else:
      export_run(args.workdir, args.dst, use_ema=args.ema, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                 lora_only=args.lora_only, merge=args.merge)
  except (CheckpointNotFoundError, OSError, ValueError) as e:  # bad paths, bad weights, unsupported configs
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
