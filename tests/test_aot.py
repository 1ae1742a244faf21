"""src.aot: TPU topology names, collective counts, and real compiles for TPU
topologies on this CPU host through libtpu (skipped where libtpu is not installed)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src import aot, hlo

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
  hlo_text = """
  %custom-call.7 = bf16[2,128,128]{2,1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call", backend_config={}
  %custom-call.8 = f32[8]{0} custom-call(%c), custom_call_target="Sharding"
  """
  assert hlo.count_mosaic_kernels(hlo_text) == 1


HLO_LOOP = """
%all-reduce-scatter (input: f32[8,16]) -> f32[2,16] {
  %input = f32[8,16]{1,0:T(8,128)} parameter(0)
  %all-reduce.2 = f32[8,16]{1,0:T(8,128)} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[2,16]{1,0} dynamic-slice(%all-reduce.2, %c, %c), dynamic_slice_sizes={2,16}
}

%body (p: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %p = (s32[], f32[2,16]{1,0}) parameter(0)
  %w = f32[2,16]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[8,16]{1,0} all-gather(%w16), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
  %w16 = bf16[2,16]{1,0} convert(%w)
  %f = f32[8,16]{1,0} fusion(%ag), kind=kLoop, calls=%mul
  %rs = f32[2,16]{1,0} fusion(%f), kind=kCustom, calls=%all-reduce-scatter
  %a2a = bf16[4,4]{1,0} all-to-all(%x), replica_groups=mesh['a'=2,'b'=2] {'b'}, dimensions={0}
  %x = bf16[4,4]{1,0} constant({...})
}

%cond (p: (s32[], f32[2,16])) -> pred[] {
  %p = (s32[], f32[2,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: f32[2,16]) -> f32[2,16] {
  %w = f32[2,16]{1,0} parameter(0)
  %zero = s32[] constant(2)
  %start = s32[] copy(%zero)
  %t = (s32[], f32[2,16]{1,0}) tuple(%start, %w)
  %loop = (s32[], f32[2,16]{1,0}) while(%t), condition=%cond, body=%body
  %cp = f32[2,16]{1,0} collective-permute(%w), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %ar = f32[] all-reduce(%s), replica_groups={}, to_apply=%add
  %s = f32[] constant(0)
}
"""


def test_collective_bytes_of_hand_written_hlo():
  """Each kind's wire bytes per chip, a loop body counted once per trip (from 2 to 7: 5 trips),
  the fused all-reduce-scatter counted as the reduce-scatter it is, and every replica-group format."""
  found, unknown = hlo.collectives(HLO_LOOP, devices=4)
  by_name = {c.name: c for c in found}
  assert unknown == [] and set(by_name) == {"all-reduce.2", "ag", "a2a", "cp", "ar"}
  assert by_name["all-reduce.2"].kind == "reduce-scatter" and by_name["all-reduce.2"].times == 5
  assert by_name["all-reduce.2"].bytes_per_chip == 5 * 8 * 16 * 4 * 3 / 4  # the full gradient, less one shard
  assert by_name["ag"].group == 4 and by_name["ag"].bytes_per_chip == 5 * 2 * 16 * 2 * 3  # 3 other shards
  assert by_name["a2a"].group == 2 and by_name["a2a"].bytes_per_chip == 5 * 4 * 4 * 2 / 2
  assert by_name["cp"].times == 1 and by_name["cp"].bytes_per_chip == 2 * 16 * 4
  assert by_name["ar"].group == 4 and by_name["ar"].bytes_per_chip == 2 * 4 * 3 / 4  # replica_groups={}: all
  summary = hlo.summarise(found)
  assert summary["reduce-scatter"]["count"] == 5 and summary["all-reduce"]["count"] == 1


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['a'=2,'b'=2] {'a'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['a'=2,'b'=2] {'a','b'}", [[0, 1, 2, 3]]),
])
def test_replica_group_formats(text, groups):
  inst = hlo.Instruction("x", "f32[4]", "all-reduce", f"%y), {text}, to_apply=%add")
  assert hlo.group_size_and_groups(inst, 4) == (len(groups[0]), groups)


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
  # FSDP gathers parameters and reduces gradients: bytes a chip, next to the ideal for the sharding.
  c = r["collectives"]
  assert c["by_kind"]["all-gather"]["ici_gib"] > 0 and c["ideal_gib"]["all-gather"] > 0
  assert c["by_kind"]["all-gather"]["dcn_gib"] == 0 and c["loops_with_unknown_trip_count"] == []
  assert 0.5 < c["actual_over_ideal"] < 3
  # The exact model: as many parameters as the trainer would build.
  from src import config as C
  from src.models.dit import DiT
  from flax import nnx
  import jax
  model = nnx.eval_shape(lambda: DiT(C.load(None, TINY).model, rngs=nnx.Rngs(0)))
  assert r["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@needs_libtpu
@pytest.mark.parametrize("name", ["v6e-1", "v5e-1", "v6e-2"])
def test_single_chip_slices_have_their_devices(name):
  devices = aot.topology_devices(aot.parse_topology(name))
  assert len(devices) == aot.parse_topology(name).chips


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
  # fsdp-sharded weights are gathered for the matmuls, once: no gradients
  assert r["collectives"]["by_kind"]["all-gather"]["ici_gib"] > 0 and r["collectives"]["ideal_gib"]["all-gather"] > 0
  assert r["collectives"]["ideal_gib"]["reduce-scatter"] == 0


# --- Remat policies with host offload, sharding over `sequence`, XLA's cost analysis -----------

OFFLOAD_CHOICES = ["offload_dots_no_batch", "offload_inputs", "attention", "offload_attention"]
def one_clip_over(chips: int, side: int = 16) -> list[str]:
  """TINY as one clip of 2 x side x side latents split over `chips` sequence devices."""
  return TINY[:-1] + [f"data.height={side}", f"data.width={side}", "data.batch_size=1", "mesh.fsdp=1",
                      f"mesh.sequence={chips}"]


SEQ_RULE = "mesh.rules={embed: [fsdp, sequence]}"


@pytest.mark.parametrize("remat", OFFLOAD_CHOICES)
def test_offload_choices_are_table_entries_that_train_like_full_remat(remat):
  """Each new model.remat value builds its policy from the REMAT_POLICIES table and, on CPU (where
  pinned_host offload degrades to keeping the value), gives full remat's gradients, scanned or not."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from src import config as C
  from src.models.dit import DiT, remat_policy
  from src.tasks import make_task

  assert callable(remat_policy(remat))
  cfg = C.load(None, TINY + [f"model.remat={remat}"])
  batch = jax.tree.map(jnp.asarray, next(iter(make_task(cfg).batches())))
  t = jnp.full(batch.packing.labels.shape, 300.0)

  def grads(model_cfg):
    graphdef, params = nnx.split(DiT(model_cfg, rngs=nnx.Rngs(0)))
    return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(batch.tokens, t, batch.packing) ** 2)))(params)

  expect = grads(dataclasses.replace(cfg.model, remat="full"))
  for scan in (True, False):
    got = grads(dataclasses.replace(cfg.model, scan_layers=scan))
    for a, b in zip(jax.tree.leaves(expect), jax.tree.leaves(got)):
      assert float(jnp.abs(a - b).max()) <= 1e-6


