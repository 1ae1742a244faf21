"""Causal 3D convolutional video VAE in the layout of the Wan 2.1 VAE.

Dimensions: B batch, T frames, H height, W width, C channels (channels-last), Z latent
channels, kt/kh/kw kernel sizes.

Follows Wan 2.1 (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative
Models", sec. 3.1) as implemented by diffusers `AutoencoderKLWan`: causal 3D convs that
pad in time on the past side only, RMS norms, residual blocks, spatial/temporal
resampling, a single-head spatial attention in the mid blocks, and a diagonal Gaussian
posterior (`quant_conv`/`post_quant_conv`, Wan's `conv1`/`conv2`). Module and parameter
names mirror diffusers so its weights map one to one (`src/convert.py`).

Time is causal: output frame t depends on input frames <= t only, and the first frame
is coded alone (an image is a one-frame video: 1 + 4k frames <-> 1 + k latents). So a
clip can be run in chunks (first frame, then 4 frames at a time) that carry the last
frames seen by every causal conv (`FrameCache`); that equals the full-clip result and
bounds memory by the chunk, as Wan's own `feat_cache` does.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from src.config import VAEConfig
from src.mesh import constrain
from src.models.layers import param, zeros

LOGVAR_RANGE = (-30.0, 20.0)  # posterior log-variance clamp, as diffusers' DiagonalGaussianDistribution
# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
conv_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class FrameCache:
  """Past frames of every causal conv, read and written in call order.

  `past=None` starts a clip (zero past, and the first frame is handled alone); a list
  from a previous call continues it. `new` collects what the next chunk needs.
  """

  def __init__(self, past: list[jax.Array] | None = None):
    self._past = None if past is None else iter(past)
    self.new: list[jax.Array] = []

  @property
  def starting(self) -> bool:
    return self._past is None

  def pop(self) -> jax.Array | None:
    return None if self._past is None else next(self._past)

  def push(self, frames: jax.Array) -> None:
    self.new.append(frames)


class Conv(nnx.Module):
  """N-d convolution over [B, *spatial, Cin] with a channels-last kernel [*k, Cin, Cout]."""

  def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], *, rngs: nnx.Rngs,
               stride: tuple[int, ...] | None = None, padding: list[tuple[int, int]] | None = None,
               dtype=jnp.float32):
    nd = len(kernel)
    self.kernel = param(rngs, conv_init, (*kernel, cin, cout), (None,) * nd + ("conv_in", "conv_out"), decay=True)
    self.bias = param(rngs, zeros, (cout,), ("conv_out",))
    self.stride = tuple(stride or (1,) * nd)
    self.padding = tuple(padding or [(0, 0)] * nd)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    spatial = "DHW"[-(self.kernel.ndim - 2):]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding,
        dimension_numbers=dims)
    return y + self.bias[...].astype(self.dtype)


def per_frame(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Apply an image op [N, H, W, C] -> [N, H', W', C'] to every frame of [B, T, H, W, C]."""
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))  # [B*T, H', W', C']
  return y.reshape(b, t, *y.shape[1:])


