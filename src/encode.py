"""`python -m src.encode --config C --out DIR [key.sub=value ...]`: dataset -> latent cache.

Runs the configured data source (pixels) through the frozen VAE (`vae.checkpoint`) on
the device mesh and writes an ArrayRecord cache of normalised posterior means, with
labels, captions and, when the DiT is caption-conditioned, the caption embeddings.
Each process encodes and writes its own shard of the source; `--split validation` writes
the held-out split into `OUT/validation/`, where the `latents` source reads it. Train on the cache with
`data.source=latents data.data_dir=DIR` (variable shapes are packed like any clip).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from src import config as config_lib
from src import mesh as mesh_lib
from src.config import Config
from src.data.latents import LatentWriter
from src.batch import TEXT_PAD
from src.captions import encode_captions, tokenizer_dir
from src.data.sources import caption_ids, clip_source, embed_caption
from src.pretrained import load_vae
from src.state import Frozen, place_frozen
from src.tasks import make_task
from src.tasks.text import text_frozen

log = logging.getLogger("src.encode")


def encode_fn(graphdef):
  """jit: videos [B, T, H, W, C] -> normalised posterior means [B, t, h, w, Z]."""

  @jax.jit
  def encode(params, videos):
    vae = nnx.merge(graphdef, params)
    mean, _ = vae.encode_chunked(videos)
    return vae.normalize(mean)

  return encode


class CaptionEmbeddings:
  """The caption embeddings a cache stores: umT5's, trimmed to the caption's own tokens
  (the batch restores Wan's zero padding); the synthetic stand-in's (`precomputed`); or
  none (a byte-level encoder trains with the DiT instead)."""

  def __init__(self, cfg: Config, mesh, rules):
    self.cfg = cfg
    self.umt5 = cfg.model.cond_dim > 0 and cfg.model.text_encoder == "umt5"
    self.frozen = text_frozen(cfg, mesh, rules) if self.umt5 else {}
    self.tokenizer = tokenizer_dir(cfg.text) if self.umt5 else ""
    self._encode = jax.jit(encode_captions, static_argnums=2)

  def __call__(self, captions: list[str]) -> list[np.ndarray | None]:
    text_len, m = self.cfg.data.text_len, self.cfg.model
    if self.umt5:
      ids = np.stack([caption_ids(c, text_len, self.tokenizer) for c in captions])  # [G, S]
      embeddings = np.asarray(self._encode(self.frozen["text"], ids, text_len))  # [G, S, D]
      return [e[: int((i != TEXT_PAD).sum())] for e, i in zip(embeddings, ids)]
    if m.cond_dim and m.text_encoder == "precomputed":
      return [embed_caption(c, text_len, m.cond_dim) for c in captions]
    return [None] * len(captions)


def encode_dataset(cfg: Config, out_dir: str, split: str = "train", limit: int = 0) -> int:
  """Encode this process's shard of the source into `out_dir`; returns records written."""
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.make_rules(cfg.mesh.rules)
  vae = place_frozen(Frozen.of(load_vae(cfg.vae, cfg.seed)), mesh)  # replicated on the mesh's devices
  graphdef, params = vae.graphdef, vae.params
  _, fs = cfg.vae.compression()
  # A still image stays one frame: the causal VAE codes a first frame alone (T = 1 + 4k, k = 0).
  source = clip_source(cfg.data, cfg.seed, fs * max(cfg.model.patch[1:]), split)
  pid, count = jax.process_index(), jax.process_count()
  indices = list(range(pid, len(source), count))[: limit or None]
  rows = max(1, cfg.data.batch_size // count)
  data_devices = mesh_lib.batch_devices(mesh, rules)
  encode, captions = encode_fn(graphdef), CaptionEmbeddings(cfg, mesh, rules)
  writer = LatentWriter(out_dir if split == "train" else f"{out_dir}/validation", pid, count)  # where latents reads it
  pending = collections.defaultdict(list)  # clips of one shape are encoded together
  skipped = collections.Counter()
  tic = time.perf_counter()

  def flush(shape):
    group = pending.pop(shape)
    videos = np.stack([g["video"] for g in group])
    sharding = NamedSharding(mesh, mesh_lib.batch_spec(videos.ndim, rules) if len(group) % data_devices == 0
                             else jax.sharding.PartitionSpec())
    latents = np.asarray(encode(params, jax.device_put(videos, sharding)))
    for rec, latent, text in zip(group, latents, captions([g["caption"] for g in group])):
      writer.write(latent, rec["label"], rec["caption"], text)

  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      for i in tqdm(indices, desc=f"encoding (process {pid})", unit="clip", file=sys.stderr):
        rec = source[i]
        if "skip" in rec:
          log.warning("skipping record %d %s: %s %s", i, rec["name"], rec["skip"], rec["detail"])
          skipped[rec["skip"]] += 1
          continue
        shape = rec["video"].shape
        pending[shape].append(rec)
        if len(pending[shape]) == rows:
          flush(shape)
      for shape in list(pending):
        flush(shape)
  except BaseException:  # nothing half-written stays behind (Ctrl-C included)
    writer.abort()
    raise
  writer.close(dict(records_per_process={str(pid): writer.count}, process_count=count, split=split,
                    z_dim=cfg.vae.z_dim, source=cfg.data.source, text_len=cfg.data.text_len,
                    cond_dim=cfg.model.cond_dim, text_encoder=cfg.model.text_encoder,
                    vae=config_lib.to_dict(cfg)["vae"]))
  why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
  log.info("encoded %d clips in %.1f s -> %s; skipped %d%s", writer.count, time.perf_counter() - tic, writer.path,
           sum(skipped.values()), f" ({why})" if why else "")
  return writer.count


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("src").setLevel(logging.INFO)
  p = argparse.ArgumentParser(prog="python -m src.encode", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", help="YAML preset: data source, vae.* and model.patch/cond_dim")
  p.add_argument("--out", required=True, help="output directory of the latent cache")
  p.add_argument("--split", default="train", choices=("train", "validation"),
                 help="the source split to encode; validation goes to OUT/validation/, where data.source=latents "
                 "finds the held-out split")
  p.add_argument("--limit", type=int, default=0, help="encode at most this many clips per process (0: all)")
  p.add_argument("overrides", nargs="*", metavar="key.sub=value")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, args.overrides)
    make_task(cfg)  # the config checks of the DiT this cache is for
    mesh_lib.initialize_distributed(cfg.mesh)
    encode_dataset(cfg, args.out, args.split, args.limit)
  except (config_lib.ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