def test_a_rule_shards_parameters_over_the_sequence_axis_too():
  """Default rules: every parameter is copied on each `sequence` device (reported); with
  'mesh.rules={embed: [fsdp, sequence]}' the embed axis is split over fsdp x sequence."""
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from src import config as C
  from src import mesh as M
  from src.state import abstract_model
  from src.tasks import make_task

  for overrides, spec, replicated in (([], P(None, "fsdp", "tensor"), ["sequence"]),
                                      ([SEQ_RULE], P(None, ("fsdp", "sequence"), "tensor"), [])):
    cfg = C.load(None, TINY + ["mesh.fsdp=2", "mesh.sequence=4", *overrides])
    mesh, rules = M.make_mesh(cfg.mesh), M.make_rules(cfg.mesh.rules)
    _, params = abstract_model(make_task(cfg), mesh, rules)
    fc1 = dict(nnx.to_flat_state(params))[("blocks", "fc1", "kernel")].get_value()
    assert fc1.sharding.spec == spec
    assert fc1.sharding.shard_shape(fc1.shape)[1] == fc1.shape[1] // (2 if replicated else 8)
    assert M.replicated_axes(mesh, params) == replicated


def test_an_out_of_memory_outside_hbm_is_named(monkeypatch, capsys):
  """The TPU compiler's own out-of-memory (here a kernel's scalar memory) is quoted, not reported as HBM."""
  error = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space smem."
  monkeypatch.setattr(aot, "compile_for_topology", lambda *a, **k: dict(topology="v5p-8", hbm_gib=95, fits=False,
                                                                         error=error))
  assert aot.main(["--topology", "v5p-8"]) == 1
  err = capsys.readouterr().err
  assert "does not fit on v5p-8: the TPU compiler ran out of memory: " + error in err and "HBM" not in err


