"""Generation: noise packed like a batch, denoised by a sampler, decoded to videos.

`Sampler` compiles a generator for a fixed list of `Spec`s (latent shapes, labels,
captions of any sizes, packed into rows like training batches, so one call makes
them all); the trainer keeps one for its periodic samples, `src.sample` makes one per
command. The task's frozen parts, when given, decode the latents to pixels (the VAE)
and encode umT5 captions and the negative prompt (the text encoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from src import samplers
from src.state import merged
from src.captions import encode_captions, tokenizer_dir
from src.config import Config
from src.data.sources import caption_tokens
from src.models.layers import to_tokens
from src.models.patch import first_fit, pack_rows, patchify, unpack, unpatchify


@dataclass(frozen=True)
class Spec:
  """One sample to make: latent grid size, class label (-1: none), caption (None: none),
  and the latent frames it is given (image-to-video, continuation, keyframes: `src.frames`)."""

  shape: tuple[int, int, int]  # (T, H, W) of the latent video
  label: int = -1
  caption: str | None = None
  given: np.ndarray | None = None  # [T, H, W, C] latents: the frames `given_frames` name are held fixed
  given_frames: tuple[int, ...] = ()  # latent frame indices (patch frames: model.patch[0] = 1)

  def __post_init__(self):
    bad = [f for f in self.given_frames if not 0 <= f < self.shape[0]]
    if bad or (self.given_frames and (self.given is None or tuple(self.given.shape[:3]) != tuple(self.shape))):
      raise ValueError(f"a sample of latent shape {self.shape} cannot be given frames {list(self.given_frames)}"
                       f"{'' if self.given is None else f' of latents shaped {self.given.shape}'}.")


def pack_specs(cfg: Config, specs: list[Spec], seq_len: int | None = None, tokenizer: str = ""):
  """Placeholder examples for `specs` packed first-fit into rows (by default as long as
  the longest). Returns (batch, drop [R, K]: the slots that get the null condition, as
  no label and no caption were asked for, order: spec indices in row-major slot order)."""
  examples = []
  for spec in specs:
    video = np.zeros((*spec.shape, cfg.model.in_channels), np.float32)
    if spec.given_frames:  # the given frames are the tokens' values; the rest is replaced by noise
      idx = list(spec.given_frames)
      video[idx] = np.asarray(spec.given, np.float32)[idx]
    tokens, positions, grid = patchify(video, cfg.model.patch)
    ex = dict(tokens=tokens, positions=positions, grid=np.asarray(grid, np.int32), label=np.int32(spec.label))
    if cfg.model.cond_dim:
      ex["text"] = caption_tokens({"caption": spec.caption or ""}, cfg.data.text_len, cfg.model.cond_dim,
                                  cfg.model.text_encoder, tokenizer)
    examples.append(ex)
  seq_len = seq_len or max(len(e["tokens"]) for e in examples)
  rows = first_fit([len(e["tokens"]) for e in examples], seq_len, len(specs))
  batch = pack_rows(examples, seq_len, len(specs), rows=rows)
  drop = np.zeros(batch.packing.labels.shape, bool)
  used, slots = [0] * (max(rows) + 1), []
  for spec, r in zip(specs, rows):
    drop[r, used[r]] = spec.label < 0 and spec.caption is None
    slots.append((r, used[r]))
    used[r] += 1
  return batch, drop, sorted(range(len(specs)), key=lambda i: slots[i])


def given_slots(cfg: Config, specs: list[Spec], packed, order) -> np.ndarray | None:
  """[R, K, F] bool: the (example, frame) slots the specs are given (None: none is),
  F the most patch frames of any spec; `order` as `pack_specs` returns it."""
  if not any(s.given_frames for s in specs):
    return None
  if cfg.model.patch[0] != 1:
    raise ValueError(f"given frames need model.patch[0] = 1 (it is {cfg.model.patch[0]}).")
  rows, slots = packed.packing.labels.shape
  given = np.zeros((rows, slots, max(s.shape[0] for s in specs)), bool)
  occupied = np.argwhere(packed.packing.grid[..., 0] > 0)  # row-major, as `order` counts
  for (r, k), i in zip(occupied, order):
    given[r, k, list(specs[i].given_frames)] = True
  return given


class Sampler:
  """A compiled generator for a fixed list of specs: call it with parameters and a seed.
  The trainer keeps one for its periodic samples, so it compiles once.

  `frozen` holds what the task's step uses too: the VAE that decodes latents ('vae'),
  and for umT5 captions the encoder ('text') and the null caption. With umT5 captions,
  guidance's unconditional half is conditioned on `negative_prompt` (Wan's negative
  prompt; "" is the empty prompt, the null caption of training)."""

  def __init__(self, graphdef, cfg: Config, specs: list[Spec], *, steps: int, guidance: float = 1.0,
               method: str | None = None, frozen: dict | None = None, negative_prompt: str = ""):
    self.cfg, self.specs, self.frozen = cfg, specs, frozen or {}
    umt5 = cfg.model.text_encoder == "umt5"
    tokenizer = tokenizer_dir(cfg.text) if umt5 else ""
    self.packed, drop, self.order = pack_specs(cfg, specs, tokenizer=tokenizer)
    given = given_slots(cfg, specs, self.packed, self.order)  # [R, K, F] or None
    negatives = [dataclasses.replace(s, caption=negative_prompt) for s in specs]
    negative = pack_specs(cfg, negatives, tokenizer=tokenizer)[0] if umt5 else None
    rows, text_len = self.packed.rows, cfg.data.text_len

    def run(params, frozen, key):
      packings = [self.packed.packing] + ([negative.packing] if umt5 else [])
      packings = [jax.tree.map(jnp.asarray, p) for p in packings]
      if umt5:  # caption ids -> embeddings, as in the train step
        packings = [p.replace(cond=encode_captions(frozen["text"], p.cond, text_len)) for p in packings]

      clean = jnp.asarray(self.packed.tokens)  # the given frames' latents (zeros elsewhere)
      seg, frame_ids = packings[0].segment_ids, packings[0].positions[..., 0]
      held = None if given is None else to_tokens(jnp.asarray(given), seg, frame_ids)[..., None]  # [R, L, 1]

      def denoise(x, t, extra_drop):  # guidance calls it on [cond; null] = 2x the rows
        reps = x.shape[0] // rows
        halves = packings if reps == 2 and umt5 else [packings[0]] * reps
        p = jax.tree.map(lambda *a: jnp.concatenate(a), *halves)
        if given is not None:  # the model sees the given frames clean, at time 0, whatever the sampler holds
          x = jnp.where(jnp.concatenate([held] * reps), jnp.concatenate([clean] * reps), x)
          t = jnp.where(jnp.concatenate([jnp.asarray(given)] * reps), 0.0, t[..., None])  # [B, K, F]
        model = merged(graphdef, params, frozen)  # with a LoRA run's frozen base
        return model(x, t, p, extra_drop | jnp.concatenate([jnp.asarray(drop)] * reps))

      k_noise, k_sample = jax.random.split(key)
      noise = jax.random.normal(k_noise, self.packed.tokens.shape)
      num_tokens = jnp.prod(packings[0].grid, axis=-1)
      out = samplers.sample(denoise, cfg.objective, noise, seg, num_tokens, steps=steps, method=method,
                            guidance=guidance, key=k_sample)
      return out if given is None else jnp.where(held, clean, out)  # the given frames come out as they went in

    self._run = jax.jit(run)
    self._decode = jax.jit(lambda vae, z: (lambda m: m.decode_chunked(m.denormalize(z)))(vae.model()))

  def __call__(self, params, seed: int = 0) -> list[np.ndarray]:
    """Videos [T, H, W, C], in the order of the specs: decoded pixels with a VAE, else latents."""
    tokens = np.asarray(self._run(params, self.frozen, jax.random.key(seed)))
    videos = [None] * len(self.specs)
    for i, ex in zip(self.order, unpack(self.packed.replace(tokens=tokens))):  # unpack is row-major
      videos[i] = unpatchify(ex["tokens"], ex["grid"], self.cfg.model.patch, self.cfg.model.in_channels)
      if "vae" in self.frozen:  # the DiT works on normalised latents: denormalise, then decode
        videos[i] = np.asarray(self._decode(self.frozen["vae"], jnp.asarray(videos[i])[None]))[0]
    return videos


def generate(graphdef, params, cfg: Config, specs: list[Spec], *, steps: int, guidance: float = 1.0,
             method: str | None = None, seed: int = 0, frozen: dict | None = None,
             negative_prompt: str = "") -> list[np.ndarray]:
  """Videos [T, H, W, C] for `specs`, in order (several sizes in one call); decoded to
  pixels when `frozen` holds a VAE, else latents (see `Sampler`)."""
  return Sampler(graphdef, cfg, specs, steps=steps, guidance=guidance, method=method, frozen=frozen,
                 negative_prompt=negative_prompt)(params, seed)
