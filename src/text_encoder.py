"""The umT5 / T5 v1.1 text encoder in the Hugging Face layout: import and export.

The layout is what transformers' `UMT5EncoderModel` / `T5EncoderModel.save_pretrained`
writes: `config.json` + `model.safetensors`, or shards `model-0000x-of-0000y.safetensors`
listed by `model.safetensors.index.json`. A model root whose `text_encoder/` holds them
(the Wan 2.1 diffusers repositories) works too. Tensors map onto
`models.umt5.UMT5Encoder` through `src.weights`: torch Linear weights [out, in] are
transposed to our kernels, q/k/v/o split their fused heads axis, and the per-layer
tensors stack into the scanned layer axis. Reading needs no PyTorch, and each process
reads only the bytes its devices hold.

Tied embeddings: the encoder's token table is `encoder.embed_tokens.weight`, tied to
`shared.weight`. transformers (5.x) saves only `shared.weight`; older or other writers
may save both (the same values) or only the encoder's. The table is read from
`shared.weight` when present, else from `encoder.embed_tokens.weight`; a second copy
beside `shared.weight` is accepted once and not read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from src import mesh as mesh_lib
from src import weights
from src.models.umt5 import UMT5Config, UMT5Encoder

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"  # sharded: WEIGHTS + ".index.json" lists the shards
SUBFOLDER = "text_encoder"  # of a diffusers model root
EMBED = "shared.weight"
TIED_EMBED = "encoder.embed_tokens.weight"
# Sub-layer prefixes inside HF's `encoder.block.{i}`.
ATTENTION = "layer.0.SelfAttention"
FFN = "layer.1.DenseReluDense"


def _locate(path: str | Path) -> Path:
  """The directory holding config.json and the weights, or FileNotFoundError."""
  path = Path(path).absolute()
  if not (path / CONFIG).is_file() and (path / SUBFOLDER / CONFIG).is_file():
    path = path / SUBFOLDER
  if not (path / CONFIG).is_file():
    raise FileNotFoundError(f"{path}: no {CONFIG} of a text encoder (nor {SUBFOLDER}/{CONFIG}).")
  return path


def read_umt5_config(path: str | Path) -> UMT5Config:
  """The encoder's sizes from `path`'s config.json alone (no weights are opened)."""
  return UMT5Config.from_hf(json.loads((_locate(path) / CONFIG).read_text()))


def _layer_sources(cfg: UMT5Config, i: int) -> dict[tuple, weights.Source]:
  d, n, dh, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  name = lambda rest: f"encoder.block.{i}.{rest}"
  out = {
      ("attn_norm", "scale"): weights.tensor(name("layer.0.layer_norm.weight"), (d,)),
      **{("attn", p, "kernel"): weights.linear(name(f"{ATTENTION}.{p}.weight"), (d,), (n, dh)) for p in "qkv"},
      ("attn", "o", "kernel"): weights.linear(name(f"{ATTENTION}.o.weight"), (n, dh), (d,)),
      ("ffn_norm", "scale"): weights.tensor(name("layer.1.layer_norm.weight"), (d,)),
      ("wi_0", "kernel"): weights.linear(name(f"{FFN}.wi_0.weight"), (d,), (f,)),
      ("wi_1", "kernel"): weights.linear(name(f"{FFN}.wi_1.weight"), (d,), (f,)),
      ("wo", "kernel"): weights.linear(name(f"{FFN}.wo.weight"), (f,), (d,)),
  }
  if cfg.per_layer_bias:
    out[("rel_bias",)] = weights.tensor(name(f"{ATTENTION}.relative_attention_bias.weight"),
                                        (cfg.relative_attention_num_buckets, n))
  return out


def hf_sources(cfg: UMT5Config, embed: str = EMBED) -> dict[tuple, weights.Source]:
  """Our parameter path -> its Source in the HF layout (`embed`: the token table's name)."""
  layers = [_layer_sources(cfg, i) for i in range(cfg.num_layers)]
  sources = {("blocks",) + key: weights.stack([layer[key] for layer in layers]) for key in layers[0]}
  sources[("embed", "table")] = weights.tensor(embed, (cfg.vocab_size, cfg.d_model))
  if not cfg.per_layer_bias:  # T5 v1.1: layer 0's table, shared by every layer
    sources[("rel_bias",)] = weights.tensor(f"encoder.block.0.{ATTENTION}.relative_attention_bias.weight",
                                            (cfg.relative_attention_num_buckets, cfg.num_heads))
  sources[("final_norm", "scale")] = weights.tensor("encoder.final_layer_norm.weight", (cfg.d_model,))
  return sources


def abstract_umt5(cfg: UMT5Config, mesh=None, rules=None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, parameters as ShapeDtypeStructs with their shardings): by the rules
  table on `mesh` (default rules: mesh.DEFAULT_RULES), else on the first device."""
  return mesh_lib.abstract_module(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)), mesh, rules)


def _nested(flat: dict[tuple, object]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def load_pretrained_umt5(path: str | Path, *, dtype: str = "float32", mesh=None, rules=None) -> UMT5Encoder:
  """A UMT5Encoder holding the weights in `path` (HF layout, see the module docstring),
  computing in `dtype`. With a `mesh`, every parameter is born sharded by the rules
  table (`rules`, default mesh.DEFAULT_RULES) and each process reads only its devices'
  blocks; without one it lives on the first device. Raises FileNotFoundError for a
  missing directory or weights file, WeightsError for tensors that do not fit."""
  directory = _locate(path)
  cfg = dataclasses.replace(read_umt5_config(directory), dtype=dtype)
  graphdef, abstract = abstract_umt5(cfg, mesh, rules)
  targets = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
  with weights.Checkpoint(directory, WEIGHTS) as ckpt:
    embed = EMBED if EMBED in ckpt.shapes or TIED_EMBED not in ckpt.shapes else TIED_EMBED
    arrays = weights.load(ckpt, hf_sources(cfg, embed), targets, ignore={TIED_EMBED} - {embed})
  nnx.replace_by_pure_dict(abstract, _nested(arrays))
  log.info("loaded a %s text encoder from %s: %d layers, width %d, dtype %s", cfg.model_type, directory,
           cfg.num_layers, cfg.d_model, dtype)
  return nnx.merge(graphdef, abstract)


def save_pretrained_umt5(encoder: UMT5Encoder, cfg: UMT5Config, directory: str | Path) -> Path:
  """Write `encoder` in the HF layout (config.json + model.safetensors, float32), the
  exact inverse of `load_pretrained_umt5` and loadable by transformers. The arrays are
  gathered to this host: single-process use (tests, tiny CPU checkpoints)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  params = {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(encoder, nnx.Param))}
  save_file(weights.to_tensors(hf_sources(cfg), params), directory / WEIGHTS, metadata={"format": "pt"})
  (directory / CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
  return directory