@needs_libtpu
def test_cost_analysis_and_step_time_are_reported():
  """xla_cost: XLA's cost analysis of the compiled step; step_seconds: its optimal_seconds with every
  layer counted (2- and 3-layer unrolled compiles, extrapolated) plus the splash kernels it cannot cost."""
  result = run_aot("--topology", "v5p-8", "--step-time", *one_clip_over(4), SEQ_RULE, "model.remat=full")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  assert r["params_replicated_over"] == [] and r["remat"] == "full"
  cost, step = r["xla_cost"], r["step_seconds"]
  assert cost["optimal_seconds"] > 0 and cost["flops"] > 0 and cost["bytes_accessed"] > 0
  # The scanned body is costed once by XLA; six layers cost more than that.
  assert step["xla"] > cost["optimal_seconds"] and step["xla_flops_per_chip"] > cost["flops"]
  # Splash attention's FLOPs are the twin's count minus XLA's, timed at v5p's peak.
  assert step["kernel_flops_per_chip"] > 0
  assert step["kernels_at_peak"] == pytest.approx(step["kernel_flops_per_chip"] / 459e12)
  assert step["total"] == pytest.approx(step["xla"] + step["kernels_at_peak"])
  assert step["xla_flops_per_chip"] + step["kernel_flops_per_chip"] == pytest.approx(r["flops_per_chip"])
  # Model FLOPs leave out full remat's recomputed forward (3 forwards' worth of 4); the implied MFU
  # divides them by the estimate at v5p's peak; the roofline bounds are XLA's FLOPs and bytes.
  assert 0.6 < r["model_flops_per_step"] / r["flops_per_step"] < 0.85
  assert step["mfu"] == pytest.approx(r["model_flops_per_step"] / r["chips"] / step["total"] / 459e12)
  assert step["xla_compute_bound"] == pytest.approx(step["xla_flops_per_chip"] / 459e12)
  assert step["xla_memory_bound"] > 0


@needs_libtpu
def test_the_tpu_compile_uses_the_attention_and_offload_policies():
  """remat=attention keeps splash's forward results, so the backward recomputes no forward kernel
  (fewer Mosaic kernels than full remat); offload_attention moves them and the layer inputs to host
  memory (host temporaries); both count fewer FLOPs, the attention not recomputed."""
  runs = {remat: report(run_aot("--topology", "v5p-8", *one_clip_over(4, 32), SEQ_RULE, f"model.remat={remat}"))
          for remat in ("full", "attention", "offload_attention")}
  full, keep, offload = runs["full"], runs["attention"], runs["offload_attention"]
  assert keep["mosaic_kernels"] < full["mosaic_kernels"] and keep["flops_per_step"] < full["flops_per_step"]
  assert full["host_temp_gib"] == keep["host_temp_gib"] == 0 < offload["host_temp_gib"]
  assert offload["flops_per_step"] == pytest.approx(keep["flops_per_step"], rel=0.01)  # XLA fuses a little otherwise


