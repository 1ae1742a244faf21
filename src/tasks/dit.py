"""The spacetime DiT as a task: on packed latent tokens, or on pixels a frozen VAE
encodes inside the step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from src import frames, objectives, quality, wan
from src.batch import ClipBatch, Packing, PackedBatch, captions_as_ids
from src.captions import drop_captions, encode_captions, tokenizer_dir
from src.config import ConfigError
from src.data.clips import make_clip_iterator
from src.data.latents import cache_mismatch
from src.data.pipeline import make_iterator
from src.data.sources import clip_source
from src.generate import Sampler, Spec
from src.lora import LoRAParam
from src.models.dit import DiT
from src.models.layers import to_tokens
from src.models.patch import patchify
from src.models.vae import VideoVAE
from src.pretrained import load_vae
from src.state import Frozen, abstract_model, create_model, place_frozen
from src.tasks.base import Task
from src.tasks.text import abstract_text_frozen, check_text, text_frozen


LORA_DROPOUT_STREAM = 7  # folded into the step's key for the adapters' dropout


class DiTTask(Task):
  """The DiT on packed latent tokens: the data are the latents themselves, or a
  latent cache (`data.source=latents`). With a VAE (`vae.enabled`: the cache's, which
  decodes the samples) the data keys are pixels, as they were for `src.encode`, and
  the latent sizes follow from the VAE; without one the data are latents."""

  @property
  def scans_layers(self) -> bool:
    return self.cfg.model.scan_layers

  def check(self) -> None:
    d = self.cfg.data
    check_text(self.cfg)
    self._check_frames()
    if self.cfg.vae.enabled:  # a latent cache of the VAE: pixel sizes
      if d.seq_len <= 0:
        raise ConfigError("a latent cache with vae.enabled=true (pixel sizes) needs data.seq_len, the row length in "
                          "tokens.")
      self._check_pixels()
    else:
      self._check_latents(d.channels, (d.frames, d.height, d.width), (max(d.frame_counts or [d.frames]), d.area))
    if d.source == "latents" and d.data_dir:
      error = cache_mismatch(d.data_dir, self.cfg)
      if error:
        raise ConfigError(error + ".")

  def _check_pixels(self) -> None:
    """The data keys as pixel sizes the VAE encodes (the fixed shape only when data.area is 0)."""
    d, v = self.cfg.data, self.cfg.vae
    if d.channels != v.in_channels:
      raise ConfigError(f"data.channels={d.channels} but vae.in_channels={v.in_channels} (data sizes are pixels "
                        "with a VAE).")
    error = v.clip_error((d.frames, d.height, d.width)) if d.area <= 0 else None
    if error:
      raise ConfigError(f"data clip (data.frames, data.height, data.width): {error}.")
    _, fs = v.compression()
    bad = [f for f in d.frame_counts if v.clip_error((f, fs, fs))]
    if bad:
      raise ConfigError(f"data.frame_counts={list(d.frame_counts)}: {bad} cannot be encoded: "
                        f"{v.clip_error((bad[0], fs, fs))}.")
    largest = v.latent_shape((max(d.frame_counts or [d.frames]), 1, 1))[0], d.area // fs**2
    grid = v.latent_shape((d.frames, d.height, d.width)) if d.area <= 0 else tuple(self.cfg.model.patch)
    self._check_latents(v.z_dim, grid, largest)

  def size_error(self, shape) -> str | None:
    """Why a sample of (T, H, W) in the data's units (pixels with a VAE) cannot be made, naming the valid sizes."""
    (pt, ph, pw), t, h, w = self.cfg.model.patch, *shape
    if self.cfg.vae.enabled:
      ft, fs = self.cfg.vae.compression()
      if (t - 1) % ft or h % (fs * ph) or w % (fs * pw) or (1 + (t - 1) // ft) % pt or min(shape) < 1:
        return (f"{t} frames at {h}x{w} pixels (HxW): frames must be 1 + {ft}k (giving a multiple of {pt} latent "
                f"frames), the height a multiple of {fs * ph} and the width of {fs * pw} (VAE x patch)")
    elif t % pt or h % ph or w % pw or min(shape) < 1:
      return (f"a latent grid of {t} x {h} x {w} (frames x height x width): each must be a multiple of "
              f"model.patch={tuple(self.cfg.model.patch)}")
    return None

  def _check_frames(self) -> None:
    error = frames.check(self.cfg)
    if error:
      raise ConfigError(error + ".")

  def _check_latents(self, channels: int, grid, largest) -> None:
    """The latents the DiT gets: `channels` channels, a (t, h, w) `grid` for fixed
    shapes, `largest` = (frames, area) of the largest example for mixed shapes."""
    m, d = self.cfg.model, self.cfg.data
    if channels != m.in_channels:
      raise ConfigError(
          f"the DiT gets latents of {channels} channels (data.channels, or vae.z_dim with a VAE) "
          f"but model.in_channels={m.in_channels}.")
    if any(g % p for g, p in zip(grid, m.patch)):
      raise ConfigError(f"latent grid (frames, height, width)={tuple(grid)} is not divisible by "
                        f"model.patch={tuple(m.patch)}.")
    t, area = largest
    most = t * area // math.prod(m.patch)
    if d.area > 0 and most > d.seq_len:
      raise ConfigError(f"the largest example ({t} latent frames x {area} latent area = {most} tokens) does not "
                        f"fit data.seq_len={d.seq_len}.")

  def build_model(self, rngs: nnx.Rngs) -> DiT:
    return DiT(self.cfg.model, rngs=rngs, lora=self.cfg.lora)

  @property
  def trains_adapters(self) -> bool:
    return self.cfg.lora.rank > 0

  @property
  def trainable(self):
    return LoRAParam if self.trains_adapters else nnx.Param

  def pretrained_params(self, abstract: nnx.State) -> nnx.State | None:
    """model.init_from: Wan 2.1 weights (diffusers layout or our Orbax copy), each
    process reading only its devices' blocks; for a LoRA run they are the frozen base
    (`load_frozen`), and the adapters start fresh."""
    m = self.cfg.model
    return wan.load_params(m.init_from, abstract, m) if m.init_from and not self.trains_adapters else None

  def base(self, mesh, rules, abstract_only: bool = False):
    """A LoRA run's frozen base: the init_from weights (else the seed's random init),
    born sharded by the rules, stored in lora.base_dtype (or only its shapes)."""
    dtype = jnp.dtype(self.cfg.lora.base_dtype)
    _, abstract = abstract_model(self, mesh, rules, part=1)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), abstract)
    if abstract_only:
      return abstract
    m = self.cfg.model
    if m.init_from:
      return wan.load_params(m.init_from, abstract, m)
    base = create_model(self, mesh, rules, self.cfg.seed, part=1)[1]
    return jax.jit(lambda b: jax.tree.map(lambda x: x.astype(dtype), b), donate_argnums=0)(base)

  def batches(self, split: str = "train", process_index: int = 0, process_count: int = 1):
    c = self.cfg
    return make_iterator(c.data, c.model.patch, c.model.cond_dim, c.seed, process_index, process_count,
                         split=split, text_encoder=c.model.text_encoder, tokenizer=self.tokenizer())

  def batch_shapes(self, rows: int | None = None) -> PackedBatch:
    return PackedBatch.shapes(self.cfg, rows)

  def tokenizer(self) -> str:
    """The umT5 tokenizer's directory ("" without umT5 captions)."""
    return tokenizer_dir(self.cfg.text) if self.cfg.model.text_encoder == "umt5" else ""

  def load_frozen(self, mesh, rules) -> dict:
    frozen = text_frozen(self.cfg, mesh, rules)
    return {**frozen, "base": self.base(mesh, rules)} if self.trains_adapters else frozen

  def abstract_frozen(self, mesh, rules) -> dict:
    frozen = abstract_text_frozen(self.cfg, mesh, rules)
    return {**frozen, "base": self.base(mesh, rules, abstract_only=True)} if self.trains_adapters else frozen

  def to_tokens(self, batch, key: jax.Array, frozen: dict) -> PackedBatch:
    """The packed latent batch the DiT trains on, caption embeddings included: umT5 ids
    are encoded here, by the frozen encoder."""
    batch = self.to_latents(batch, key, frozen)
    p = batch.packing
    if self.cfg.model.text_encoder == "umt5" and captions_as_ids(self.cfg):
      p = p.replace(cond=encode_captions(frozen["text"], p.cond, self.cfg.data.text_len))
    return batch.replace(packing=p)

  def to_latents(self, batch, key: jax.Array, frozen: dict) -> PackedBatch:
    """The packed batch of latent tokens (here: the batch itself)."""
    del key, frozen
    return batch

  def loss(self, model: DiT, batch, rng: jax.Array, frozen: dict | None = None) -> jax.Array:
    return self._loss(model, batch, rng, frozen)

  def eval_levels(self) -> dict[str, float]:
    return {f"loss_t{t:g}": t for t in self.cfg.train.eval_times}

  def eval_loss(self, model, batch, level, key, frozen=None) -> jax.Array:
    return self._loss(model, batch, key, frozen, level)

  def _loss(self, model: DiT, batch, rng: jax.Array, frozen: dict | None, level=None) -> jax.Array:
    """The objective's loss. Training (`level` None) draws t [B, K] per example and
    drops conditions for CFG; validation puts every example at `level` (a fraction of
    the noise range) and drops nothing."""
    obj = self.cfg.objective
    k_time, k_noise, k_drop, k_vae = jax.random.split(rng, 4)
    batch = self.to_tokens(batch, k_vae, frozen or {})
    x0, p = batch.tokens, batch.packing
    rows, slots = p.grid.shape[:2]
    frame_ids = keep = None
    if level is None:
      t = objectives.sample_time(obj, k_time, (rows, slots), jnp.prod(p.grid, axis=-1))
      if frames.per_frame(self.cfg.conditioning):  # t [B, K, F]; keep: False on the given frames
        t, keep = frames.draw(self.cfg, jax.random.fold_in(k_time, 1), t, p.grid, self.frame_slots(),
                              jnp.prod(p.grid, axis=-1))
        frame_ids = p.positions[..., 0]
    else:
      t = objectives.fixed_time(obj, level, (rows, slots))
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t, target = objectives.noise_and_target(obj, x0, noise, t, p.segment_ids, frame_ids)
    if keep is not None:  # given frames at level 0 are exactly clean (diffusion's step 0 is not quite)
      exact = ~to_tokens(keep, p.segment_ids, frame_ids) & (to_tokens(t, p.segment_ids, frame_ids) == 0)
      x_t = jnp.where(exact[..., None], x0, x_t)
    drop = jax.random.uniform(k_drop, (rows, slots)) < (obj.cond_dropout if level is None else 0.0)
    if self.cfg.model.text_encoder == "umt5":  # a dropped caption is the empty prompt's, as in Wan
      p = p.replace(cond=drop_captions(p.cond, drop, frozen["null_text"]))
    # LoRA dropout (training only): a key of its own, so the other draws stay as they were.
    k_lora = jax.random.fold_in(rng, LORA_DROPOUT_STREAM) if level is None and self.cfg.lora.dropout > 0 else None
    pred = model(x_t, objectives.model_time(obj, t), p, drop, key=k_lora)
    return objectives.masked_loss(obj, pred, target, p.segment_ids, objectives.loss_weight(obj, t), frame_ids, keep)

  def frame_slots(self) -> int:
    """F: the most patch frames an example of the run has (the per-frame time table's width)."""
    d = self.cfg.data
    return self.latent_shape((max(d.frame_counts or [d.frames]), 1, 1))[0] // self.cfg.model.patch[0]

  def count_tokens(self, batch: PackedBatch) -> tuple[int, int]:
    seg = batch.packing.segment_ids
    return int((seg > 0).sum()), seg.size

  def sample_specs(self, count: int) -> list[Spec]:
    """What periodic samples show: the latent shapes, labels and captions of the first
    held-out examples, so they can be compared with real ones."""
    c = self.cfg
    source = clip_source(c.data, c.seed, spatial_multiple=self.pixel_multiple() * max(c.model.patch[1:]),
                         split="validation")
    specs = []
    for ex in (source[i] for i in range(len(source))):
      if len(specs) == count:
        break
      if "skip" not in ex:  # a latent cache's records are latents already
        shape = tuple(ex["video"].shape[:3])
        specs.append(Spec(shape if c.data.source == "latents" else self.latent_shape(shape),
                          ex["label"] if c.model.num_classes else -1, ex["caption"] if c.model.cond_dim else None))
    return specs

  def pixel_multiple(self) -> int:
    """Clip sides are multiples of this (times the patch): 1 for latents."""
    return 1

  def latent_shape(self, shape) -> tuple[int, int, int]:
    """The latent (T, H, W) of a clip of the config's (T, H, W): pixels with a VAE, else latents."""
    return self.cfg.vae.latent_shape(shape) if self.cfg.vae.enabled else tuple(shape)

  def sampling_frozen(self, mesh, rules) -> dict:
    """What sampling needs on the mesh: the frozen parts, and the VAE that decodes the
    latents to pixels when the run has one (replicated)."""
    return self.with_decoder(self.load_frozen(mesh, rules), mesh)

  def with_decoder(self, frozen: dict, mesh) -> dict:
    """`frozen` with the VAE that decodes samples to pixels when the run has one (a
    latent cache's run, `vae.enabled`, loads it here: its step never needs it)."""
    if self.cfg.vae.enabled and "vae" not in frozen:
      frozen = {**frozen, "vae": place_frozen(Frozen.of(load_vae(self.cfg.vae, self.cfg.seed)), mesh)}
    return frozen

  def make_sampler(self, graphdef, frozen: dict, count: int) -> Sampler:
    t = self.cfg.train
    return Sampler(graphdef, self.cfg, self.sample_specs(count), steps=t.sample_steps, guidance=t.sample_guidance,
                   frozen=frozen)


  def sample_quality(self, sampler: Sampler, videos: list) -> float | None:
    if self.cfg.data.source != "synthetic":
      return None
    return quality.pass_fraction(videos, [quality.Ask.of(s.label, s.caption) for s in sampler.specs])


