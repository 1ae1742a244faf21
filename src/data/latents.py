"""The latent cache: VAE latents (+ labels, captions, text embeddings) in ArrayRecord.

Written by `python -m src.encode`, one shard file per process
(`latents-00000-of-00002.array_record`) plus `metadata.json`; read back by the
`latents` data source as records shaped like any other source's, with the normalised
posterior mean in place of the pixels, so packing and training need no special case.
Records are msgpack maps of numpy arrays (flax.serialization), one record per clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from array_record.python import array_record_module
from flax import serialization

METADATA = "metadata.json"
SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"


class LatentWriter:
  """Appends records to this process's shard, written as `<shard>.partial` and renamed
  by `close()` (which also writes the metadata, on process 0); `abort()` deletes it.
  So a failed or interrupted encode leaves no cache a reader would take for whole. An
  existing cache in `out_dir` is refused rather than mixed with the new shards."""

  def __init__(self, out_dir: str | Path, process_index: int = 0, process_count: int = 1):
    self.dir = Path(out_dir)
    if (self.dir / METADATA).exists() or any(self.dir.glob("latents-*.array_record")):
      raise FileExistsError(f"{self.dir} already holds a latent cache: write to a new --out (or delete it first)")
    self.dir.mkdir(parents=True, exist_ok=True)
    self.path = self.dir / SHARD_PATTERN.format(index=process_index, count=process_count)
    self._partial = self.path.with_name(self.path.name + ".partial")
    self._writer = array_record_module.ArrayRecordWriter(str(self._partial), "group_size:1")
    self.primary, self.count = process_index == 0, 0

  def write(self, latent: np.ndarray, label: int, caption: str, text: np.ndarray | None = None) -> None:
    record = {"latent": np.asarray(latent, np.float32), "label": np.int64(label), "caption": caption}
    if text is not None:
      record["text"] = np.asarray(text, np.float32)
    self._writer.write(serialization.msgpack_serialize(record))
    self.count += 1

  def close(self, metadata: dict) -> None:
    self._writer.close()
    self._partial.rename(self.path)
    if self.primary:
      (self.dir / METADATA).write_text(json.dumps(metadata, indent=2))

  def abort(self) -> None:
    """Drop this process's partial shard (the encode failed)."""
    self._writer.close()
    self._partial.unlink(missing_ok=True)


class LatentSource:
  """Random access over a latent cache: records {'video': latent [t, h, w, Z], 'label',
  'caption'[, 'text']}. 'video' holds latents so the packing pipeline treats it as a clip.
  Readers open lazily, so the source pickles into grain worker processes."""

  def __init__(self, path: str | Path):
    path = Path(path)
    if not (path / METADATA).is_file():
      raise FileNotFoundError(
          f"no latent cache at {path} (missing {METADATA}): write one with python -m src.encode --out {path}")
    self.metadata = json.loads((path / METADATA).read_text())
    self._files = sorted(str(p) for p in path.glob("latents-*.array_record"))
    if not self._files:
      raise FileNotFoundError(f"the latent cache {path} has no shard files")
    self._readers: dict[int, object] = {}
    sizes = [self._reader(i).num_records() for i in range(len(self._files))]
    self._starts = np.cumsum([0] + sizes)
    if self._starts[-1] == 0:
      raise ValueError(f"the latent cache {path} holds no records")

  def _reader(self, shard: int):
    if shard not in self._readers:
      self._readers[shard] = array_record_module.ArrayRecordReader(self._files[shard])
    return self._readers[shard]

  def __getstate__(self):
    return {**self.__dict__, "_readers": {}}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} cached latents")
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    local = int(index - self._starts[shard])
    record = serialization.msgpack_restore(self._reader(shard).read([local])[0])
    out = {"video": record["latent"], "label": int(record["label"]), "caption": record["caption"],
           "name": f"{Path(self._files[shard]).name}#{local}"}
    if "text" in record:
      out["text"] = record["text"]
    return out


VAE_ARCHITECTURE = ("in_channels", "base_dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample",
                    "latents_mean", "latents_std")


def cache_mismatch(path: str | Path, cfg) -> str | None:
  """Why the latent cache at `path` does not fit the run `cfg` (a Config), or None (also
  when there is no cache yet: the source says so). The latent channels must be the
  DiT's; with vae.enabled the run's VAE must be the one that encoded the cache (it
  decodes the samples, and data sizes are its pixels); umT5 caption embeddings must be
  of the run's width."""
  meta_path = Path(path) / METADATA
  if not meta_path.is_file():
    return None
  meta, m = json.loads(meta_path.read_text()), cfg.model
  if meta.get("z_dim") != m.in_channels:
    return f"the latent cache {path} holds {meta.get('z_dim')}-channel latents but model.in_channels={m.in_channels}"
  if cfg.vae.enabled and "vae" in meta:
    theirs, ours = meta["vae"], vars(cfg.vae)
    keys = [k for k in VAE_ARCHITECTURE if k in theirs and list(np.ravel(theirs[k])) != list(np.ravel(ours[k]))]
    if keys:
      return (f"the latent cache {path} was encoded with another VAE than this run's: "
              + ", ".join(f"vae.{k}={theirs[k]} there, {ours[k]} here" for k in keys)
              + " (set the cache's vae.* keys and its vae.checkpoint)")
  text = (meta.get("text_encoder"), meta.get("cond_dim"))
  if m.cond_dim and m.text_encoder == "umt5" and text != ("umt5", m.cond_dim):
    return (f"model.text_encoder=umt5 with model.cond_dim={m.cond_dim}, but the latent cache {path} holds "
            f"{meta.get('text_encoder')} captions of width {meta.get('cond_dim')}: encode it with the run's text keys")
  return None

