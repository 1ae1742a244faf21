"""grain input pipelines: records -> host-local batches (docs/architecture.md, "Data").

Both pipelines, the packed token batches made here and the fixed-shape pixel clips of
`src.data.clips`, read one example stream (`example_stream`) and batch it in one kind of
iterator (`BatchIterator`), so that sharding, shuffling, decoding, transport, skip
counting and resume work the same way for both:

    source -> this host's shard -> shuffle(seed) -> repeat forever
           (mixture: each source so, then interleaved by weight)
           -> decode, sample frames, resize/crop, flip      [MapDataset, by index]
           -> per-record transform: here patchify, token drop
              (+ caption embedding)
           -> to_iter_dataset -> mp_prefetch (num_workers > 0)
           -> drop and count bad records; uint8 pixels to
              float32 [-1, 1]; here best-fit-decreasing
              packing of a buffered window into `rows` rows
              of L tokens                                   [main process]

Packing runs after the worker processes, as grain advises for stateful steps, so the
batches do not depend on `num_workers` (the workers' outputs are interleaved back into
the sequential order). The iterator's `get_state()`/`set_state()` resume exactly: the
state is the upstream position plus the stream indices of the examples still waiting
in the packing window, which are re-read by index on restore.

Bad records (see `video.SKIP_REASONS`) travel through the workers as markers and are
counted in the main process, so the counts (`skip_counts()` on the iterator) are exact
whatever the worker count, and are part of the saved state. Before any worker starts,
`probe` decodes records until one is usable: a source (or a mixture's component) with
none fails at start-up.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags

from src.batch import PackedBatch, row_shape
from src.config import DataConfig
from src.data.sources import caption_tokens, make_source, mixture_parts
from src.data.video import DECODE_SEED_OFFSET, ClipDecoder, to_unit_range
from src.models.patch import pack_rows, patchify, plan_rows

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 10_000  # a stream this bad has nothing left to train on
WARN_FIRST, WARN_EVERY = 10, 1000  # per reason: warn about the first few skips, then every n-th


@dataclass(frozen=True)
class ToTokens:
  """Record -> packable example: tokens, positions, grid, label (+ text embedding).

  With `token_drop` > 0 a random subset of the tokens is dropped (NaViT): the rest keep
  their positions and grid, so the model still knows where each token sits.
  """

  patch: tuple[int, int, int]
  text_len: int
  cond_dim: int
  token_drop: float = 0.0
  text_encoder: str = "precomputed"
  tokenizer: str = ""  # umT5 tokenizer directory (text_encoder umt5)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    if "skip" in record:
      return record  # counted after the workers
    tokens, positions, grid = patchify(record["video"], self.patch)
    if self.token_drop > 0:
      keep = max(1, int(round(len(tokens) * (1.0 - self.token_drop))))
      kept = np.sort(rng.permutation(len(tokens))[:keep])
      tokens, positions = tokens[kept], positions[kept]
    example = {
        "tokens": tokens if tokens.dtype == np.uint8 else tokens.astype(np.float32),  # uint8: see `_unit_range`
        "positions": positions,
        "grid": np.asarray(grid, np.int32),
        "label": np.int32(record["label"]),
    }
    if self.cond_dim > 0:
      example["text"] = caption_tokens(record, self.text_len, self.cond_dim, self.text_encoder,
                                       self.tokenizer)
    return example


class SkipCounter:
  """The records of a stream that arrive as skip markers (`video.SKIP_REASONS`): counted
  by reason, the first few of each reason and then every n-th logged. `position` is the
  stream index of the next record; both are part of an iterator's saved state."""

  def __init__(self, position: int = 0, counts: dict | None = None):
    self.position = position
    self.counts = collections.Counter(counts or {})  # reason -> records

  def next_usable(self, records) -> tuple[int, dict]:
    """(stream index, record) of the next usable record of iterator `records`."""
    for _ in range(MAX_CONSECUTIVE_SKIPS):
      record = next(records)
      index, self.position = self.position, self.position + 1
      if "skip" not in record:
        return index, record
      self._count(index, record)
    raise RuntimeError(f"data: {MAX_CONSECUTIVE_SKIPS} records in a row were unusable "
                       f"(skipped so far: {dict(self.counts)})")

  def _count(self, index: int, marker: dict) -> None:
    reason = marker["skip"]
    self.counts[reason] += 1
    n = self.counts[reason]
    if n <= WARN_FIRST or n % WARN_EVERY == 0:
      log.warning("data: skipped record %d %s (%s%s); %d skipped for %s so far", index, marker["name"], reason,
                  f": {marker['detail']}" if marker["detail"] else "", n, reason)


