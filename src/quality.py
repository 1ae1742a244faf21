"""A measure of sample quality on the synthetic data: does a sample show what its label
or caption asks for?

The synthetic clips (`src.data.sources.SyntheticSource`) are procedural: flat shapes of
one kind and one colour on a background of -1, all moving one way. So a sample can be
checked against its request directly, without a learnt judge:
- foreground: the pixels where some channel is above 0 (every palette colour has a
  channel at +1, the background has none);
- colour: the mean absolute error of the foreground against the asked colour;
- shape: each connected foreground blob is matched against a template of each kind
  (square, disc, diamond), centred on the blob's centroid and sized by its area; the
  blob's kind is the template with the best IoU, and the asked kind must win for most
  of the foreground, with a good IoU;
- motion (a caption names a direction, the clip has at least 3 frames): the
  foreground centroid must move that way, at a quarter of the slowest speed the
  generator draws or more, and more than across it.
A sample passes when every check it is asked for passes; `pass_fraction` is what the
trainer logs (`val/sample_pass`) and what the README quotes for the smoke preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from src.data.sources import BACKGROUND, DIRECTIONS, KINDS, NUMBER_WORDS, PALETTE, class_content

COLOUR_TOLERANCE = 0.45  # mean |error| per channel over the foreground (colours are 2 apart)
MIN_IOU = 0.5  # of the asked kind's template with its blobs, area-weighted
MIN_KIND_SHARE = 0.5  # of the foreground whose best template is the asked kind
FOREGROUND_RANGE = (0.003, 0.6)  # fraction of a frame: nothing, or everything, is no shape
MIN_SPEED = 0.25  # pixels a frame of centroid travel along the asked direction (the generator's slowest by default: 0.5)
MOTION_FRAMES = 3  # fewer frames travel too little to tell a direction from a shape's edge at the border
KIND_TIE = 0.05  # a blob whose asked-kind IoU is this close to the best counts as the asked kind (tiny shapes)
MIN_BLOB = 3  # pixels: smaller blobs are noise


@dataclass(frozen=True)
class Ask:
  """What a sample was asked to show; None: not asked (a class label names no motion)."""

  kind: str
  colour: str
  direction: str | None = None

  @staticmethod
  def of(label: int = -1, caption: str | None = None) -> Ask | None:
    """From a synthetic caption ("two green diamonds moving up"), else its class label; None if neither."""
    if caption:
      words = caption.lower().split()
      kind = next((k for k in KINDS if any(w.rstrip("s") == k for w in words)), None)
      colour = next((c for c in PALETTE if c in words), None)
      direction = next((d for d in DIRECTIONS if d in words), None)
      if kind and colour and words[0] in NUMBER_WORDS:
        return Ask(kind, colour, direction)
    if label is not None and label >= 0:
      return Ask(*class_content(label))
    return None


def _template(kind: str, shape: tuple[int, int], centre, area: float) -> np.ndarray:
  """A filled `kind` of about `area` pixels centred at `centre` (the generator's masks)."""
  yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
  dy, dx = yy - centre[0], xx - centre[1]
  if kind == "square":
    r = (np.sqrt(area) - 1) / 2
    return np.maximum(abs(dy), abs(dx)) <= r + 0.5
  if kind == "disc":
    return dy**2 + dx**2 <= area / np.pi
  return abs(dy) + abs(dx) <= np.sqrt(area / 2)  # diamond


def _blob_kinds(mask: np.ndarray) -> list[tuple[int, dict[str, float]]]:
  """(area, IoU of each kind's template) of each connected blob of a frame's foreground."""
  labels, n = ndimage.label(mask)
  out = []
  for i in range(1, n + 1):
    blob = labels == i
    area = int(blob.sum())
    if area < MIN_BLOB:
      continue
    centre = ndimage.center_of_mass(blob)
    ious = {}
    for kind in KINDS:
      t = _template(kind, mask.shape, centre, area)
      ious[kind] = float((t & blob).sum() / max((t | blob).sum(), 1))
    out.append((area, ious))
  return out


def judge(video: np.ndarray, ask: Ask) -> dict[str, float | bool]:
  """The checks of one sample [T, H, W, C] in [-1, 1] against `ask`: a dict of the
  measured values and `passed`."""
  v = np.clip(np.asarray(video, np.float32), -1.0, 1.0)  # as shown (media.to_uint8 clips): guidance overshoots
  rgb = v[..., :3] if v.shape[-1] >= 3 else np.repeat(v.mean(-1, keepdims=True), 3, -1)
  mask = (rgb - BACKGROUND).max(-1) > 1.0  # some channel above 0
  share = mask.mean(axis=(1, 2))
  present = bool(np.all((share >= FOREGROUND_RANGE[0]) & (share <= FOREGROUND_RANGE[1])))
  want = np.asarray(PALETTE[ask.colour], np.float32)
  if v.shape[-1] < 3:
    want = np.full(3, want.mean(), np.float32)
  colour_error = float(np.abs(rgb[mask] - want).mean()) if mask.any() else 2.0
  blobs = [b for frame in mask for b in _blob_kinds(frame)]
  total = sum(a for a, _ in blobs) or 1
  kind_share = sum(a for a, ious in blobs if ious[ask.kind] >= max(ious.values()) - KIND_TIE) / total
  iou = sum(a * ious[ask.kind] for a, ious in blobs) / total if blobs else 0.0
  out = dict(present=present, colour_error=colour_error, iou=float(iou), kind_share=float(kind_share))
  passed = present and colour_error < COLOUR_TOLERANCE and iou >= MIN_IOU and kind_share >= MIN_KIND_SHARE
  if ask.direction and v.shape[0] >= MOTION_FRAMES and present:
    centroids = np.array([ndimage.center_of_mass(m) for m in mask])
    travel = centroids[-1] - centroids[0]
    along = float(travel @ np.asarray(DIRECTIONS[ask.direction]))
    across = float(abs(travel @ np.asarray(DIRECTIONS[ask.direction])[::-1]))
    out.update(motion_along=along, motion_across=across)
    passed = passed and along >= MIN_SPEED * (v.shape[0] - 1) and along > across
  out["passed"] = bool(passed)
  return out


def pass_fraction(videos, asks) -> float:
  """The fraction of samples that show what they were asked for (samples without a request are left out)."""
  results = [judge(v, a)["passed"] for v, a in zip(videos, asks) if a is not None]
  return float(np.mean(results)) if results else float("nan")
