"""Benchmark tools: the FLOP counters against XLA's own count, the CLI's JSON, and the
PyTorch reference DiT against the paper's parameter count and its JAX mirror."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import compare_torch
from src import bench, flops
from src.models import dit
from src.models.dit import DiT

ROOT = Path(__file__).resolve().parents[1]


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of `fn` (HLO cost analysis of the lowered program; no compile)."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def dit_forward_xla_flops(cfg, batch) -> float:
  """XLA's count of an unrolled (a scan body is counted once) DiT forward."""
  cfg.model.scan_layers = False
  graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(cfg.model, rngs=nnx.Rngs(0))))
  time = jnp.full(batch.packing.grid.shape[:2], 500.0)
  batch = jax.tree.map(jnp.asarray, batch)
  return xla_flops(lambda p, b: nnx.merge(graphdef, p)(b.tokens, time, b.packing), params, batch)


def test_flop_counter_matches_xla_cost_analysis():
  # width 64 and 256 tokens: attention is ~40% of the count, so leaving it out would fail.
  cfg = bench.bench_config("tiny", 2, (32, 32, 4), 2)
  batch = bench.make_batch(cfg)
  ours = flops.forward_flops(cfg.model, flops.example_tokens(batch))
  assert flops.example_tokens(batch) == [256, 256]
  assert ours == pytest.approx(dit_forward_xla_flops(cfg, batch), rel=0.1)
  assert flops.train_flops(cfg.model, [256, 256]) == 3 * ours


def test_flop_counter_with_cross_attention_matches_xla():
  cfg = bench.bench_config("tiny", 2, (32, 32, 4), 2)
  no_cond = flops.forward_flops(cfg.model, [256, 256])
  cfg.model.cond_dim, text_len = 32, 16
  batch = bench.make_batch(cfg)
  batch = batch.replace(packing=batch.packing.replace(cond=np.ones((2, text_len, 32), np.float32),
                                                      cond_segment_ids=np.ones((2, text_len), np.int32)))
  ours = flops.forward_flops(cfg.model, flops.example_tokens(batch), cond_tokens=text_len)
  assert ours > 1.1 * no_cond  # the cross-attention terms matter
  assert ours == pytest.approx(dit_forward_xla_flops(cfg, batch), rel=0.1)


def test_packed_flops_count_only_the_block_diagonal():
  """A packed row's useful FLOPs are those of its examples run alone (XLA's count)."""
  cfg = bench.bench_config("tiny", 1, (32, 32, 4), 2, packed=True)
  packed = bench.make_batch(cfg, packed=True)
  sizes = flops.example_tokens(packed)
  assert sizes == [128, 32, 96]
  alone = 0.0
  for shape in bench.packed_shapes((32, 32, 4), 2):
    one = bench.bench_config("tiny", 1, (shape[1], shape[2], 4), 2)
    one.data.frames = shape[0]
    alone += dit_forward_xla_flops(one, bench.make_batch(one))
  assert flops.forward_flops(cfg.model, sizes) == pytest.approx(alone, rel=0.1)
  assert flops.forward_flops(cfg.model, [256]) > 1.2 * alone  # the dense count would not pass


def test_step_cli_prints_json_with_mfu(tmp_path):
  out = tmp_path / "bench.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "src.bench", "step", "--variant", "tiny", "--repeats", "2",
                         "--packed", "--unrolled", "--per-frame", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r.get("case", r["bench"]) for r in records] == [
      "unpacked", "packed", "unrolled", "per_frame", "step_packed_vs_unpacked", "step_unrolled_vs_unpacked",
      "step_per_frame_vs_packed"]
  assert [r["scan"] for r in records[:4]] == [True, True, False, True] and records[1]["examples"] == 24
  assert records[3]["examples"] == 24 and records[3]["flops_per_step"] == records[1]["flops_per_step"]
  assert all(r["time_ratio"] > 0 for r in records[4:])
  r = records[0]
  assert 0 < r["mfu"] <= 1 and r["repeats"] == 2 and r["tokens_per_s"] > 0
  assert r["flops_per_step"] == flops.train_flops(bench.bench_config("tiny", 8, (32, 32, 4), 2).model, [256] * 8)
  assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_torch_dit_s2_has_the_papers_parameter_count():
  torch_dit = pytest.importorskip("benchmarks.torch_dit")
  assert torch_dit.trainable_params(torch_dit.make_dit("S")) == 32_865_056 == torch_dit.DIT_S2_PARAMS
  model = torch_dit.make_dit("S")
  assert not model.pos_embed.requires_grad and "pos_embed" not in dict(model.named_parameters())


def test_jax_mirror_is_the_torch_model():
  torch = pytest.importorskip("torch")
  torch_dit = pytest.importorskip("benchmarks.torch_dit")
  for name, dims in torch_dit.VARIANTS.items():
    assert dit.VARIANTS[name] == dims  # compare_torch reads the sizes from src.models.dit
  abstract = nnx.eval_shape(lambda: compare_torch.MirrorDiT(**dit.VARIANTS["S"], rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 32_865_056
  np.testing.assert_array_equal(compare_torch.sincos_2d(64, 8), torch_dit.sincos_2d(64, 8))

  torch.manual_seed(0)
  reference = torch_dit.DiT(depth=2, width=64, heads=4, input_size=16)
  with torch.no_grad():  # random weights everywhere: zero-initialised layers would hide mistakes
    for p in reference.parameters():
      p.normal_(0.0, 0.1)
  mirror = nnx.eval_shape(lambda: compare_torch.MirrorDiT(depth=2, width=64, heads=4, input_size=16, rngs=nnx.Rngs(0)))
  compare_torch.load_torch_weights(mirror, {k: v.numpy() for k, v in reference.state_dict().items()})
  graphdef, params = nnx.split(mirror)
  x = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
  t, y = np.array([10.0, 700.0], np.float32), np.array([3, 1000])  # 1000: the null class
  with torch.no_grad():
    expected = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  got = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, x.transpose(0, 2, 3, 1), t, y)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-4, rtol=1e-4)


def test_paper_dit_flops_match_xla_cost_analysis():
  # depth 1: XLA counts the body of the mirror's layer scan once
  model = nnx.eval_shape(lambda: compare_torch.MirrorDiT(depth=1, width=64, heads=4, input_size=32, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x, t, y = jnp.zeros((2, 32, 32, 4)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
  xla = xla_flops(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y), params, x, t, y)
  assert compare_torch.paper_dit_flops(1, 64, 2, 256, 16, 32) == pytest.approx(3 * xla, rel=0.1)


def test_compare_summary_pairs_rounds():
  turns = {
      "torch_eager": [dict(step_s=4.0, matmul_s=0.5, cpu_per_wall=1.9), dict(step_s=9.0, matmul_s=0.5, cpu_per_wall=1.9)],
      "jax_mirror": [dict(step_s=1.0, matmul_s=0.2, cpu_per_wall=2.0), dict(step_s=3.0, matmul_s=0.2, cpu_per_wall=2.0)],
  }
  infos = {k: dict(params=1, flops=2 * 2048**3) for k in turns}
  *workers, summary = compare_torch.summarise(infos, turns, "S", 8, 2, dict(load_1m=0.0))
  assert summary["time_ratios"] == {"torch_eager/jax_mirror": 3.5}  # median of 4/1 and 9/3, not 6.5/2
  assert summary["mfu_jax_mirror"] == pytest.approx(0.2 / 2.0, abs=1e-4)
  assert [w["worker"] for w in workers] == ["torch_eager", "jax_mirror"]