class CausalConv3d(Conv):
  """3D conv padded in time on the past side only (kt - 1 frames), symmetric in space.

  The past is zeros at the start of a clip, else the frames cached by the previous
  chunk, so chunked and full-clip runs see the same inputs.
  """

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], *, rngs: nnx.Rngs, dtype):
    kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
    super().__init__(cin, cout, (kt, kh, kw), padding=[(0, 0), (kh // 2,) * 2, (kw // 2,) * 2],
                     rngs=rngs, dtype=dtype)
    self.past_frames = kt - 1

  def __call__(self, x: jax.Array, cache: FrameCache | None = None) -> jax.Array:
    if self.past_frames == 0:
      return super().__call__(x)
    past = cache.pop() if cache is not None else None
    if past is None:
      past = jnp.zeros((x.shape[0], self.past_frames, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([past.astype(x.dtype), x], axis=1)  # [B, kt-1+T, H, W, C]
    if cache is not None:
      cache.push(x[:, -self.past_frames:])
    # Large frames: `mesh.rules={act_height: sequence}` splits rows over devices.
    return constrain(super().__call__(x), ("act_batch", None, "act_height", None, None))


class RMSNorm(nnx.Module):
  """Wan's RMS_norm over channels: x / max(||x||_2, eps) * sqrt(C) * gamma (+ bias), in float32.

  That is x / rms(x) * gamma; the L2 form keeps Wan's (F.normalize) numerics.
  """

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, bias: bool = False):
    self.gamma = param(rngs, nnx.initializers.ones_init(), (dim,), ("conv_out",))
    self.bias = param(rngs, zeros, (dim,), ("conv_out",)) if bias else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, self.eps) * math.sqrt(xf.shape[-1]) * self.gamma[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
  """norm-SiLU-conv twice, plus a 1x1x1 conv shortcut when the width changes."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.norm1 = RMSNorm(cin, eps=cfg.norm_eps, rngs=rngs)
    self.conv1 = CausalConv3d(cin, cout, 3, rngs=rngs, dtype=dt)
    self.norm2 = RMSNorm(cout, eps=cfg.norm_eps, rngs=rngs)
    self.conv2 = CausalConv3d(cout, cout, 3, rngs=rngs, dtype=dt)
    self.conv_shortcut = CausalConv3d(cin, cout, 1, rngs=rngs, dtype=dt) if cin != cout else None

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    x = self.conv2(jax.nn.silu(self.norm2(x)), cache)  # dropout is 0 in Wan
    return x + h


class Attention(nnx.Module):
  """Single-head self-attention over the pixels of each frame (so causal in time)."""

  def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.norm = RMSNorm(dim, eps=cfg.norm_eps, rngs=rngs)
    self.to_qkv = Conv(dim, 3 * dim, (1, 1), rngs=rngs, dtype=dt)
    self.proj = Conv(dim, dim, (1, 1), rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    qkv = per_frame(self.to_qkv, self.norm(x)).reshape(b * t, h * w, 3 * c)  # [B*T, HW, 3C]
    q, k, v = jnp.split(qkv, 3, axis=-1)  # [B*T, HW, C]
    logits = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / math.sqrt(c)
    out = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
    out = per_frame(self.proj, out.reshape(b, t, h, w, c))  # [B, T, H, W, C]
    return x + out


class Resample(nnx.Module):
  """Spatial /2 or x2 resampling, with Wan's causal temporal /2 or x2 ('...3d' modes).

  The first frame of a clip is never resampled in time: downsampling pairs up the
  frames after it (1 + 2k -> 1 + k), upsampling doubles them (1 + k -> 1 + 2k).
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, cfg: VAEConfig, *, rngs: nnx.Rngs):
    assert mode in self.MODES, mode
    dt = jnp.dtype(cfg.dtype)
    self.mode = mode
    if mode.startswith("down"):
      # Pad right/bottom by one, then a stride-2 3x3 conv: the (0, 1, 0, 1) ZeroPad2d of Wan.
      self.resample = Conv(dim, dim, (3, 3), stride=(2, 2), padding=[(0, 1), (0, 1)], rngs=rngs, dtype=dt)
    else:
      self.resample = Conv(dim, dim // 2, (3, 3), padding=[(1, 1), (1, 1)], rngs=rngs, dtype=dt)
    if mode == "downsample3d":
      self.time_conv = Conv(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs, dtype=dt)
    elif mode == "upsample3d":
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    if self.mode == "upsample3d":
      x = self._time_up(x, cache)
    if self.mode.startswith("up"):
      up = lambda f: jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)  # nearest, x2
      x = per_frame(lambda f: self.resample(up(f)), x)
    else:
      x = per_frame(self.resample, x)
    if self.mode == "downsample3d":
      x = self._time_down(x, cache)
    return x

  def _time_down(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    # Windows of 3 frames at stride 2; the previous chunk's last frame opens the window.
    past = cache.pop()
    cache.push(x[:, -1:])
    if past is not None:
      return self.time_conv(jnp.concatenate([past, x], axis=1))
    if x.shape[1] == 1:
      return x
    return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)  # [B, 1 + (T-1)/2, H, W, C]

  def _time_up(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    # Frames after the first form their own causal stream (Wan restarts it from zeros).
    first, x = (x[:, :1], x[:, 1:]) if cache.starting else (None, x)
    if x.shape[1] == 0:
      cache.push(jnp.zeros((first.shape[0], self.time_conv.past_frames, *first.shape[2:]), first.dtype))
      return first
    b, t, h, w, c = x.shape
    y = self.time_conv(x, cache).reshape(b, t, h, w, 2, c)  # two output frames per input frame
    y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c)  # [B, 2T, H, W, C]
    return y if first is None else jnp.concatenate([first, y], axis=1)


class MidBlock(nnx.Module):
  """Residual block, attention, residual block."""

  def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(dim, cfg, rngs=rngs)])

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    x = self.resnets[0](x, cache)
    return self.resnets[1](self.attentions[0](x), cache)


class Encoder(nnx.Module):
  """Video [B, T, H, W, Cin] -> [B, t, h, w, 2Z] (posterior mean and log-variance)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
    self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, rngs=rngs, dtype=dt)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(cin, cout, cfg, rngs=rngs))
        cin = cout
      if i < len(cfg.dim_mult) - 1:
        mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
        blocks.append(Resample(cout, mode, cfg, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], eps=cfg.norm_eps, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    x = self.conv_in(x, cache)
    for block in self.down_blocks:
      x = block(x, cache)
    x = self.mid_block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler (to half the width)."""

  def __init__(self, cin: int, cout: int, mode: str | None, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResidualBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs) for j in range(cfg.num_res_blocks + 1)])
    self.upsampler = Resample(cout, mode, cfg, rngs=rngs) if mode else None

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    for block in self.resnets:
      x = block(x, cache)
    return x if self.upsampler is None else self.upsampler(x, cache)