class Throughput:
  """Logs clips/s every `every` batches, and the share of that time the consumer
  spent waiting inside `next()` (near 0: the pipeline keeps up)."""

  def __init__(self, every: int):
    self.every = every
    self._reset()

  def _reset(self) -> None:
    self.start, self.batches, self.clips, self.waited = time.perf_counter(), 0, 0, 0.0

  def add(self, clips: int, waited: float, skipped: dict) -> None:
    self.batches, self.clips, self.waited = self.batches + 1, self.clips + clips, self.waited + waited
    if not self.every or self.batches < self.every:
      return
    elapsed = time.perf_counter() - self.start
    log.info("data: %.1f clips/s over %d batches, %.0f%% of the time waiting for data; skipped %s",
             self.clips / elapsed, self.batches, 100 * self.waited / elapsed, dict(skipped) or "none")
    self._reset()


class BatchIterator(grain.DatasetIterator):
  """Batches built in the main process from an `example_stream`: the base of both
  pipelines' iterators (packed rows here, fixed-shape clips in `src.data.clips`).

  The skip markers that come through the workers are counted here, so the counts
  (`skip_counts()`) are exact for any worker count; each batch is metered
  (`Throughput`). The state is the parent's position, the stream index of the next
  record and the counts; a subclass that holds examples between batches adds them.
  """

  def __init__(self, parent: grain.DatasetIterator, log_every: int = 0):
    super().__init__(parent)
    self._skips = SkipCounter()
    self._meter = Throughput(log_every)

  def __next__(self) -> Any:
    start = time.perf_counter()
    batch, examples = self._next_batch()
    self._meter.add(examples, time.perf_counter() - start, self._skips.counts)
    return batch

  def _next_batch(self) -> tuple[Any, int]:
    """(the next batch, the examples in it)."""
    raise NotImplementedError

  def _next_usable(self) -> tuple[int, dict]:
    """(stream index, record) of the next usable record; bad ones are counted."""
    return self._skips.next_usable(self._parent)

  def skip_counts(self) -> dict[str, int]:
    """Records skipped so far (over the whole run, resumes included), by reason."""
    return dict(self._skips.counts)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "next_index": self._skips.position,
            "skipped": dict(self._skips.counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._skips = SkipCounter(state["next_index"], state["skipped"])


def _unit_range(example: dict) -> dict:
  """Decoded pixels cross from the workers as uint8 (4x fewer bytes than float32) and
  become float32 in [-1, 1] here, in the main process."""
  return {**example, "tokens": to_unit_range(example["tokens"])}


class _PackIterator(BatchIterator):
  """Best-fit-decreasing packing of a buffered window of examples into `rows` rows.

  Each batch: top the buffer up to `buffer_tokens` tokens (and at least `rows`
  examples), place the overdue ones (waited `max_wait` batches) first and the rest
  largest first, each into the row it fills best; what fits nowhere waits for the next
  batch. The state adds the stream indices of the waiting examples, which are re-read
  by index from the random-access dataset on restore: resume is exact, whatever the
  worker count. Skipped records take a stream index too, so indices stay those of
  the dataset.
  """

  def __init__(self, parent, examples: grain.MapDataset, rows: int, seq_len: int,
               max_segments: int, buffer_tokens: int, max_wait: int, log_every: int = 0):
    super().__init__(parent, log_every)
    self._examples = examples
    self._rows, self._seq_len, self._max_segments = rows, seq_len, max_segments
    self._buffer_tokens, self._max_wait = buffer_tokens, max_wait
    self._pending: list[tuple[int, int, dict]] = []  # (stream index, batches waited, example)

  def _next_batch(self) -> tuple[PackedBatch, int]:
    tokens = sum(len(ex["tokens"]) for _, _, ex in self._pending)
    while tokens < self._buffer_tokens or len(self._pending) < self._rows:
      index, example = self._next_usable()
      self._pending.append((index, 0, _unit_range(example)))
      tokens += len(example["tokens"])
    rows = plan_rows([len(ex["tokens"]) for _, _, ex in self._pending], [age for _, age, _ in self._pending],
                     self._seq_len, self._max_segments, self._rows, self._max_wait)
    placed = sorted((r, idx, j) for j, ((idx, _, _), r) in enumerate(zip(self._pending, rows)) if r >= 0)
    if not placed:
      raise RuntimeError("packing placed no example: an example is larger than data.seq_len")
    batch = pack_rows([self._pending[j][2] for _, _, j in placed], self._seq_len, self._max_segments,
                      num_rows=self._rows, rows=[r for r, _, _ in placed])  # by row, then stream order
    taken = {j for _, _, j in placed}
    self._pending = [(idx, age + 1, ex) for j, (idx, age, ex) in enumerate(self._pending) if j not in taken]
    return batch, len(placed)

  def get_state(self) -> dict:
    return {**super().get_state(), "pending": [[idx, age] for idx, age, _ in self._pending]}

  def set_state(self, state: dict) -> None:
    super().set_state(state)
    self._pending = [(idx, age, _unit_range(self._examples[idx])) for idx, age in state["pending"]]


def allow_unparsed_absl_flags() -> None:
  """grain 0.2.18's mp_prefetch reads an absl flag, which fails unless flags were
  parsed (google/grain#1355, fixed after 0.2.18); programs without absl.app need this."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def host_stream(data_cfg: DataConfig, seed: int, spatial_multiple: int, split: str = "train",
                process_index: int = 0, process_count: int = 1, probe_with: ClipDecoder | None = None
                ) -> grain.MapDataset:
  """This host's endless stream of raw records: its shard of the source, shuffled,
  repeated; for a mixture, each component so, then interleaved by weight. With
  `probe_with`, each component is probed (see `probe`) before it is used."""
  def epochs(cfg: DataConfig, seed: int) -> grain.MapDataset:
    shard = grain.MapDataset.source(make_source(cfg, seed, spatial_multiple, split))[process_index::process_count]
    if not len(shard):
      raise ValueError(f"data.source={cfg.source} ({split}) has no record for process {process_index} "
                       f"of {process_count}")
    stream = shard.shuffle(seed).repeat()
    if probe_with is not None:
      probe(stream, probe_with, cfg)
    return stream

  if data_cfg.source != "mixture":
    return epochs(data_cfg, seed)
  parts = mixture_parts(data_cfg)
  return grain.MapDataset.mix([epochs(cfg, seed + i) for i, (cfg, _) in enumerate(parts)], [w for _, w in parts])


def probe(records: grain.MapDataset, decoder: ClipDecoder, data_cfg: DataConfig) -> None:
  """Fail at start-up, not hours into a run, when no record is usable: decode records
  in order until one is, at most `data.probe_records` of them."""
  if data_cfg.probe_records <= 0:
    return
  reasons = collections.Counter()
  for i in range(data_cfg.probe_records):
    record = decoder(records[i], np.random.default_rng(i))
    if "skip" not in record:
      return
    reasons[record["skip"]] += 1
  raise ValueError(
      f"data.source={data_cfg.source}: none of the first {data_cfg.probe_records} records is usable "
      f"(skipped: {dict(reasons)}). Check data.data_dir and the files; for a dataset without captions "
      "set data.require_caption=false.")


def host_rows(data_cfg: DataConfig, process_index: int, process_count: int) -> int:
  """Rows of this host's batches: its share of the global data.batch_size."""
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  return data_cfg.batch_size // process_count


def example_stream(data_cfg: DataConfig, decoder: ClipDecoder, transform: Callable[[dict, np.random.Generator], dict],
                   seed: int, spatial_multiple: int, rows: int, split: str = "train", process_index: int = 0,
                   process_count: int = 1) -> tuple[grain.MapDataset, grain.IterDataset]:
  """The examples of both pipelines: (by index, as a stream read ahead).

  This host's `host_stream` (probed with `decoder`), decoded after the shuffle so that
  each epoch draws new frames and crops, then `transform(record, rng)` per record;
  both pass skip markers through, to be counted by a `BatchIterator`. The stream reads
  `data.prefetch` batches of `rows` ahead, in `data.num_workers` processes if > 0.
  The random-access examples let an iterator re-read, on restore, ones it held.
  """
  records = host_stream(data_cfg, seed, spatial_multiple, split, process_index, process_count, probe_with=decoder)
  decoded = records.random_map(decoder, seed=seed + DECODE_SEED_OFFSET)
  examples = decoded.random_map(transform, seed=seed)
  buffer = data_cfg.prefetch * rows  # examples read ahead per process
  ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=min(1, buffer), prefetch_buffer_size=buffer))
  if data_cfg.num_workers > 0:
    allow_unparsed_absl_flags()
    options = grain.MultiprocessingOptions(num_workers=data_cfg.num_workers, per_worker_buffer_size=max(1, buffer))
    ds = ds.mp_prefetch(options)
  return examples, ds


