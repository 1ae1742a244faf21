"""The frozen umT5 text encoder of a DiT task (`model.text_encoder=umt5`): where its
weights and tokenizer are, its config check, and the frozen parts the step and the
sampler use: the encoder, sharded by the rules table like every parameter (umT5-XXL is
5.7B parameters: never replicated), and the empty prompt's embedding, the null caption.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from src import mesh as mesh_lib
from src.captions import encode_captions, tokenizer_dir
from src.config import Config, ConfigError
from src.data.sources import caption_ids
from src.state import Frozen
from src.text_encoder import abstract_umt5, load_pretrained_umt5, read_umt5_config

def check_text(cfg: Config) -> None:
  """umT5 captions need the checkpoint, and the DiT's caption width must be its width."""
  if cfg.model.text_encoder != "umt5":
    return
  if not cfg.text.checkpoint:
    raise ConfigError("model.text_encoder=umt5 needs text.checkpoint: a umT5 encoder in the Hugging Face layout "
                      "(e.g. the text_encoder/ folder of a Wan 2.1 diffusers repository).")
  try:
    width = read_umt5_config(cfg.text.checkpoint).d_model
  except FileNotFoundError as e:
    raise ConfigError(f"text.checkpoint={cfg.text.checkpoint}: {e}") from None
  if cfg.model.cond_dim != width:
    raise ConfigError(f"model.cond_dim={cfg.model.cond_dim} but the umT5 encoder of text.checkpoint is {width} wide: "
                      f"set model.cond_dim={width}.")


def text_frozen(cfg: Config, mesh, rules) -> dict:
  """{'text': the encoder, born sharded; 'null_text': the empty prompt's embedding [S, D],
  replicated}; empty without umT5 captions."""
  if cfg.model.text_encoder != "umt5":
    return {}
  text = Frozen.of(load_pretrained_umt5(cfg.text.checkpoint, dtype=cfg.text.dtype, mesh=mesh, rules=rules))
  empty = caption_ids("", cfg.data.text_len, tokenizer_dir(cfg.text))[None]  # [1, S]: EOS, then TEXT_PAD
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    null = jax.jit(encode_captions, static_argnums=2)(text, empty, cfg.data.text_len)[0]
  return {"text": text, "null_text": jax.device_put(null, mesh_lib.replicated(mesh))}


def abstract_text_frozen(cfg: Config, mesh, rules) -> dict:
  """`text_frozen` as shapes and shardings (an AOT compile reads no weights)."""
  if cfg.model.text_encoder != "umt5":
    return {}
  umt5 = dataclasses.replace(read_umt5_config(cfg.text.checkpoint), dtype=cfg.text.dtype)
  null = jax.ShapeDtypeStruct((cfg.data.text_len, umt5.d_model), np.float32, sharding=mesh_lib.replicated(mesh))
  return {"text": Frozen(*abstract_umt5(umt5, mesh, rules)), "null_text": null}
