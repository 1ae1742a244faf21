"""Real clips: encoded files or uint8 arrays -> float32 [T, H, W, 3] in [-1, 1] (or uint8).

Runs inside grain's worker processes as a `random_map`: PyAV decodes videos (mp4,
webm, gif, ...), Pillow decodes images (png, jpg: 1-frame clips). Frames are sampled
at a target frame rate and stride from a random start, resized to cover the output
size and centre-cropped, and flipped left-right at random. The output size keeps the
source's aspect ratio under the area budget (`sizes.fit_area`, as NaViT/Open-Sora
buckets), or is the fixed (height, width) when no budget is set.

A bad record never raises: it comes out as `{"skip": reason, "name": ..., "detail":
...}` so the main process can count it (counters in worker processes would be lost)
and drop it. Reasons are `SKIP_REASONS`.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from src.config import DataConfig
from src.data.sizes import fit_area

SKIP_REASONS = ("undecodable", "empty", "too_short", "channels", "no_caption")
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # png, jpeg: read with Pillow
# Pillow modes with fewer than 3 colour bands: the model trains on colour, and
# guessing colour from grey would teach it grey clips are normal.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")
DEFAULT_FPS = 24.0  # when a container states no frame rate
DECODE_SEED_OFFSET = 7919  # the decode's random_map seed: other draws than token dropping
RESAMPLE = Image.Resampling.BICUBIC
SWSCALE_RESAMPLE = "BICUBIC"  # the same filter when PyAV resizes during decode


class BadInput(Exception):
  """A record the pipeline skips; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ClipShape:
  """Output geometry: frame counts, and the frame size for a source size."""

  frame_counts: tuple[int, ...]  # clip lengths to draw from (those the video is long enough for)
  fixed: tuple[int, int] | None  # (H, W) of every clip; None: fit the area budget
  area: int
  aspect_range: tuple[float, float]  # source aspects outside it are cropped to it
  multiple: int

  @classmethod
  def from_config(cls, d: DataConfig, multiple: int) -> "ClipShape":
    if d.area <= 0:
      return cls((d.frames,), (d.height, d.width), 0, (1.0, 1.0), multiple)
    aspects = (min(d.aspect_ratios), max(d.aspect_ratios))
    return cls(tuple(d.frame_counts) or (d.frames,), None, d.area, aspects, multiple)

  def frame_size(self, height: int, width: int) -> tuple[int, int]:
    if self.fixed is not None:
      return self.fixed
    aspect = min(max(width / height, self.aspect_range[0]), self.aspect_range[1])
    return fit_area(aspect, self.area, self.multiple)


def cover_size(src: tuple[int, int], out: tuple[int, int]) -> tuple[int, int]:
  """Smallest (H, W) with the source's aspect that covers `out`: resize, then crop."""
  scale = max(out[0] / src[0], out[1] / src[1])
  return max(out[0], round(src[0] * scale)), max(out[1], round(src[1] * scale))


def centre_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  top, left = (frames.shape[1] - size[0]) // 2, (frames.shape[2] - size[1]) // 2
  return frames[:, top:top + size[0], left:left + size[1]]


def pick_frames(count: int, native_fps: float, fps: float, stride: int, lengths: tuple[int, ...],
                rng: np.random.Generator) -> np.ndarray:
  """Indices of the frames to keep from a video of `count` frames: every `stride`-th
  frame after resampling to `fps` (0: native rate), a clip length drawn from the
  `lengths` that fit, from a random start."""
  if count <= 0:
    raise BadInput("empty", "no frames")
  if count == 1:  # a still image (e.g. a 1-frame gif): a 1-frame clip, like png/jpg
    return np.zeros(1, np.int64)
  step = stride * (native_fps / fps if fps > 0 else 1.0)  # in source frames
  fits = [n for n in lengths if round((n - 1) * step) < count]
  if not fits:
    raise BadInput("too_short", f"{count} frames, need {min(lengths)} at step {step:.3g}")
  n = int(rng.choice(fits))
  offsets = np.round(np.arange(n) * step).astype(np.int64)
  return offsets + int(rng.integers(0, count - offsets[-1]))


def resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [T, H, W, 3] -> [T, *size, 3]: cover, then centre-crop."""
  cover = cover_size(frames.shape[1:3], size)
  if cover != frames.shape[1:3]:
    frames = np.stack([np.asarray(Image.fromarray(f).resize(cover[::-1], RESAMPLE)) for f in frames])
  return centre_crop(frames, size)


def read_image(data: bytes) -> np.ndarray:
  """Encoded png/jpg -> uint8 [1, H, W, 3]."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()  # truncated files fail here, not later
    if img.mode in GREY_MODES:
      raise BadInput("channels", f"image mode {img.mode}")
    return np.asarray(img.convert("RGB"))[None]


def _count_frames(data: bytes) -> int:
  """Frames by demuxing packets (no decoding): webm and some mp4s state no count."""
  import av

  with av.open(io.BytesIO(data)) as container:
    stream = container.streams.video[0]
    return sum(1 for packet in container.demux(stream) if packet.size)


def _check_format(stream) -> None:
  fmt = stream.codec_context.format
  if fmt is not None and len(fmt.components) < 3 and not fmt.name.startswith("pal"):
    raise BadInput("channels", f"pixel format {fmt.name}")


def probe(data: bytes) -> dict:
  """What an encoded file holds, decoding no more than its first frame: {'kind': 'image'
  or 'video', 'frames', 'height', 'width'}. Raises BadInput (undecodable, empty,
  channels) for a file no config could use; the rest are config questions (too short
  for the clip lengths asked, no caption) left to the pipeline."""
  try:
    if data[:8].startswith(IMAGE_MAGIC):
      height, width = read_image(data).shape[1:3]
      return dict(kind="image", frames=1, height=height, width=width)
    import av

    with av.open(io.BytesIO(data)) as container:
      if not container.streams.video:
        raise BadInput("empty", "no video stream")
      stream = container.streams.video[0]
      _check_format(stream)
      if next(iter(container.decode(stream)), None) is None:
        raise BadInput("empty", "no frames")
      return dict(kind="video", frames=stream.frames or _count_frames(data), height=stream.codec_context.height,
                  width=stream.codec_context.width)
  except BadInput:
    raise
  except Exception as e:  # noqa: BLE001 - whatever the decoders raise, the file is unreadable
    raise BadInput("undecodable", f"{type(e).__name__}: {e}") from None


def read_video(data: bytes, choose, frame_size) -> np.ndarray:
  """Encoded video -> uint8 [T, H, W, 3]. `choose(count, native_fps)` gives the frame
  indices, `frame_size(h, w)` the output size; frames are resized while decoding."""
  import av

  count = None
  for _ in range(2):  # a second pass when the stated frame count was too high
    with av.open(io.BytesIO(data)) as container:
      if not container.streams.video:
        raise BadInput("empty", "no video stream")
      stream = container.streams.video[0]
      _check_format(stream)
      if count is None:
        count = stream.frames or _count_frames(data)
      native = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
      indices = choose(count, native)
      size = frame_size(stream.codec_context.height, stream.codec_context.width)
      frames, decoded = _decode_at(container, stream, indices, cover_size(
          (stream.codec_context.height, stream.codec_context.width), size))
    if frames is not None:
      return centre_crop(frames, size)
    count = decoded
  raise BadInput("too_short", f"stream ended after {count} frames")


