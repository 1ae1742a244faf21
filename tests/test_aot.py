"""src.aot: TPU topology names, collective counts, and real compiles for TPU
topologies on this CPU host through libtpu (skipped where libtpu is not installed)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src import aot

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.variant=tiny", "model.depth=6", "data.frames=2", "data.height=8", "data.width=8", "model.cond_dim=16",
        "data.text_len=4", "data.batch_size=8"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name, grid, chips", [
    ("v4-8", "v4:2x2x1", 4),
    ("v4-32", "v4:2x2x4", 16),
    ("v5p-256", "v5p:4x4x8", 128),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v5e-8", "v5e:2x4", 8),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-256", "v6e:16x16", 256),
    ("v6e:4x8", "v6e:4x8", 32),
])
def test_topology_names(name, grid, chips):
  topo = aot.parse_topology(name)
  assert (topo.name, topo.chips) == (grid, chips)


@pytest.mark.parametrize("name", ["v7-8", "v5p-7", "v5p-6", "v6e:2x2x2", "tpu"])
def test_bad_topology_names(name):
  with pytest.raises(aot.AotError):
    aot.parse_topology(name)


def test_count_mosaic_kernels():
  hlo = """
  %custom-call.7 = bf16[2,128,128]{2,1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call", backend_config={}
  %custom-call.8 = f32[8]{0} custom-call(%c), custom_call_target="Sharding"
  """
  assert aot.count_mosaic_kernels(hlo) == 1


def test_count_collectives():
  hlo = """
  %all-gather-start.1 = (f32[4], f32[16]) all-gather-start(f32[4] %p), dimensions={0}
  %all-gather-done.1 = f32[16] all-gather-done((f32[4], f32[16]) %all-gather-start.1)
  %ar = f32[] all-reduce(f32[] %x), to_apply=%add
  %rs = f32[2] reduce-scatter(f32[8] %y), dimensions={0}
  %fusion.3 = f32[8] fusion(f32[8] %all-reduce.2), kind=kLoop
  """
  assert aot.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
                                        "collective-permute": 0}


def run_aot(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "src.aot", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


def report(result: subprocess.CompletedProcess) -> dict:
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, result.stdout + result.stderr[-3000:]
  return json.loads(lines[0])


@needs_libtpu
def test_compiles_a_tiny_model_for_v5e_8():
  result = run_aot("--topology", "v5e-8", *TINY, "mesh.fsdp=4", "mesh.tensor=2")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  assert r["chips"] == 8 and r["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2}
  assert r["fits"] and r["hbm_gib"] == 16
  # The batch the step was compiled for, per row, by field path: 2x8x8 latents in 1x2x2
  # patches (32 tokens of 16 values), one example, 4 caption tokens of width 16.
  assert r["batch_shapes"] == {"tokens": [32, 16], "packing.segment_ids": [32], "packing.positions": [32, 3],
                               "packing.grid": [1, 3], "packing.labels": [1], "packing.cond": [4, 16],
                               "packing.cond_segment_ids": [4]}
  # attention=auto is the splash kernel on TPU: the compiled step holds its Mosaic
  # kernels (forward and backward, self- and cross-attention).
  assert r["attention"] == "splash" and r["mosaic_kernels"] >= 2
  assert 0 < r["arguments_gib"] < r["total_gib"] < 1
  assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_chip"])
  # Every layer counted (XLA's cost analysis alone counts a scanned layer once): at
  # least the blocks' q, k, v, out, fc1, fc2 matmuls, forward and backward, 6 x 12 D^2 x depth per token.
  tokens, width, depth = 8 * 32, 64, 6
  assert r["flops_per_step"] >= 6 * 12 * width**2 * depth * tokens
  # FSDP gathers parameters; gradients and the loss are reduced across chips.
  assert r["collectives"]["all-gather"] > 0 and r["collectives"]["all-reduce"] > 0
  # The exact model: as many parameters as the trainer would build.
  from src import config as C
  from src.models.dit import DiT
  from flax import nnx
  import jax
  model = nnx.eval_shape(lambda: DiT(C.load(None, TINY).model, rngs=nnx.Rngs(0)))
  assert r["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@needs_libtpu
def test_compiles_over_two_slices():
  result = run_aot("--topology", "v5e-4", "--slices", "2", *TINY, "mesh.data=2", "model.attention=xla")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  assert r["chips"] == 8 and r["slices"] == 2 and r["mesh"]["data"] == 2 and r["mesh"]["fsdp"] == 4
  assert r["attention"] == "xla" and r["mosaic_kernels"] == 0  # XLA's own attention: no kernel


@needs_libtpu
def test_fsdp_across_slices():
  """mesh.dcn_fsdp=2: parameters sharded over both slices (fsdp spans the DCN)."""
  result = run_aot("--topology", "v5e-4", "--slices", "2", *TINY, "mesh.data=1", "mesh.fsdp=8",
                   "mesh.dcn_data=1", "mesh.dcn_fsdp=2", "model.attention=xla")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  assert r["chips"] == 8 and r["mesh"]["fsdp"] == 8 and r["fits"]


def test_slices_need_a_data_axis_to_split():
  # Refused before any compile: the slice count must divide mesh.data.
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed")
  result = run_aot("--topology", "v5e-4", "--slices", "2", *TINY)
  assert result.returncode == 2 and "mesh.data" in result.stderr


@needs_libtpu
def test_a_huge_model_does_not_fit_a_small_slice():
  # ~50B parameters: 800 GB of float32 weights, EMA and Adam moments over 4 x 16 GiB.
  result = run_aot("--topology", "v5e-4", "model.variant=XL", "model.depth=48", "model.width=8192",
                   "model.heads=64", "data.frames=2", "data.height=8", "data.width=8", "data.batch_size=4")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "does not fit" in result.stderr
  assert report(result)["fits"] is False


def test_bad_arguments():
  result = run_aot("--topology", "v9-8", *TINY)
  assert result.returncode == 2 and "unknown TPU topology 'v9-8'" in result.stderr
  result = run_aot("--topology", "v5e-8", "model.bogus=1")
  assert result.returncode == 2 and "unknown config key" in result.stderr


@needs_libtpu
def test_compiles_the_umt5_text_encoder(tiny_umt5):
  """--text-encoder: the frozen umT5 encoding a batch of captions, sharded by the rules,
  with every layer's FLOPs counted."""
  from src.flops import umt5_flops
  from src.text_encoder import read_umt5_config

  result = run_aot("--text-encoder", "--topology", "v5e-8", f"text.checkpoint={tiny_umt5}", "data.batch_size=8",
                   "data.text_len=64", "mesh.fsdp=4", "mesh.tensor=2", "text.dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  umt5 = read_umt5_config(tiny_umt5)
  assert r["program"] == "umt5_encode" and r["fits"] and r["captions"] == 8 and r["text_len"] == 64
  assert r["params"] == 56 * 32 + umt5.num_layers * (4 * 32 * 32 + 3 * 32 * 48 + 32 * 4 + 2 * 32) + 32
  assert r["flops_per_step"] == umt5_flops(umt5, 8, 64) > 0
  assert r["collectives"]["all-gather"] > 0  # fsdp-sharded weights are gathered for the matmuls