class PixelDiTTask(DiTTask):
  """The DiT on fixed-shape pixel clips, encoded by the frozen VAE inside the jitted
  step; mixed shapes go through the latent cache (`src.encode`) instead."""

  def check(self) -> None:
    check_text(self.cfg)
    self._check_frames()
    self._check_pixels()

  def load_frozen(self, mesh, rules) -> dict:
    vae = place_frozen(Frozen.of(load_vae(self.cfg.vae, self.cfg.seed)), mesh)
    return {**super().load_frozen(mesh, rules), "vae": vae}

  def abstract_frozen(self, mesh, rules) -> dict:
    vae = Frozen(*nnx.split(nnx.eval_shape(lambda: VideoVAE(self.cfg.vae, rngs=nnx.Rngs(0)))))
    return {**super().abstract_frozen(mesh, rules), "vae": place_frozen(vae, mesh)}

  def batches(self, split: str = "train", process_index: int = 0, process_count: int = 1):
    c = self.cfg
    return make_clip_iterator(c.data, c.model.cond_dim, c.seed, process_index, process_count, split,
                              spatial_multiple=self.pixel_multiple(), text_encoder=c.model.text_encoder,
                              tokenizer=self.tokenizer())

  def batch_shapes(self, rows: int | None = None) -> ClipBatch:
    return ClipBatch.shapes(self.cfg, rows)

  def to_latents(self, batch: ClipBatch, key: jax.Array, frozen: dict) -> PackedBatch:
    """Pixel clips -> the packed batch of latent tokens (one example per row)."""
    vae = frozen["vae"].model()
    video = batch.video
    mean, logvar = vae.encode_chunked(video) if video.shape[1] > vae.chunk_frames + 1 else vae.encode(video)
    z = jax.lax.stop_gradient(vae.normalize(mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)))
    tokens = jax.vmap(lambda lat: patchify(lat, self.cfg.model.patch)[0])(z)  # [B, N, P]
    _, positions, grid = patchify(jnp.zeros(z.shape[1:]), self.cfg.model.patch)
    rows, n = tokens.shape[:2]
    packing = Packing(segment_ids=jnp.ones((rows, n), jnp.int32),
                      positions=jnp.broadcast_to(jnp.asarray(positions), (rows, n, 3)),
                      grid=jnp.broadcast_to(jnp.asarray(grid, jnp.int32), (rows, 1, 3)), labels=batch.labels,
                      cond=batch.cond, cond_segment_ids=batch.cond_segment_ids)
    return PackedBatch(tokens=tokens, packing=packing)

  def count_tokens(self, batch: ClipBatch) -> tuple[int, int]:
    t, h, w = self.latent_shape(batch.video.shape[1:4])
    n = batch.rows * t * h * w // math.prod(self.cfg.model.patch)
    return n, n

  def pixel_multiple(self) -> int:
    return self.cfg.vae.compression()[1]
