"""Wan 2.1 text-to-video generation, as diffusers' `WanPipeline` does it, on our models.

A diffusers Wan model root holds `transformer/` (`src.wan`), `vae/`
(`src.pretrained`), and `text_encoder/` + `tokenizer/` (umT5, `src.text_encoder`).
Generation: the prompt and the negative prompt become umT5 embeddings padded with zeros
to 512 tokens (`src.captions`); the initial noise [B, 16, 1 + (F-1)/4, H/8, W/8] is
denoised by flow matching with classifier-free guidance,
`uncond + g * (cond - uncond)`, the unconditional half conditioned on the negative
prompt; the sampler is UniPC (Wan's default) or the flow-match Euler grid
(`src.samplers`), both with Wan's constant `flow_shift`; the VAE decodes the
denormalised latents; frames come out in [0, 1] like the pipeline's `output_type="np"`.

Everything is in the diffusers layout ([B, C, T, H, W] latents, [B, L, D] embeddings),
so a parity check feeds both pipelines the same arrays. Inside, each video is one row
of the packed batch (`models.patch`); the text is attended in full, zeros included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from src import samplers, wan, wan_lora
from src.batch import Packing
from src.captions import encode_captions
from src.config import ObjectiveConfig
from src.data.sources import caption_ids
from src.models.dit import DiT
from src.models.patch import patchify
from src.models.vae import VideoVAE
from src.pretrained import load_pretrained_vae
from src.state import Frozen
from src.text_encoder import load_pretrained_umt5

log = logging.getLogger(__name__)

TEXT_LEN = 512  # WanPipeline's max_sequence_length: every caption is padded to it
DEFAULT_SHIFT = 3.0  # the diffusers Wan 2.1 scheduler configs' flow_shift (480p; 5.0 suits 720p)
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def to_tokens(latents: jax.Array, patch) -> jax.Array:
  """[B, C, T, H, W] -> [B, N, P], tokens t-major and values (pt, ph, pw, C) as `patchify`."""
  b, c, t, h, w = latents.shape
  pt, ph, pw = patch
  x = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
  return x.transpose(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, pt * ph * pw * c)


def from_tokens(tokens: jax.Array, shape, patch) -> jax.Array:
  """The inverse of `to_tokens`: [B, N, P] -> [B, C, T, H, W] of latent `shape` (C, T, H, W)."""
  c, t, h, w = shape
  pt, ph, pw = patch
  x = tokens.reshape(tokens.shape[0], t // pt, h // ph, w // pw, pt, ph, pw, c)
  return x.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, t, h, w)


def _packing(rows: int, latent_shape, text: jax.Array, patch) -> Packing:
  """One video a row of latent (T, H, W) `latent_shape`: every token segment 1, its
  text (all slots, zeros included) segment 1."""
  _, positions, grid = patchify(np.zeros((*latent_shape, 1), np.float32), patch)
  n, lc = len(positions), text.shape[1]
  return Packing(segment_ids=jnp.ones((rows, n), jnp.int32),
                 positions=jnp.broadcast_to(jnp.asarray(positions), (rows, n, 3)),
                 grid=jnp.broadcast_to(jnp.asarray(grid, jnp.int32), (rows, 1, 3)),
                 labels=jnp.full((rows, 1), -1, jnp.int32), cond=text, cond_segment_ids=jnp.ones((rows, lc), jnp.int32))


def denoise(model: DiT, latents, text, negative, *, steps: int, guidance: float, method: str,
            shift: float) -> jax.Array:
  """Initial noise [B, C, T, H, W] -> denoised latents, conditioned on text embeddings
  [B, L, D]; with guidance > 1 the unconditional half is conditioned on `negative`."""
  patch, shape, rows = model.cfg.patch, latents.shape[1:], latents.shape[0]
  halves = [_packing(rows, shape[1:], jnp.asarray(text, jnp.float32), patch),
            _packing(rows, shape[1:], jnp.asarray(negative, jnp.float32), patch)]

  def model_fn(x, t, drop):  # guidance calls it on [cond; uncond] rows
    del drop  # the unconditional half is the negative prompt's, not a dropped caption
    p = halves[0] if x.shape[0] == rows else jax.tree.map(lambda *a: jnp.concatenate(a), *halves)
    return model(x, t, p)

  seg = halves[0].segment_ids
  out = samplers.sample(model_fn, ObjectiveConfig(kind="flow", shift=shift), to_tokens(latents, patch), seg,
                        jnp.full((rows, 1), seg.shape[1], jnp.int32), steps=steps, method=method, guidance=guidance)
  return from_tokens(out, shape, patch)


def decode(vae: VideoVAE, latents: jax.Array) -> jax.Array:
  """Normalised latents [B, C, T, H, W] -> frames [B, F, H', W', 3] in [0, 1]."""
  z = vae.denormalize(jnp.transpose(latents, (0, 2, 3, 4, 1)))
  return (vae.decode_chunked(z) + 1.0) / 2.0


@dataclasses.dataclass
class WanPipeline:
  """The Wan 2.1 T2V pipeline on our models: `model` (the transformer), `vae`, and the
  umT5 `text` encoder with its `tokenizer` directory (None/"" without them: then give
  text embeddings)."""

  model: DiT
  vae: VideoVAE | None = None
  text: Frozen | None = None
  tokenizer: str = ""
  shift: float = DEFAULT_SHIFT

  @classmethod
  def from_pretrained(cls, root: str | Path, dtype: str = "float32", lora: str | Path | None = None,
                      lora_scale: float = 1.0) -> WanPipeline:
    """The parts of a diffusers Wan model root that exist (transformer/ is required);
    `lora`: a diffusers Wan LoRA file folded into the transformer at `lora_scale`."""
    root = Path(root)
    model = wan.load_pretrained_wan(root, dtype=dtype)
    if lora:
      model = wan_lora.merge_lora(model, wan_lora.load_lora(lora, model.cfg), lora_scale)
    vae = load_pretrained_vae(root / "vae")[0] if (root / "vae").is_dir() else None
    text = tokenizer = None
    if (root / "text_encoder").is_dir():
      text = Frozen.of(load_pretrained_umt5(root / "text_encoder", dtype=dtype))
      tokenizer = str(root / "tokenizer")
    shift = DEFAULT_SHIFT
    if (root / SCHEDULER_CONFIG).is_file():
      shift = float(json.loads((root / SCHEDULER_CONFIG).read_text()).get("flow_shift", DEFAULT_SHIFT))
    return cls(model, vae, text, tokenizer or "", shift)

  def encode_prompt(self, prompts: list[str]) -> jax.Array:
    """Prompts -> umT5 embeddings [B, 512, D], zero past each prompt's tokens (as Wan)."""
    if self.text is None:
      raise ValueError("this pipeline has no text encoder (no text_encoder/ in the model root): give text embeddings")
    ids = np.stack([caption_ids(p, TEXT_LEN, self.tokenizer) for p in prompts])
    return jax.jit(encode_captions, static_argnums=2)(self.text, jnp.asarray(ids), TEXT_LEN)

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latents of a video of `frames` frames at height x width pixels."""
    if self.vae is None:
      raise ValueError("this pipeline has no VAE (no vae/ in the model root)")
    error = self.vae.cfg.clip_error((frames, height, width))
    if error:
      raise ValueError(f"{error}; e.g. 81 frames at 832x480")
    return (self.model.cfg.in_channels, *self.vae.cfg.latent_shape((frames, height, width)))

  def __call__(self, latents, text, negative, *, steps: int = 50, guidance: float = 5.0, method: str = "unipc",
               shift: float | None = None, output: str = "np"):
    """Denoise `latents` (initial noise, [B, C, T, H, W]) with text embeddings `text` and
    `negative` ([B, L, D]); output "np": frames [B, F, H, W, 3] in [0, 1], "latent": latents."""
    out = _denoise(self.model, jnp.asarray(latents, jnp.float32), text, negative, steps=steps, guidance=guidance,
             method=method, shift=self.shift if shift is None else shift)
    if output == "latent":
      return np.asarray(out)
    if self.vae is None:
      raise ValueError("decoding needs a VAE (no vae/ in the model root); ask for output='latent'")
    return np.asarray(_decode(self.vae, out))


# Compiled once per model, shapes and settings (not once per call).
_denoise = nnx.jit(denoise, static_argnames=("steps", "guidance", "method", "shift"))
_decode = nnx.jit(decode)
