"""Spacetime Diffusion Transformer over packed sequences of video patches.

Dimensions: B rows, L tokens per row, K examples per row (segments), P patch values,
D width, N heads, Dh head dim, F MLP width, Lc conditioning tokens, Dc their width.

Follows DiT (Peebles & Xie 2023: adaLN-Zero, zero-initialised output) with the block
layout of the Wan 2.1 transformer (one shared time projection to six modulation
vectors plus a learned per-block table; qk RMSNorm over all heads; cross-attention to
text after self-attention) so that its pretrained weights map onto this module, and
3D RoPE over (t, h, w) patch coordinates. Every per-example quantity (timestep,
label, caption dropout) is computed per segment and gathered to tokens, so a packed
row of several examples gives each the output it would get alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax._src.interpreters import partial_eval as pe  # Saveable / Offloadable: what a remat policy returns
from jax.ad_checkpoint import checkpoint_name

from src.batch import Packing
from src import fsdp, lora as lora_lib
from src.config import REMAT_POLICIES, VARIANTS, LoRAConfig, ModelConfig
from src.mesh import constrain
from src.models.attention import Mask, Rope, attend, make_mask, rope_angles
from src.models.text import ByteTextEncoder
from src.models.layers import Dense, Embed, LayerNorm, RMSNorm, gather_to_tokens, layer_norm, param, to_tokens, zeros

MAX_PERIOD = 10000.0  # sinusoidal timestep features
NUM_MODULATIONS = 6  # shift, scale, gate for attention and for the MLP


NO_LORA = (0, 1.0, 0.0)  # a Dense without an adapter (rank 0)


def split_key(key: jax.Array | None, n: int) -> list:
  """n keys from `key`, or n Nones (no dropout)."""
  return [None] * n if key is None else list(jax.random.split(key, n))


def adapter(lora: LoRAConfig | None, path: str) -> tuple[int, float, float]:
  """(rank, scale, dropout) of the LoRA on the layer at dotted `path` (`src.lora`)."""
  rank = lora_lib.rank_for(lora, path) if lora is not None else 0
  return (rank, lora_lib.scale(lora), lora.dropout) if rank else NO_LORA


def dimensions(cfg: ModelConfig) -> tuple[int, int, int]:
  """(depth, width, heads): the variant's, with any explicit overrides."""
  v = VARIANTS[cfg.variant]
  depth, width, heads = (cfg.depth or v["depth"]), (cfg.width or v["width"]), (cfg.heads or v["heads"])
  if width % heads or (width // heads) % 2:
    raise ValueError(f"model width {width} must split into {heads} heads of even size.")
  return depth, width, heads


def mlp_width(cfg: ModelConfig) -> int:
  """The MLP's hidden width: model.mlp_dim, else the variant's, else width * mlp_ratio."""
  width = dimensions(cfg)[1]
  return cfg.mlp_dim or VARIANTS[cfg.variant].get("mlp") or round(width * cfg.mlp_ratio)


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features of (float) timesteps [...] -> [..., dim], cos then sin."""
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


@struct.dataclass
class Context:
  """Per-batch values every block reads: masks and RoPE tables built once."""

  self_mask: Mask
  rope: Rope
  segment_ids: jax.Array  # [B, L]
  cond: jax.Array | None = None  # [B, Lc, D]
  cross_mask: Mask | None = None
  lora_key: jax.Array | None = None  # the adapters' dropout in training; None: none
  frame_ids: jax.Array | None = None  # [B, L] patch frame of each token, with per-frame time; None: per example

  def to_tokens(self, per_slot: jax.Array) -> jax.Array:
    """[B, K, D] per example, or [B, K, F, D] per (example, frame) -> [B, L, D].
    Modulation stays per slot until each block uses it: per token it would be a
    [B, L, 6, D] tensor whose gradient is summed over layers."""
    return to_tokens(per_slot, self.segment_ids, self.frame_ids)


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v projections and qk RMSNorm over all heads.
  `adapt(name)` gives each projection's LoRA (rank, scale, dropout) by its name."""

  def __init__(self, width: int, heads: int, cfg: ModelConfig, *, rngs: nnx.Rngs, zero_out: bool = False,
               adapt=lambda name: NO_LORA):
    dt, hd = jnp.dtype(cfg.dtype), width // heads
    proj = lambda n: Dense((width,), (heads, hd), ("embed", "heads", "head_dim"), rngs=rngs, dtype=dt, lora=adapt(n))
    self.q, self.k, self.v = proj("q"), proj("k"), proj("v")
    self.norm_q = RMSNorm((heads, hd), ("heads", "head_dim"), eps=cfg.norm_eps, rngs=rngs)
    self.norm_k = RMSNorm((heads, hd), ("heads", "head_dim"), eps=cfg.norm_eps, rngs=rngs)
    self.out = Dense((heads, hd), (width,), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dt, zero_init=zero_out,
                     lora=adapt("out"))

  def __call__(self, x: jax.Array, mask: Mask, rope: Rope | None = None, context: jax.Array | None = None,
               key: jax.Array | None = None):
    kv = x if context is None else context
    kq, kk, kv_, ko = split_key(key, 4)
    q, k, v = self.norm_q(self.q(x, kq)), self.norm_k(self.k(kv, kk)), self.v(kv, kv_)  # [B, L, N, Dh]
    if rope is not None:
      q, k = rope(q), rope(k)
    # Context parallelism: tokens arrive split over `sequence`. Ulysses regroups them by
    # head (an all-to-all) so every device sees whole rows; ring/usp keep them split.
    q_layout, kv_layout = mask.layouts()
    q, k, v = constrain(q, q_layout), constrain(k, kv_layout), constrain(v, kv_layout)
    return self.out(constrain(attend(q, k, v, mask), q_layout), ko)  # [B, L, D]


class Block(nnx.Module):
  """adaLN-Zero block: gated self-attention, ungated cross-attention, gated MLP."""

  def __init__(self, cfg: ModelConfig, width: int, heads: int, *, rngs: nnx.Rngs, adapt=lambda path: NO_LORA):
    dt, hidden = jnp.dtype(cfg.dtype), mlp_width(cfg)
    self.modulation = param(rngs, zeros, (NUM_MODULATIONS, width), ("modulation", "embed"))
    self.attn = Attention(width, heads, cfg, rngs=rngs, adapt=lambda n: adapt(f"blocks.attn.{n}"))
    if cfg.cond_dim:
      self.cross_norm = LayerNorm(width, ("embed",), eps=cfg.norm_eps, rngs=rngs)
      # Zero-initialised output: every block starts as the identity (PixArt-style).
      self.cross = Attention(width, heads, cfg, rngs=rngs, zero_out=True, adapt=lambda n: adapt(f"blocks.cross.{n}"))
    self.fc1 = Dense((width,), (hidden,), ("embed", "mlp"), rngs=rngs, dtype=dt, lora=adapt("blocks.fc1"))
    self.fc2 = Dense((hidden,), (width,), ("mlp", "embed"), rngs=rngs, dtype=dt, lora=adapt("blocks.fc2"))
    self.eps = cfg.norm_eps

  def __call__(self, x: jax.Array, e: jax.Array, ctx: Context, key: jax.Array | None = None) -> jax.Array:
    """`key`: this layer's LoRA dropout key (None: none)."""
    x = checkpoint_name(x, "block_in")  # the layer input, for remat policies that offload it
    mod = (e + self.modulation[...]).astype(x.dtype)  # [B, K, (F,) 6, D]: per example or frame, tiny
    shift1, scale1, gate1, shift2, scale2, gate2 = (ctx.to_tokens(mod[..., i, :]) for i in range(NUM_MODULATIONS))
    k_attn, k_cross, k_fc1, k_fc2 = split_key(key, 4)
    x = x + gate1 * self.attn(modulate(layer_norm(x, self.eps), shift1, scale1), ctx.self_mask, ctx.rope, key=k_attn)
    if ctx.cond is not None:
      x = x + self.cross(self.cross_norm(x), ctx.cross_mask, context=ctx.cond, key=k_cross)
    h = self.fc1(modulate(layer_norm(x, self.eps), shift2, scale2), k_fc1)  # [B, L, F]
    x = x + gate2 * self.fc2(jax.nn.gelu(constrain(h, ("act_batch", "act_seq", "act_mlp")), approximate=True), k_fc2)
    return constrain(x, ("act_batch", "act_seq", "act_embed"))


class DiT(nnx.Module):
  """Packed-batch DiT: (noisy tokens, per-example or per-frame time, batch) -> prediction [B, L, P]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
    depth, width, heads = dimensions(cfg)
    patch_dim = math.prod(cfg.patch) * cfg.in_channels
    dt = jnp.dtype(cfg.dtype)
    self.cfg, self.depth, self.head_dim = cfg, depth, width // heads
    adapt = lambda path: adapter(lora, path)
    self.patch_embed = Dense((patch_dim,), (width,), ("patch", "embed"), rngs=rngs, dtype=dt)
    self.time_in = Dense((cfg.freq_dim,), (width,), ("freq", "embed"), rngs=rngs, lora=adapt("time_in"))
    self.time_out = Dense((width,), (width,), ("mlp", "embed"), rngs=rngs, lora=adapt("time_out"))
    self.time_proj = Dense((width,), (NUM_MODULATIONS, width), ("embed", "modulation", "mlp"), rngs=rngs, zero_init=True,
                           lora=adapt("time_proj"))
    if cfg.num_classes:  # the last row is the null class of classifier-free guidance
      self.class_embed = Embed(cfg.num_classes + 1, width, ("classes", "embed"), rngs=rngs)
    if cfg.cond_dim:
      if cfg.text_encoder == "bytes":
        self.text_encoder = ByteTextEncoder(cfg.cond_dim, cfg.text_depth, rngs=rngs, eps=cfg.norm_eps)
      if cfg.text_encoder != "umt5":  # umT5's null caption is the empty prompt's embedding, given as data
        self.null_cond = param(rngs, zeros, (cfg.cond_dim,), ("cond_embed",))
      self.cond_in = Dense((cfg.cond_dim,), (width,), ("cond_embed", "embed"), rngs=rngs, dtype=dt, lora=adapt("cond_in"))
      self.cond_out = Dense((width,), (width,), ("mlp", "embed"), rngs=rngs, dtype=dt, lora=adapt("cond_out"))

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(cfg, width, heads, rngs=rngs, adapt=adapt)

    self.blocks = stack(rngs)
    self.head_modulation = param(rngs, zeros, (2, width), ("modulation", "embed"))
    self.head = Dense((width,), (patch_dim,), ("embed", "patch"), rngs=rngs, zero_init=True)

  def __call__(self, tokens: jax.Array, time: jax.Array, packing: Packing, drop: jax.Array | None = None,
               key: jax.Array | None = None) -> jax.Array:
    with fsdp.reduction(self.cfg.gradient_reduce):  # how the Dense kernels' gradients are reduced
      return self.forward(tokens, time, packing, drop, key)

  def forward(self, tokens: jax.Array, time: jax.Array, packing: Packing, drop: jax.Array | None = None,
              key: jax.Array | None = None) -> jax.Array:
    """tokens [B, L, P] noisy latents; time [B, K] model timesteps per example, or
    [B, K, F] per (example, patch frame) (`src.frames`: conditioning frames at time 0;
    frames at or past F - 1 read slot F - 1); packing: where the tokens sit and their
    examples' conditions (never the clean tokens); drop [B, K] bool: replace that
    example's label and caption by the null ones (CFG; a umT5 caption arrives already
    replaced, by the empty prompt's embedding); key: LoRA dropout (training only)."""
    frame_ids = packing.positions[..., 0] if time.ndim == 3 else None
    k_time, k_proj, k_cond, k_blocks = split_key(key, 4)
    c = self.embed_condition(time, packing.labels, drop, k_time)  # [B, K, (F,) D]
    e = self.time_proj(jax.nn.silu(c), k_proj)  # [B, K, (F,) 6, D]
    x = constrain(self.patch_embed(tokens), ("act_batch", "act_seq", "act_embed"))
    ctx = self.context(packing, drop, k_cond).replace(lora_key=k_blocks, frame_ids=frame_ids)
    x = self.apply_blocks(x, e, ctx)
    shift, scale = (ctx.to_tokens(self.head_modulation[...][i] + c) for i in range(2))  # [B, L, D]
    x = modulate(layer_norm(x, self.cfg.norm_eps), shift.astype(x.dtype), scale.astype(x.dtype))
    return self.head(x).astype(jnp.float32)

  def embed_condition(self, time, labels, drop, key=None) -> jax.Array:
    k_in, k_out = split_key(key, 2)
    c = self.time_out(jax.nn.silu(self.time_in(timestep_features(time, self.cfg.freq_dim), k_in)), k_out)  # [B, K, D]
    if self.cfg.num_classes:
      null = labels < 0 if drop is None else (labels < 0) | drop
      label = self.class_embed(jnp.where(null, self.cfg.num_classes, labels))  # [B, K, D]
      c = c + (label[:, :, None] if time.ndim == 3 else label)  # one label for all frames of an example
    return c

  def context(self, packing: Packing, drop: jax.Array | None, key: jax.Array | None = None) -> Context:
    seg = packing.segment_ids
    rope = Rope(*rope_angles(packing.positions, self.head_dim, self.cfg.rope_theta))
    cp = dict(context_parallel=self.cfg.context_parallel, ulysses_degree=self.cfg.ulysses_degree)
    ctx = Context(self_mask=make_mask(seg, seg, self.cfg.attention, **cp), rope=rope, segment_ids=seg)
    if not self.cfg.cond_dim:
      return ctx
    cond, cseg = packing.cond, packing.cond_segment_ids
    if self.cfg.text_encoder == "bytes":  # byte ids [B, Lc] -> [B, Lc, Dc]
      cond = self.text_encoder(cond, cseg)
    if drop is not None and hasattr(self, "null_cond"):  # dropped captions become the learned null
      cond = jnp.where(gather_to_tokens(drop, cseg)[..., None], self.null_cond[...], cond)
    k_in, k_out = split_key(key, 2)
    cond = self.cond_out(jax.nn.gelu(self.cond_in(cond, k_in), approximate=True), k_out)  # [B, Lc, D]
    cond = constrain(cond, ("act_batch", "act_cond_seq", "act_embed"))
    return ctx.replace(cond=cond, cross_mask=make_mask(seg, cseg, self.cfg.attention, **cp, cross=True))

  def apply_blocks(self, x: jax.Array, e: jax.Array, ctx: Context) -> jax.Array:
    """Stacked blocks: scanned (compile time flat in depth) or unrolled."""
    graphdef, stacked = nnx.split(self.blocks)
    keys = None if ctx.lora_key is None else jax.random.split(ctx.lora_key, self.depth)

    def body(x, inputs):
      layer, key = inputs
      return nnx.merge(graphdef, layer)(x, e, ctx, key), None

    if self.cfg.remat != "none":
      policy = remat_policy(self.cfg.remat)
      body = jax.checkpoint(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      return jax.lax.scan(body, x, (stacked, keys))[0]
    for i in range(self.depth):
      x, _ = body(x, (jax.tree.map(lambda a: a[i], stacked), None if keys is None else keys[i]))
    return x


def remat_policy(name: str):
  """The jax.checkpoint policy `model.remat` names in REMAT_POLICIES: a jax.checkpoint_policies
  member, or what the entry's factory (jax's, else REMAT_FACTORIES) builds from its arguments."""
  entry = REMAT_POLICIES[name]
  if entry is None or isinstance(entry, str):
    return entry and getattr(jax.checkpoint_policies, entry)
  factory, kwargs = entry
  return (getattr(jax.checkpoint_policies, factory, None) or REMAT_FACTORIES[factory])(**kwargs)


def save_attention(*, offloaded_names=(), offload_src: str | None = None, offload_dst: str | None = None):
  """Recompute all but attention, the costliest part of a long clip's layer (72% of the Wan 14B forward
  at 75,600 tokens): keep the outputs of an attention kernel's forward that saves residuals for its
  backward (splash: out and logsumexp, a Pallas call named `*_residuals`) and of XLA attention's score
  and value products (the dots batched over rows and heads), on the device or, with `offload_dst`,
  in that memory, as the values tagged `offloaded_names` are. jax's name-based policies cannot name
  values inside the kernel's custom VJP, hence the match on the primitive."""
  keep = pe.Saveable if offload_dst is None else pe.Offloadable(src=offload_src, dst=offload_dst)
  by_name = jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=offloaded_names, offload_src=offload_src,
      offload_dst=offload_dst)

  def policy(prim, *avals, **params):
    if prim.name == "pallas_call" and str(params.get("name", "")).endswith("_residuals"):
      return keep
    if prim is jax.lax.dot_general_p and len(params["dimension_numbers"][1][0]) >= 2:
      return keep
    return by_name(prim, *avals, **params)

  return policy


REMAT_FACTORIES = {"save_attention": save_attention}  # factories of REMAT_POLICIES entries that jax lacks
