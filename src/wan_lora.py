"""Wan LoRA adapters in the layout diffusers' Wan pipelines load, both ways.

diffusers (through peft) names an adapter of the module `blocks.0.attn1.to_q` as
`transformer.blocks.0.attn1.to_q.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r], with the update (alpha / r) B A and alpha = r unless the file says
otherwise. Our adapters (`src.lora`) live beside each adapted kernel as A [*in, r] and
B [r, *out], so their views derive from the kernel's in `src.wan.sources`: the same
reshapes, and the RoPE permutation of the self-attention q/k lands on B's out axis
as on the kernel's. The export folds our scale into B, so diffusers' default alpha
gives our update; `load_lora` reads any such file back (a tensor that adapts no module
is an error naming it) and `merge_lora` folds it into a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from src import lora as lora_lib
from src import wan, weights
from src.config import ModelConfig
from src.models.dit import DiT

log = logging.getLogger(__name__)

LORA_PREFIX = "transformer."  # what diffusers' Wan pipelines write and `load_lora_adapter` reads by default


def _adapter_views(kernel: weights.View, rank: int, name: str) -> tuple[weights.View, weights.View]:
  """The peft `lora_A` [r, in] and `lora_B` [out, r] views of a Linear kernel's view: A
  as our [*in, r], B as our [r, *out], with the kernel's own reshapes (the RoPE
  permutation of q/k lands on B's out axis as on the kernel's)."""
  if len(kernel.split) != 2:
    raise ValueError(f"a LoRA on {kernel.name} (not a Linear weight) has no diffusers layout: leave it out of "
                     "lora.targets to export")
  out_group, in_group = kernel.split
  n_out = len(out_group)  # the kernel's flat source dims: out first, then in
  in_part, out_part = [p for p in kernel.perm if p >= n_out], [p for p in kernel.perm if p < n_out]
  # A merged kernel view (the RoPE permutation) merges only out dims: one in-axis first.
  merge_a = None if kernel.merge is None else kernel.merge[:1] + (1,)
  merge_b = None if kernel.merge is None else (1,) + kernel.merge[1:]
  a = weights.View(f"{name}.lora_A.weight", ((rank,), in_group), tuple(p - n_out + 1 for p in in_part) + (0,), merge_a)
  b = weights.View(f"{name}.lora_B.weight", (out_group, (rank,)), (n_out,) + tuple(out_part), merge_b)
  return a, b


def lora_sources(m: ModelConfig, ranks: dict[tuple, int]) -> dict[tuple, weights.Source]:
  """Sources of the adapters of the layers in `ranks` (layer path -> rank), in the
  diffusers/peft layout: `transformer.<module>.lora_A.weight` / `.lora_B.weight`."""
  base, out = wan.sources(m), {}
  for layer, rank in ranks.items():
    kernel = base[layer + ("kernel",)]
    pairs = [_adapter_views(v, rank, LORA_PREFIX + v.name.removesuffix(".weight")) for v in kernel.views]
    out[layer + ("lora_a",)] = weights.Source(tuple(a for a, _ in pairs), kernel.stacked)
    out[layer + ("lora_b",)] = weights.Source(tuple(b for _, b in pairs), kernel.stacked)
  return out


def _ranks(adapters: dict[tuple, np.ndarray]) -> dict[tuple, int]:
  return {p[:-1]: a.shape[-1] for p, a in adapters.items() if p[-1] == "lora_a"}


def export_lora(adapters, m: ModelConfig, scale: float, dst: str | Path, dtype=np.float32) -> Path:
  """Write adapters (an nnx.State, or host arrays by path) as one safetensors file that
  diffusers' Wan pipelines load (`load_lora_weights`, `load_lora_adapter`): peft names
  under the diffusers module paths, the update's scale folded into B (so peft's
  default alpha = rank, a scale of 1, gives our update)."""
  arrays = adapters if isinstance(adapters, dict) else wan.host_params(adapters)
  arrays = {p: (a * scale if p[-1] == "lora_b" else a) for p, a in arrays.items() if lora_lib.is_adapter(p)}
  tensors = weights.to_tensors(lora_sources(m, _ranks(arrays)), arrays)
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: v.astype(dtype) for k, v in tensors.items()}, dst, metadata={"format": "pt"})
  log.info("wrote %d adapter tensors (rank %s) to %s", len(tensors), sorted(set(_ranks(arrays).values())), dst)
  return dst


def load_lora(path: str | Path, m: ModelConfig) -> dict[tuple, np.ndarray]:
  """Adapters from a diffusers/peft Wan LoRA file, in our layout by path (B holding the
  file's scale). A tensor that adapts no module of the model, or a layer with some
  blocks missing, is a WeightsError naming it."""
  path = Path(path)
  modules = {}  # diffusers module name -> our layer path
  for key, source in wan.sources(m).items():
    if key[-1] == "kernel":
      modules.update({v.name.removesuffix(".weight"): key[:-1] for v in source.views})
  with weights.Checkpoint(path.parent, path.name) as ckpt:
    ranks = {}
    for name, shape in ckpt.shapes.items():
      module = name.removeprefix(LORA_PREFIX).rsplit(".lora_", 1)[0]
      if not name.endswith((".lora_A.weight", ".lora_B.weight")) or module not in modules:
        raise weights.WeightsError(f"{path}: tensor '{name}' adapts no module of the model (expected "
                                   f"{LORA_PREFIX}<module>.lora_A.weight / .lora_B.weight, e.g. "
                                   f"{LORA_PREFIX}blocks.0.attn1.to_q.lora_A.weight).")
      if name.endswith(".lora_A.weight"):
        ranks[modules[module]] = shape[0]
    srcs = lora_sources(m, ranks)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {k: jax.ShapeDtypeStruct(src.shape, jnp.float32, sharding=device) for k, src in srcs.items()}
    return {k: np.asarray(v) for k, v in weights.load(ckpt, srcs, targets).items()}


def merge_lora(model: DiT, adapters: dict[tuple, np.ndarray], scale: float = 1.0) -> DiT:
  """`model` with W + scale A B in every adapted kernel (adapters as from `load_lora`)."""
  graphdef, state = nnx.split(model)
  merged = lora_lib.merged_kernels(wan.host_params(state), adapters, scale)
  nnx.replace_by_pure_dict(state, wan._nested({p: jnp.asarray(v) for p, v in merged.items()}))
  return nnx.merge(graphdef, state)