# --- Collective bytes of real TPU programs (compiled here, for a v5p topology) ---------------

def fsdp_matmul_programs(steps: int):
  """A float32 weight [1024, 2048] split over 4 v5p chips (FSDP), used in bfloat16 on a batch split
  the same way; `steps` SGD steps, scanned and unrolled: (scanned HLO, unrolled HLO)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(aot.topology_devices(aot.parse_topology("v5p-8")), ("fsdp",))
  w = jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  x = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))

  def sgd(w, x):
    loss = lambda w: jnp.sum(jnp.tanh(x @ w.astype(jnp.bfloat16).astype(jnp.float32)) ** 2)
    return w - 0.1 * jax.grad(loss)(w)

  def scanned(w, x):
    return jax.lax.scan(lambda w, _: (sgd(w, x), None), w, None, length=steps)[0]

  def unrolled(w, x):
    for _ in range(steps):
      w = sgd(w, x)
    return w

  return [jax.jit(f, out_shardings=w.sharding).lower(w, x).compile().as_text() for f in (scanned, unrolled)]


@needs_libtpu
def test_collective_bytes_of_an_fsdp_matmul_on_v5p_and_of_its_loop():
  """One step: all-gather the bf16 weight (each chip receives the 3 shards it lacks) and
  reduce-scatter the float32 gradient (TPU's fused all-reduce-scatter, no all-reduce left);
  5 steps in a scan move exactly what 5 unrolled steps move."""
  one = hlo.summarise(hlo.collectives(fsdp_matmul_programs(1)[1], devices=4)[0])
  assert one["all-gather"] == dict(count=1, ici_bytes=1024 * 2048 * 2 * 3 / 4, dcn_bytes=0)
  assert one["reduce-scatter"] == dict(count=1, ici_bytes=1024 * 2048 * 4 * 3 / 4, dcn_bytes=0)
  assert one["all-reduce"]["count"] == one["all-to-all"]["count"] == one["collective-permute"]["count"] == 0
  scanned, unrolled = fsdp_matmul_programs(5)
  assert " while(" in scanned and " while(" not in unrolled
  found, unknown = hlo.collectives(scanned, devices=4)
  assert unknown == [] and hlo.summarise(found) == hlo.summarise(hlo.collectives(unrolled, devices=4)[0])
  assert hlo.summarise(found)["all-gather"]["count"] == 5


def test_the_ideal_volume_of_fsdp_and_data_parallel_parameters():
  """A [1024, 2048] parameter split 4 ways over fsdp, replicated over 2 data devices, in bf16:
  gathered twice (forward, backward), its gradient reduce-scattered over fsdp and the shard
  all-reduced over data; a frozen copy is only gathered; Ulysses over 4 sequence devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from src import comms

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  w = {"w": jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))}
  shape = {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
  shard = 1024 * 2048 / 4 * 2
  assert comms.parameter_ideal(w, shape, 2, trained=True, gathers=2) == {
      "all-gather": 2 * shard * 3, "reduce-scatter": shard * 3, "all-reduce": 2 * shard * 1 / 2}
  assert comms.parameter_ideal(w, shape, 2, trained=False, gathers=1) == {
      "all-gather": shard * 3, "reduce-scatter": 0, "all-reduce": 0}
  # 6 all-to-alls (q, k, v, out; cross-attention's q, out) a layer, 3 passes with remat
  assert comms.ulysses_ideal(1000, 64, 2, 2, 4, remat=True) == 2 * 3 * 6 * 1000 * 64 * 2 * 3 / 4
  assert comms.ulysses_ideal(1000, 64, 2, 2, 1, remat=True) == 0


@needs_libtpu
def test_ring_attention_compiles_for_tpu_and_the_step_is_saved(tmp_path):
  """Ring context parallelism in the TPU program: its collective-permutes move what src.comms
  says (the compiler hoists the segment ids' hops out of the layer loop: a little less), and
  --save-compiled writes the executable with what it was compiled for."""
  from src import executables

  out = tmp_path / "compiled"
  result = run_aot("--topology", "v5p-8", *TINY, "mesh.fsdp=1", "mesh.sequence=4", "model.context_parallel=ring",
                   "data.batch_size=1", "--save-compiled", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  permute = r["collectives"]["by_kind"]["collective-permute"]["ici_gib"]
  # At this tiny size the compiler keeps the forward's rotated k/v for the backward instead of
  # passing them again (one pass of hops fewer: 0.66 of the ideal, measured); at Wan 14B's
  # size it does not (docs/pod.md, "The one-minute clip").
  assert 0.5 * r["collectives"]["ideal_gib"]["collective-permute"] <= permute
  assert permute <= r["collectives"]["ideal_gib"]["collective-permute"]
  assert r["collectives"]["by_kind"]["all-to-all"]["ici_gib"] == 0  # no Ulysses regroup
  meta = executables.read_meta(r["saved_to"])
  assert meta["topology"] == "v5p-8" and meta["mesh"]["sequence"] == 4 and meta["bytes"] > 0
  assert meta["config"]["model"]["context_parallel"] == "ring"


@needs_libtpu
def test_the_block_skipping_kernel_compiles_into_the_tpu_step():
  """model.attention=flash in a v5p program: its three Mosaic kernels (forward, dk/dv, dq) are
  compiled into the step, for self- and cross-attention of a packed row (configs/smoke.yaml);
  remat=attention keeps the forward kernel's results, so the backward does not run it again."""
  import re

  from src import config, mesh as mesh_lib
  from src.tasks import make_task

  def kernels(remat: str) -> dict[str, int]:
    cfg = config.load(ROOT / "configs/smoke.yaml", ["model.attention=flash", f"model.remat={remat}", "mesh.fsdp=4"])
    mesh = mesh_lib.make_mesh(cfg.mesh, aot.topology_devices(aot.parse_topology("v5p-8")))
    lowered, _, _ = aot.lower_step(make_task(cfg), mesh, mesh_lib.make_rules(cfg.mesh.rules))
    text = lowered.compile().as_text()
    calls = [re.match(r"\s*%([a-z_]+)", line)[1] for line in text.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]  # instructions take the kernel's name
    return {name: calls.count(name) for name in ("packed_flash_fwd_residuals", "packed_flash_dkv", "packed_flash_dq")}

  full, keep = kernels("full"), kernels("attention")
  assert all(n >= 2 for n in full.values()), full  # self- and cross-attention, each direction
  assert keep["packed_flash_dkv"] == full["packed_flash_dkv"] and keep["packed_flash_dq"] == full["packed_flash_dq"]
  assert keep["packed_flash_fwd_residuals"] < full["packed_flash_fwd_residuals"]


@needs_libtpu
def test_remat_search_takes_the_first_policy_that_fits(monkeypatch):
  """benchmarks.remat_search compiles policies in order and stops at the first that fits: with no
  HBM nothing does; with HBM between full remat's need and no remat's, full remat is chosen."""
  from benchmarks import remat_search
  from src import config

  cfg = config.load(None, TINY[:1] + ["model.depth=2", "data.height=16", "data.width=16", "mesh.fsdp=8"] + TINY[4:])
  topo = aot.parse_topology("v5e-8")
  monkeypatch.setitem(aot.HBM_GIB, "v5e", 0)
  nothing = remat_search.search(cfg, topo, ("none", "full"))
  assert nothing["remat"] is None and list(nothing["tried"]) == ["none", "full"]
  none, full = nothing["tried"]["none"], nothing["tried"]["full"]
  assert full < none  # full remat keeps less
  monkeypatch.setitem(aot.HBM_GIB, "v5e", (none + full) / 2)
  chosen = remat_search.search(cfg, topo, ("none", "full"))
  assert chosen["remat"] == "full" and chosen["report"]["remat"] == "full" and chosen["tried"]["none"] == none


@needs_libtpu
def test_ring_attention_with_the_block_skipping_kernel_compiles_for_tpu():
  """model.context_parallel=ring with model.attention=flash: each hop's tiles are the Pallas kernel
  (Mosaic in the v5p program), and the key/value slices still travel unpadded, at the ideal bytes."""
  result = run_aot("--topology", "v5p-8", *TINY, "mesh.fsdp=1", "mesh.sequence=4", "model.context_parallel=ring",
                   "data.batch_size=1", "model.attention=flash")
  assert result.returncode == 0, result.stderr[-3000:]
  r = report(result)
  assert r["attention"] == "flash" and r["mosaic_kernels"] > 0
  permute = r["collectives"]["by_kind"]["collective-permute"]["ici_gib"]
  assert 0.5 * r["collectives"]["ideal_gib"]["collective-permute"] <= permute
  assert permute <= r["collectives"]["ideal_gib"]["collective-permute"]


def test_step_time_is_refused_when_three_layers_cost_less_than_two(monkeypatch, caplog):
  """The step estimate extrapolates the 2- and 3-layer programs to the depth; when the compiler
  prices 3 layers below 2, or a program below zero, there is no slope, and the report says so
  instead of a negative time."""
  import types

  from src import config
  from src.tasks import make_task

  task = make_task(config.load(None, TINY + ["model.scan_layers=true"]))
  seconds = iter([2.0, 1.5])
  monkeypatch.setattr(aot, "lower_step", lambda *a: (types.SimpleNamespace(compile=lambda: None), None, None))
  monkeypatch.setattr(aot, "xla_cost", lambda compiled: {"optimal_seconds": next(seconds), "flops": 1e9})
  step = aot.step_seconds(task, None, None, None, aot.parse_topology("v5p-8"), 1e12, 1e12)
  assert step["total"] is None and step["unrolled_optimal_seconds"] == [2.0, 1.5]
  assert "no estimate" in caplog.text
  seconds = iter([-3.0, -1.0])  # negative estimates (seen with host offload on v5e-16)
  assert aot.step_seconds(task, None, None, None, aot.parse_topology("v5p-8"), 1e12, 1e12)["total"] is None
  seconds = iter([2.0, 2.5])  # a slope: 2 + 4 x 0.5 at depth 6, plus the kernels' FLOPs at peak
  step = aot.step_seconds(task, None, None, None, aot.parse_topology("v5p-8"), 1e12, 1e12)
  assert step["xla"] == 4.0 and step["total"] == 4.0 + (1e12 - 1e9) / 459e12


@needs_libtpu
def test_the_tpu_compiler_all_reduces_a_flat_reduce_scatter_but_not_one_per_torus_dimension():
  """What docs/pod.md section 3 reports: on 8 v5p chips (2x2x2) the FSDP gradient's reduce-scatter,
  as a sharding constraint or as an explicit psum_scatter, compiles to about twice the ideal bytes
  (permutes, or an all-reduce and a slice); one scatter per torus dimension stays at the ideal."""
  from benchmarks import reduce_scatter as rs

  forms = {f["form"]: f for f in rs.compile_forms("v5p-16", 1024, 1024)}
  assert forms["auto"]["actual_over_ideal"] > 1.9 and forms["flat"]["actual_over_ideal"] > 1.9
  assert "all-reduce" in forms["flat"]["collectives"]
  assert set(forms["torus"]["collectives"]) == {"reduce-scatter"}
  assert forms["torus"]["collectives"]["reduce-scatter"]["count"] == 3
  assert forms["torus"]["actual_over_ideal"] == pytest.approx(1.0, abs=0.01)
