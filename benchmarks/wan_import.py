"""Peak host memory of importing a Wan transformer, against its float32 size.

    python -m benchmarks.wan_import [--depth 8 --width 1024 --devices 1] [--out wan_import.jsonl]

Writes a random Wan-layout checkpoint (diffusers tensor names and shapes, sharded
safetensors + index, float32 or bfloat16) of the given size into a temporary directory,
then imports it in a fresh subprocess with `src.wan.load_pretrained_wan` (on 1 CPU
device, or `--devices N` simulated ones with fsdp=N) and reports the growth of the
subprocess's resident memory during the import (sampled every 5 ms from
/proc/self/status), next to the model's float32 size: anonymous memory (the arrays and
any staging copies) and file-backed pages (the memory-mapped safetensors, page cache
the kernel can drop). On CPU the imported arrays themselves live in host memory, so the
ideal anonymous growth is 1.0x the float32 size; a reader that materialised every
tensor and then copied it would peak at ~2x. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, threading, time
n = int(sys.argv[2])
if n > 1:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
import jax
from flax import nnx
from src import mesh as mesh_lib, wan
from src.config import MeshConfig

def status():  # resident bytes: anonymous (our arrays) and file-backed (memory-mapped safetensors)
  fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
  return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

peak, done = status(), threading.Event()
def watch():
  while not done.is_set():
    for k, v in status().items():
      peak[k] = max(peak[k], v)
    time.sleep(0.005)
before = status()
threading.Thread(target=watch, daemon=True).start()
mesh = mesh_lib.make_mesh(MeshConfig(fsdp=n), jax.devices()) if n > 1 else None
tic = time.perf_counter()
model = wan.load_pretrained_wan(sys.argv[1], mesh=mesh)
jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
seconds = time.perf_counter() - tic
done.set()
params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps(dict(params=params, before=before, peak=peak, after=status(), seconds=seconds)))
"""


def write_checkpoint(directory: Path, depth: int, width: int, heads: int, dtype: str) -> int:
  """A random checkpoint in the diffusers layout; returns its bytes on disk."""
  import numpy as np
  from safetensors.numpy import save_file

  import jax.numpy as jnp
  from src import wan
  from src.config import ModelConfig

  m = ModelConfig(text_encoder="umt5", depth=depth, width=width, heads=heads, mlp_dim=4 * width, in_channels=16,
                  cond_dim=width, freq_dim=256)
  rng = np.random.default_rng(0)
  np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16
  shards, current, size, limit = [], {}, 0, 200 * 2**20
  for source in wan.sources(m).values():
    for view in source.views:
      current[view.name] = rng.standard_normal(view.source_shape, np.float32).astype(np_dtype)
      size += current[view.name].nbytes
      if size > limit:
        shards.append(current)
        current, size = {}, 0
  shards.append(current)
  files = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for f, tensors in zip(files, shards):
    save_file(tensors, directory / f)
  index = {"weight_map": {n: f for f, tensors in zip(files, shards) for n in tensors}}
  (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
  (directory / "config.json").write_text(json.dumps(wan.diffusers_config(m)))
  return sum(t.nbytes for tensors in shards for t in tensors.values())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.wan_import", description=__doc__.split("\n\n")[0])
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the tensors on disk")
  p.add_argument("--devices", type=int, nargs="+", default=[1], help="simulated CPU devices (fsdp=N) per run")
  p.add_argument("--out", help="append the JSON records to this file")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    disk = write_checkpoint(Path(tmp), args.depth, args.width, args.heads, args.dtype)
    for n in args.devices:
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
      out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(n)], env=env, capture_output=True, text=True,
                           check=True, cwd=ROOT)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      f32 = r["params"] * 4
      record = dict(depth=args.depth, width=args.width, dtype_on_disk=args.dtype, devices=n, params=r["params"],
                    float32_gib=round(f32 / 2**30, 3), disk_gib=round(disk / 2**30, 3),
                    peak_anon_growth_gib=round((r["peak"]["RssAnon"] - r["before"]["RssAnon"]) / 2**30, 3),
                    peak_anon_over_float32=round((r["peak"]["RssAnon"] - r["before"]["RssAnon"]) / f32, 3),
                    after_anon_over_float32=round((r["after"]["RssAnon"] - r["before"]["RssAnon"]) / f32, 3),
                    peak_file_mapped_gib=round((r["peak"]["RssFile"] - r["before"]["RssFile"]) / 2**30, 3),
                    seconds=round(r["seconds"], 1), load_1m=round(os.getloadavg()[0], 2))
      print(json.dumps(record))
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(record) + "\n")
  return 0 if math.isfinite(disk) else 1


if __name__ == "__main__":
  sys.exit(main())