class Decoder(nnx.Module):
  """Latents [B, t, h, w, Z] -> video [B, T, H, W, Cin] (unclipped)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    mult = cfg.dim_mult
    dims = [cfg.base_dim * m for m in [mult[-1], *mult[::-1]]]
    temporal_up = cfg.temporal_downsample[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, rngs=rngs, dtype=dt)
    self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      # Each upsampler halves the width, so every block after the first starts at half.
      cin = cin if i == 0 else cin // 2
      mode = None if i == len(mult) - 1 else "upsample3d" if temporal_up[i] else "upsample2d"
      blocks.append(UpBlock(cin, cout, mode, cfg, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], eps=cfg.norm_eps, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], cfg.in_channels, 3, rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array, cache: FrameCache) -> jax.Array:
    x = self.mid_block(self.conv_in(x, cache), cache)
    for block in self.up_blocks:
      x = block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class VideoVAE(nnx.Module):
  """Wan 2.1 VAE. Videos [B, T, H, W, C] in [-1, 1]; latents [B, 1 + (T-1)/4, H/8, W/8, Z]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    n_down = len(cfg.dim_mult) - 1
    if len(cfg.temporal_downsample) < n_down:
      raise ValueError(f"vae.temporal_downsample needs {n_down} entries, one per downsample.")
    for name in ("latents_mean", "latents_std"):
      if getattr(cfg, name) and len(getattr(cfg, name)) != cfg.z_dim:
        raise ValueError(f"vae.{name} has {len(getattr(cfg, name))} values; vae.z_dim={cfg.z_dim}.")
    dt = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, rngs=rngs, dtype=dt)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, rngs=rngs, dtype=dt)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.cfg, self.z_dim = cfg, cfg.z_dim
    self.temporal_factor, self.spatial_factor = cfg.compression()
    self.latents_mean = tuple(cfg.latents_mean) or (0.0,) * cfg.z_dim
    self.latents_std = tuple(cfg.latents_std) or (1.0,) * cfg.z_dim
    if cfg.chunk_frames <= 0 or cfg.chunk_frames % self.temporal_factor:
      raise ValueError(f"vae.chunk_frames={cfg.chunk_frames} must be a positive multiple of {self.temporal_factor}.")
    self.chunk_frames = cfg.chunk_frames

  # Public API.

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Video [B, T, H, W, C] -> posterior (mean, logvar), each [B, t, h, w, Z]."""
    self._check_video(x)
    return self._posterior(self._encode(x)[0])

  def decode(self, z: jax.Array, clip: bool = True) -> jax.Array:
    """Latents [B, t, h, w, Z] -> video [B, 1 + (t-1)*4, 8h, 8w, C], clipped to [-1, 1]
    unless `clip=False` (training: the clip would stop gradients)."""
    video = self._decode(z)[0]
    return jnp.clip(video, -1.0, 1.0) if clip else video

  def encode_chunked(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """As `encode`, holding only `chunk_frames` frames of activations at a time."""
    self._check_video(x)
    return self._posterior(_run_chunked(self._encode, x, self.chunk_frames))

  def decode_chunked(self, z: jax.Array) -> jax.Array:
    """As `decode`, holding only `chunk_frames // 4` latent frames of activations at a time."""
    return jnp.clip(_run_chunked(self._decode, z, self.chunk_frames // self.temporal_factor), -1.0, 1.0)

  def normalize(self, z: jax.Array) -> jax.Array:
    """Raw latents -> per-channel standardised latents, (z - mean) / std."""
    mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
    return ((z - mean) / std).astype(z.dtype)

  def denormalize(self, z: jax.Array) -> jax.Array:
    mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
    return (z * std + mean).astype(z.dtype)

  # One pass over a clip or a chunk: (input, past frames or None) -> (output, new past).

  def _encode(self, x: jax.Array, past: list[jax.Array] | None = None):
    cache = FrameCache(past)
    return self.quant_conv(self.encoder(x, cache)), cache.new

  def _decode(self, z: jax.Array, past: list[jax.Array] | None = None):
    cache = FrameCache(past)
    return self.decoder(self.post_quant_conv(z), cache), cache.new

  def _posterior(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def _check_video(self, x: jax.Array) -> None:
    error = self.cfg.clip_error(x.shape[1:4])
    if error:
      raise ValueError(error + ".")


def _run_chunked(step, x: jax.Array, size: int) -> jax.Array:
  """First frame alone, then `size`-frame chunks through `lax.scan` carrying the caches."""
  b = x.shape[0]
  first, past = step(x[:, :1])
  rest = x[:, 1:]
  n = rest.shape[1] // size
  outs = [first]
  if n:
    chunks = jnp.moveaxis(rest[:, :n * size].reshape(b, n, size, *rest.shape[2:]), 1, 0)  # [n, B, size, ...]
    body = lambda past, chunk: step(chunk, past)[::-1]
    past, ys = jax.lax.scan(body, past, chunks)  # ys [n, B, t', ...]
    outs.append(jnp.moveaxis(ys, 0, 1).reshape(b, -1, *ys.shape[3:]))
  if rest.shape[1] > n * size:  # a shorter last chunk
    outs.append(step(rest[:, n * size:], past)[0])
  return jnp.concatenate(outs, axis=1)
