"""Import pretrained weights from the diffusers layout, with no PyTorch at run time.

    python -m src.convert vae --src DIR --dst DIR

reads a diffusers `AutoencoderKLWan` directory (`config.json` +
`diffusion_pytorch_model.safetensors`, e.g. the `vae/` folder of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers), maps every tensor onto `models.vae.VideoVAE` and
writes an Orbax checkpoint with two items: `params` (the NNX parameter state) and
`config` (the VAEConfig read from config.json, as JSON). Every tensor must be used
exactly once with the expected shape; anything else is an error naming it.

This is the command line only; the mapping and the loaders live in `src.pretrained`
(`vae.checkpoint` takes either kind of directory).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import jax
from flax import nnx

from src.pretrained import load_pretrained_vae, save_vae

log = logging.getLogger(__name__)


def convert_vae(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
  """Read the diffusers (or Orbax) VAE in `src` and write it as an Orbax checkpoint to `dst`."""
  model, cfg = load_pretrained_vae(src)
  n = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  dst = save_vae(model, cfg, dst, overwrite=overwrite)
  log.info("wrote %d VAE parameters to %s", n, dst)
  return dst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m src.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="model", required=True, metavar="{vae}")
  vae = sub.add_parser(
      "vae", help="Wan 2.1 video VAE (diffusers AutoencoderKLWan) -> Orbax",
      description="Convert a diffusers AutoencoderKLWan directory (config.json + "
      "diffusion_pytorch_model.safetensors) into an Orbax checkpoint that vae.checkpoint "
      "and src.pretrained.load_vae() read. A missing, unexpected or mis-shaped tensor is an error.")
  vae.add_argument("--src", required=True, help="diffusers directory (or a model root with a vae/ folder)")
  vae.add_argument("--dst", required=True, help="output Orbax directory")
  vae.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  args = parse_args(argv)
  try:
    if args.model == "vae":
      convert_vae(args.src, args.dst, overwrite=args.overwrite)
  except (OSError, ValueError) as e:  # bad paths, bad weights, unsupported configs: no traceback
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