def _decode_at(container, stream, indices: np.ndarray, cover: tuple[int, int]):
  """(uint8 [T, *cover, 3] of the frames at `indices`, or None if the stream ended
  first; frames decoded)."""
  wanted: dict[int, np.ndarray] = {}
  keep, last = set(indices.tolist()), int(indices.max())
  decoded = 0
  for frame in container.decode(stream):
    if decoded in keep:
      wanted[decoded] = frame.to_ndarray(width=cover[1], height=cover[0], format="rgb24",
                                         interpolation=SWSCALE_RESAMPLE)
    decoded += 1
    if decoded > last:
      return np.stack([wanted[int(i)] for i in indices]), decoded
  return None, decoded


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def to_unit_range(video: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]; float clips (already so) pass through."""
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 127.5 - 1.0
  return np.asarray(video, np.float32)


@dataclass(frozen=True)
class ClipDecoder:
  """grain `random_map`: raw record -> {'video', 'label', 'caption'} or a skip marker.

  Raw records hold the clip under `video_key` (empty: 'video' if present, else
  'image') as encoded bytes or a uint8 array ([T, H, W, C] or [H, W, C]); float clips
  (the synthetic source) pass through unchanged. With `uint8`, decoded pixels stay
  uint8 (a quarter of the bytes to ship from worker processes) and the consumer maps
  them with `to_unit_range`; otherwise the clip is float32 in [-1, 1].
  """

  shape: ClipShape
  fps: float = 0.0
  stride: int = 1
  flip: bool = True
  require_caption: bool = True
  video_key: str = ""
  frame_multiple: int = 1  # temporal patch: an image becomes a still clip this long
  uint8: bool = False

  @classmethod
  def from_config(cls, d: DataConfig, multiple: int, frame_multiple: int = 1, uint8: bool = False) -> "ClipDecoder":
    return cls(ClipShape.from_config(d, multiple), d.fps, d.frame_stride, d.random_flip,
               d.require_caption, d.video_key, frame_multiple, uint8)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    key = self.video_key or ("video" if "video" in record else "image")
    media = record.get(key)
    if isinstance(media, np.ndarray) and media.dtype.kind == "f":
      return record  # already a clip
    name = _text(record.get("filename", ""))
    caption = _text(record.get("caption", "")).strip()
    try:
      if media is None:
        raise BadInput("empty", f"no '{key}' feature")
      if self.require_caption and not caption:
        raise BadInput("no_caption")
      frames = self._frames(media, rng)
    except BadInput as e:
      return {"skip": e.reason, "name": name, "detail": e.detail}
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, never a crash
      return {"skip": "undecodable", "name": name, "detail": f"{type(e).__name__}: {e}"}
    if self.flip and rng.random() < 0.5:
      frames = frames[:, :, ::-1]
    video = frames if self.uint8 else to_unit_range(frames)  # [T, H, W, 3]
    return {"video": video, "label": int(record.get("label", -1)), "caption": caption}

  def _frames(self, media, rng: np.random.Generator) -> np.ndarray:
    choose = functools.partial(pick_frames, fps=self.fps, stride=self.stride, lengths=self.shape.frame_counts,
                               rng=rng)  # (count, native_fps) -> frame indices
    if isinstance(media, np.ndarray) and media.dtype == np.uint8:
      frames = self._from_array(media, choose)
    else:
      data = media.item() if isinstance(media, np.ndarray) else media
      if data[:8].startswith(IMAGE_MAGIC):
        frames = read_image(data)
        frames = resize(frames, self.shape.frame_size(*frames.shape[1:3]))
      else:
        frames = read_video(data, choose, self.shape.frame_size)
    if len(frames) == 1 and self.frame_multiple > 1:  # a still clip one temporal patch long
      frames = np.repeat(frames, self.frame_multiple, axis=0)
    return frames

  def _from_array(self, array: np.ndarray, choose) -> np.ndarray:
    frames = array[None] if array.ndim == 3 else array
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise BadInput("channels", f"uint8 array of shape {array.shape}")
    frames = frames[choose(len(frames), DEFAULT_FPS)]  # arrays state no frame rate
    return resize(frames, self.shape.frame_size(*frames.shape[1:3]))