def make_iterator(
    data_cfg: DataConfig,
    patch: Sequence[int],
    cond_dim: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    text_encoder: str = "precomputed",
    tokenizer: str = "",
) -> BatchIterator:
  """Endless iterator over this host's `PackedBatch`es of batch_size // process_count
  rows. Its `skip_counts()` gives the records skipped so far, by reason. Captions become
  byte ids with `text_encoder='bytes'`, umT5 ids with `umt5` (from `tokenizer`), else
  embeddings (see `caption_tokens`)."""
  rows = host_rows(data_cfg, process_index, process_count)
  seq_len, max_segments = row_shape(data_cfg, patch)
  multiple = max(patch[1:])
  decoder = ClipDecoder.from_config(data_cfg, multiple, patch[0], uint8=True)
  to_tokens = ToTokens(tuple(patch), data_cfg.text_len, cond_dim, data_cfg.token_drop, text_encoder,
                       tokenizer)
  examples, ds = example_stream(data_cfg, decoder, to_tokens, seed, multiple, rows, split, process_index,
                                process_count)
  log.info(
      "data: %s, host %d/%d, %d rows x %d tokens, <= %d examples per row, %d workers",
      data_cfg.source, process_index, process_count, rows, seq_len, max_segments, data_cfg.num_workers,
  )
  buffer_tokens = int(data_cfg.pack_buffer * rows * seq_len)
  return _PackIterator(iter(ds), examples, rows, seq_len, max_segments, buffer_tokens, data_cfg.pack_max_wait,
                       data_cfg.log_every)
