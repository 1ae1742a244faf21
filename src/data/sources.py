"""Data sources: random-access (len + __getitem__) record sources for grain.

`synthetic` is the embedded default: procedural clips of coloured shapes moving in a
straight line, with a caption and a class label, made deterministically from
(seed, index) so any example can be regenerated on any host without a download.
Sizes are latent sizes: without a VAE the clip is what the DiT sees.

`folder` and `tfds:<name>` read prepared tfds datasets (ArrayRecord) by index; their
records are decoded later, in grain's workers (`src.data.video`). `mixture` mixes any
of them by weight.

`embed_caption` is a frozen stand-in for precomputed text-encoder embeddings (what
`src.encode` will store for real captions): a fixed random vector per word.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from src.batch import TEXT_PAD
from src.config import DATA_SOURCES, TFDS_PREFIX, DataConfig
from src.data.sizes import SizeSampler
from src.data.video import DECODE_SEED_OFFSET, ClipDecoder
from src.models.text import caption_bytes
from src.tokenizer import clean_prompt, load_tokenizer

BACKGROUND = -1.0
KINDS = ("square", "disc", "diamond")
PALETTE = {  # name -> RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.0, -1.0),
}
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
NUMBER_WORDS = ("a", "two", "three", "four", "five", "six", "seven", "eight")
MAX_CLASSES = len(KINDS) * len(PALETTE)
SPLITS = ("train", "validation")
VALIDATION_SEED_OFFSET = 1_000_003
# The text encoder is frozen: its "weights" do not change with the run seed.
TEXT_ENCODER_SEED = 0
FOLDER_DATASET = "folder_videos"  # the tfds name of src.data.build's builder
MIXTURE_KEYS = ("source", "weight", "data_dir")
RGB = 3  # channels of every decoded clip


def class_content(label: int) -> tuple[str, str]:
  """(shape kind, colour name) that a synthetic label stands for."""
  return KINDS[label % len(KINDS)], list(PALETTE)[label // len(KINDS)]


def colour_vector(name: str, channels: int) -> np.ndarray:
  """Colour over C channels: RGB, extra channels carry the mean; C < 3 is grey."""
  rgb = np.asarray(PALETTE[name], np.float32)
  if channels < 3:
    return np.full(channels, rgb.mean(), np.float32)
  return np.concatenate([rgb, np.full(channels - 3, rgb.mean(), np.float32)])


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
  if kind == "square":
    return np.maximum(abs(dy), abs(dx)) <= radius
  if kind == "disc":
    return dy**2 + dx**2 <= radius**2
  return abs(dy) + abs(dx) <= radius  # diamond


@dataclass
class SyntheticSource:
  """Moving-shape clips [T, H, W, C] in [-1, 1] with 'label' and 'caption'.

  All shapes of a clip share one kind, one colour and one velocity; the label is
  (kind, colour), so it is learnable from any frame. Count, sizes, start points,
  direction and speed vary from example to example.
  """

  sizes: SizeSampler  # (T, H, W) of each example
  channels: int
  num_examples: int
  num_classes: int
  max_shapes: int
  seed: int
  speed: tuple[float, float] = (0.5, 1.5)  # pixels a frame at a short side of 16, scaled above it

  def __post_init__(self):
    if not 1 <= self.num_classes <= MAX_CLASSES:
      raise ValueError(f"synthetic.num_classes={self.num_classes}: must be in [1, {MAX_CLASSES}] (kinds x colours)")
    if not 1 <= self.max_shapes <= len(NUMBER_WORDS):
      raise ValueError(f"synthetic.max_shapes={self.max_shapes}: must be in [1, {len(NUMBER_WORDS)}]")
    if not 0 < self.speed[0] <= self.speed[1]:
      raise ValueError(f"synthetic.speed={list(self.speed)}: must be [lo, hi] with 0 < lo <= hi")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} synthetic examples")
    rng = np.random.default_rng([self.seed, int(index)])
    shape = self.sizes(rng)
    label = int(rng.integers(self.num_classes))
    kind, colour = class_content(label)
    count = int(rng.integers(1, self.max_shapes + 1))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    video = self._render(rng, shape, kind, colour_vector(colour, self.channels), count, DIRECTIONS[direction])
    plural = "s" if count > 1 else ""
    caption = f"{NUMBER_WORDS[count - 1]} {colour} {kind}{plural} moving {direction}"
    return {"video": video, "label": label, "caption": caption}

  def _render(self, rng, shape, kind: str, colour: np.ndarray, count: int, direction) -> np.ndarray:
    T, H, W = shape
    small = min(H, W)
    speed = rng.uniform(*self.speed) * max(1.0, small / 16)  # pixels per frame
    velocity = np.asarray(direction) * speed  # (vy, vx)
    travel = velocity * (T - 1)
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")  # [H, W]
    video = np.full((T, H, W, self.channels), BACKGROUND, np.float32)
    for _ in range(count):
      radius = rng.uniform(max(1.0, small / 8), max(1.0, small / 4))
      # Start where the centre stays inside the frame for the whole clip.
      lo = np.maximum(0.0, -travel)
      hi = np.maximum(lo, np.array([H - 1, W - 1]) - np.maximum(0.0, travel))
      start = rng.uniform(lo, hi)
      for t in range(T):
        cy, cx = start + velocity * t
        video[t][_shape_mask(kind, yy - cy, xx - cx, radius)] = colour
    return video


HISTOGRAM_BINS = np.linspace(-1.75, 1.75, 8)  # width 0.5, centred on the generator's values -1, 0, 1


def value_histogram(videos) -> np.ndarray:
  """The statistic the synthetic generator defines for judging samples: the normalised
  histogram of pixel values. Real clips put almost all mass in the bins at -1
  (background) and at 0 / +1 (shape colours); Gaussian noise spreads it out."""
  values = np.concatenate([np.asarray(v, np.float32).ravel() for v in videos])
  hist, _ = np.histogram(np.clip(values, -1.7, 1.7), bins=HISTOGRAM_BINS)
  return hist / max(hist.sum(), 1)


def _word_hash(word: str) -> int:
  """Stable across processes and runs (Python's hash() of str is salted)."""
  return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def embed_caption(caption: str, text_len: int, dim: int, seed: int = TEXT_ENCODER_SEED) -> np.ndarray:
  """Frozen stand-in text encoder: caption -> float32 [text_len, dim].

  Word i gets a fixed unit-variance random vector keyed by (seed, stable hash of the
  lower-cased word); words past `text_len` are dropped, missing slots are zeros.
  """
  out = np.zeros((text_len, dim), np.float32)
  for i, word in enumerate(caption.lower().split()[:text_len]):
    out[i] = np.random.default_rng([seed, _word_hash(word)]).standard_normal(dim)
  return out


def caption_tokens(record: dict, text_len: int, dim: int, encoder: str = "precomputed",
                   tokenizer: str = "") -> np.ndarray:
  """What the DiT cross-attends to for a record's caption: byte ids [S] (`bytes`);
  umT5 token ids [S] (`umt5`, -1 past the caption's end: `batch.TEXT_PAD`), or the
  umT5 embeddings a latent cache holds, zero-padded to [S, Dc] as Wan pads them; or
  embeddings [S, Dc] (`precomputed`): the record's own (zero-padded; one of another
  width or longer than S is an error naming the record), else the synthetic stand-in."""
  if encoder == "bytes":
    return caption_bytes(record["caption"], text_len)
  text = record.get("text")
  if encoder == "umt5":
    return caption_ids(record["caption"], text_len, tokenizer) if text is None else padded_text(record, text_len, dim)
  if text is not None:  # the record's own embedding: of the right width, at most text_len tokens (zero-padded)
    return padded_text(record, text_len, dim)
  return embed_caption(record["caption"], text_len, dim)


def caption_ids(caption: str, text_len: int, tokenizer: str) -> np.ndarray:
  """umT5 token ids [text_len] int32 of a cleaned caption (EOS appended, truncated),
  `TEXT_PAD` after its end."""
  ids, mask = load_tokenizer(tokenizer)([clean_prompt(caption)], text_len)
  return np.where(mask[0] > 0, ids[0], TEXT_PAD).astype(np.int32)


def padded_text(record: dict, text_len: int, dim: int) -> np.ndarray:
  """A cached caption embedding [n, Dc] (trimmed to the caption's tokens) -> [text_len, Dc]."""
  text = np.asarray(record["text"], np.float32)
  if text.ndim != 2 or text.shape[1] != dim or len(text) > text_len:
    raise ValueError(f"record {record.get('name') or record.get('caption')!r}: caption embedding of shape "
                     f"{text.shape}; expected at most data.text_len={text_len} tokens of model.cond_dim={dim}")
  return np.pad(text, ((0, text_len - len(text)), (0, 0)))


def make_source(data_cfg: DataConfig, seed: int, spatial_multiple: int = 1, split: str = "train"):
  """The random-access source named by `data_cfg.source`. `spatial_multiple`: frame
  sizes are multiples of it (the patch size, times the VAE stride if any). `split`:
  'train' or 'validation' (held-out examples).

  synthetic gives finished clips; folder and tfds:<name> give raw records (encoded
  bytes or uint8 arrays) that `video.ClipDecoder` turns into clips in the workers.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  source = data_cfg.source
  if source == "synthetic":
    return _synthetic(data_cfg, seed, spatial_multiple, split)
  split_name = data_cfg.train_split if split == "train" else data_cfg.val_split
  if source == "folder" or (source.startswith(TFDS_PREFIX) and source != TFDS_PREFIX):
    if data_cfg.channels != RGB:
      raise ValueError(f"data.source={source} decodes RGB clips: set data.channels={RGB} "
                       f"(not {data_cfg.channels}), and the model's or VAE's input channels to match.")
    if source == "folder":
      return folder_source(data_cfg.data_dir, split_name)
    return tfds_source(source[len(TFDS_PREFIX):], data_cfg.data_dir, split_name)
  if source == "latents":  # the cache of `python -m src.encode`; its validation split in a subfolder
    from src.data.latents import LatentSource

    if not data_cfg.data_dir:
      raise ValueError("data.source=latents needs data.data_dir: the --out of python -m src.encode")
    return LatentSource(data_cfg.data_dir if split == "train" else f"{data_cfg.data_dir}/validation")
  if source == "mixture":
    parts = mixture_parts(data_cfg)
    return grain.MapDataset.mix([grain.MapDataset.source(make_source(d, seed + i, spatial_multiple, split))
                                 for i, (d, _) in enumerate(parts)], [w for _, w in parts])
  raise ValueError(f"unknown data source '{source}'; available: {', '.join(DATA_SOURCES)}, {TFDS_PREFIX}<name>")


def clip_source(data_cfg: DataConfig, seed: int, spatial_multiple: int = 1, split: str = "train",
                frame_multiple: int = 1):
  """`make_source`'s records as clips, by index: {'video' float [T, H, W, C], 'label',
  'caption'}, or for a bad record a marker {'skip': reason, 'name', 'detail'}.

  For readers of single clips (a latent cache writer, sample specs); the training
  pipelines (packed and fixed-shape) decode after shuffling instead, so that random
  crops and flips differ from epoch to epoch."""
  decoder = ClipDecoder.from_config(data_cfg, spatial_multiple, frame_multiple)
  records = grain.MapDataset.source(make_source(data_cfg, seed, spatial_multiple, split))
  return records.random_map(decoder, seed=seed + DECODE_SEED_OFFSET)


def _synthetic(data_cfg: DataConfig, seed: int, spatial_multiple: int, split: str) -> SyntheticSource:
  if split == "validation":  # other seeds draw other clips: a held-out set
    seed += VALIDATION_SEED_OFFSET
  syn = data_cfg.synthetic
  return SyntheticSource(
      sizes=SizeSampler.from_config(data_cfg, spatial_multiple),
      channels=data_cfg.channels,
      num_examples=syn.num_examples,
      num_classes=syn.num_classes,
      max_shapes=syn.max_shapes,
      seed=seed,
      speed=tuple(syn.speed),
  )


def tfds_source(name: str, data_dir: str, split: str, hint: str = ""):
  """A prepared tfds dataset in ArrayRecord format, read by index (`tfds.data_source`)."""
  import tensorflow_datasets as tfds

  if data_dir and not Path(data_dir).is_dir():
    raise FileNotFoundError(f"data.data_dir={data_dir} does not exist.")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises many types here; say what to do instead
    where = data_dir or "the default tfds data_dir"
    hint = hint or f"Prepare it first (`tfds build {name} --file_format=array_record`)"
    raise ValueError(f"cannot open tfds dataset '{name}' split '{split}' in {where}: {e}\n"
                     f"{hint}, or check data.train_split / data.val_split (e.g. 'train[5%:]' / 'train[:5%]').") from e


def folder_source(data_dir: str, split: str):
  """The dataset `python -m src.data.build` made from a folder of videos and captions."""
  build = f"python -m src.data.build --src VIDEO_DIR --captions CAPTIONS_FILE --out {data_dir or 'DATA_DIR'}"
  if not data_dir:
    raise ValueError(f"data.source=folder needs data.data_dir: the --out directory of `{build}`.")
  if not any((Path(data_dir) / FOLDER_DATASET).glob("*/dataset_info.json")):
    raise FileNotFoundError(f"no folder dataset in data.data_dir={data_dir}; build it with `{build}`.")
  return tfds_source(FOLDER_DATASET, data_dir, split, hint=f"A held-out split needs `{build} --val_count N`")


def mixture_parts(data_cfg: DataConfig) -> list[tuple[DataConfig, float]]:
  """(config of each component, its weight) for data.source=mixture: each component
  is the same data config with its own source and data_dir."""
  if not data_cfg.mixture:
    raise ValueError("data.source=mixture needs data.mixture: a list of {source, weight, data_dir}.")
  parts = []
  for entry in data_cfg.mixture:
    unknown = set(entry) - set(MIXTURE_KEYS)
    if unknown or "source" not in entry or entry["source"] == "mixture":
      raise ValueError(f"data.mixture entry {dict(entry)}: needs a 'source' (not 'mixture'), "
                       f"may have {', '.join(MIXTURE_KEYS[1:])}; unknown: {sorted(unknown)}.")
    weight = float(entry.get("weight", 1.0))
    if weight <= 0:
      raise ValueError(f"data.mixture entry {dict(entry)}: weight must be > 0.")
    part = dataclasses.replace(data_cfg, source=entry["source"], mixture=[],
                               data_dir=entry.get("data_dir", data_cfg.data_dir))
    parts.append((part, weight))
  return parts
