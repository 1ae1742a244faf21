"""Safetensors checkpoints read straight into sharded jax arrays (model-agnostic).

A checkpoint is one `<name>.safetensors` file, or shards listed by
`<name>.safetensors.index.json` (the Hugging Face / diffusers layouts). An importer
says where every target parameter comes from with a `Source`: one source tensor
reshaped and transposed (`tensor`, `linear`), or one per layer stacked along a leading
layer axis (`stack`). `load` checks that every source tensor exists with the expected
shape and is used exactly once (a `WeightsError` naming the tensor otherwise), then
builds each array with `jax.make_array_from_callback`. Its callback maps a device's
index (slices in OUR layout) back to the slices of the source tensor(s) and reads only
those through safetensors' memory-mapped `get_slice`, once per distinct block, so each
process reads and allocates only the bytes its devices hold, never a whole tensor for
one shard.
`to_tensors` is the inverse (our arrays -> source tensors), for writing checkpoints.

Dtypes numpy lacks (bf16, fp8) cannot come through safetensors' numpy `get_slice`;
they are read from a `np.memmap` of the same bytes with the ml_dtypes type (jax's).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from src.pretrained import WeightsError

log = logging.getLogger(__name__)

# Safetensors dtypes that numpy has no type for, read through np.memmap instead
# (jnp.bfloat16 etc. are the ml_dtypes numpy types).
MEMMAP_DTYPES = {"BF16": jnp.bfloat16, "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}
HEADER_BYTES = 8  # a safetensors file opens with its little-endian u64 header length


@dataclasses.dataclass(frozen=True)
class View:
  """A target array as a source tensor reshaped, transposed and reshaped again:
  target = source.reshape(flat(split)).transpose(perm), then consecutive axes merged
  (`merge`: how many transposed axes make each target axis; None: none merged).
  `split` holds, for each source axis, the dims it is reshaped into (a fused [N*Dh]
  axis is (N, Dh)). E.g. a Conv3d weight [D, C, kt, kh, kw] as a kernel [kt*kh*kw*C, D]
  is perm (2, 3, 4, 1, 0), merge (4, 1)."""

  name: str
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  merge: tuple[int, ...] | None = None

  @property
  def source_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(group) for group in self.split)

  @property
  def unmerged_shape(self) -> tuple[int, ...]:
    flat = [d for group in self.split for d in group]
    return tuple(flat[p] for p in self.perm)

  @property
  def shape(self) -> tuple[int, ...]:
    dims = self.unmerged_shape
    if self.merge is None:
      return dims
    bounds = list(itertools.accumulate((0,) + self.merge))
    return tuple(math.prod(dims[a:b]) for a, b in zip(bounds, bounds[1:]))


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one target array comes from: one view, or (stacked) one per index of the
  target's leading axis (layers)."""

  views: tuple[View, ...]
  stacked: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    return ((len(self.views),) if self.stacked else ()) + self.views[0].shape


def tensor(name: str, shape: Sequence[int]) -> Source:
  """A source tensor taken as it is."""
  return Source((View(name, tuple((d,) for d in shape), tuple(range(len(shape)))),))


def linear(name: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> Source:
  """A torch `nn.Linear` weight [prod(out), prod(in)] as our kernel [*in, *out]
  (`x @ kernel`): e.g. q as [embed, heads, head_dim] from [heads*head_dim, embed]."""
  n_in, n_out = len(in_shape), len(out_shape)
  perm = tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))
  return Source((View(name, (tuple(out_shape), tuple(in_shape)), perm),))


def stack(sources: Sequence[Source]) -> Source:
  """Per-layer sources of equal shape as one target [layers, ...]."""
  shapes = {s.shape for s in sources}
  assert len(shapes) == 1 and not any(s.stacked for s in sources), shapes
  return Source(tuple(s.views[0] for s in sources), stacked=True)


class Checkpoint:
  """The tensors of one safetensors checkpoint, read lazily by slice. `names` maps
  each tensor to its file, `shapes` to its shape; `bytes_read` counts what was read."""

  def __init__(self, directory: str | Path, filename: str):
    self.directory = Path(directory)
    index = self.directory / f"{filename}.index.json"
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (self.directory / filename).is_file():
      files = [filename]
    else:
      raise FileNotFoundError(f"{self.directory}: no {filename} (or {index.name}).")
    self.names: dict[str, Path] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    self._handles = {}
    self.bytes_read = 0
    for file in files:
      self._scan(self.directory / file)

  def _scan(self, path: Path) -> None:
    if not path.is_file():
      raise WeightsError(f"{path}: listed in the index but missing.")
    handle = self._handles[path] = safe_open(path, framework="numpy")
    for name in handle.keys():
      if name in self.names:
        raise WeightsError(f"tensor '{name}' is in both {self.names[name].name} and {path.name}.")
      piece = handle.get_slice(name)
      self.names[name], self.shapes[name], self.dtypes[name] = path, tuple(piece.get_shape()), piece.get_dtype()

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` (one slice per axis) of tensor `name`, and only that."""
    if self.dtypes[name] in MEMMAP_DTYPES:
      block = np.array(self._memmap(name)[index])
    else:
      block = self._handles[self.names[name]].get_slice(name)[index]
    self.bytes_read += block.nbytes
    return block

  def _memmap(self, name: str) -> np.ndarray:
    path = self.names[name]
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(HEADER_BYTES), "little")
      begin = json.loads(f.read(size))[name]["data_offsets"][0]
    return np.memmap(path, dtype=MEMMAP_DTYPES[self.dtypes[name]], mode="r", offset=HEADER_BYTES + size + begin,
                     shape=self.shapes[name])

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def __enter__(self) -> Checkpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _label(key: Hashable) -> str:
  return ".".join(map(str, key)) if isinstance(key, tuple) else str(key)


def check(ckpt: Checkpoint, sources: Mapping[Hashable, Source], ignore: Collection[str] = ()) -> None:
  """WeightsError unless every source tensor is present with the expected shape, none
  is used twice, and every tensor of the checkpoint is used (`ignore`: names that may
  be present and are not read, e.g. a tied duplicate)."""
  used: dict[str, Hashable] = {}
  for key, source in sources.items():
    for view in source.views:
      if view.name in used:
        raise WeightsError(f"tensor '{view.name}' is mapped to both {_label(used[view.name])} and {_label(key)}.")
      used[view.name] = key
      if view.name not in ckpt.shapes:
        raise WeightsError(f"missing tensor '{view.name}' (for parameter {_label(key)} of shape {source.shape}) "
                           f"in {ckpt.directory}.")
      if ckpt.shapes[view.name] != view.source_shape:
        raise WeightsError(f"tensor '{view.name}' has shape {ckpt.shapes[view.name]}; parameter {_label(key)} "
                           f"of shape {source.shape} needs {view.source_shape}.")
  unexpected = sorted(set(ckpt.shapes) - set(used) - set(ignore))
  if unexpected:
    raise WeightsError(f"unexpected tensor(s) in {ckpt.directory} not used by the model: {', '.join(unexpected[:10])}"
                       + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))


def _runs(dims: tuple[int, ...], bounds: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """Contiguous [start, stop) ranges of a fused axis of `dims` (row-major) that hold
  the sub-block `bounds` (one (start, stop) per dim), in order: one range per index
  of the dims before the last partial one (the dims after it are whole)."""
  strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
  k = max([i for i, (b, d) in enumerate(zip(bounds, dims)) if b != (0, d)], default=0)
  runs = []
  for outer in itertools.product(*(range(a, b) for a, b in bounds[:k])):
    base = sum(i * s for i, s in zip(outer, strides))
    runs.append((base + bounds[k][0] * strides[k], base + bounds[k][1] * strides[k]))
  return runs


def _read_runs(ckpt: Checkpoint, name: str, runs: list[list[tuple[int, int]]]) -> np.ndarray:
  """The ranges `runs` (per source axis) of tensor `name`, concatenated per axis."""
  if all(len(r) == 1 for r in runs):
    return ckpt.read(name, tuple(slice(*r[0]) for r in runs))
  placed = [list(zip(itertools.accumulate([0] + [b - a for a, b in r]), r)) for r in runs]  # (offset, run)
  out = None
  for combo in itertools.product(*placed):
    block = ckpt.read(name, tuple(slice(a, b) for _, (a, b) in combo))
    if out is None:
      out = np.empty([sum(b - a for a, b in r) for r in runs], block.dtype)
    out[tuple(slice(o, o + b - a) for o, (a, b) in combo)] = block
  return out


def _unmerge(view: View, bounds: Sequence[tuple[int, int]]):
  """Bounds per target axis -> (bounds per unmerged axis, slices of the merged block to
  keep). A merged axis is read whole unless the bounds cover all of it: its blocks
  are not rectangles of the unmerged axes (it is never sharded in our layouts)."""
  if view.merge is None:
    return list(bounds), None
  dims, out, keep, pos = view.unmerged_shape, [], [], 0
  for (start, stop), count in zip(bounds, view.merge):
    if count == 1:
      out.append((start, stop))
      keep.append(slice(None))
    else:
      out += [(0, d) for d in dims[pos:pos + count]]
      keep.append(slice(start, stop))
    pos += count
  return out, tuple(keep)


def _read_view(ckpt: Checkpoint, view: View, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
  """The block `bounds` (per target axis) of `view`'s target, from its source's slices."""
  bounds, keep = _unmerge(view, bounds)
  flat_bounds = [None] * len(view.perm)
  for axis, p in enumerate(view.perm):
    flat_bounds[p] = bounds[axis]
  runs, pos = [], 0
  for group in view.split:
    runs.append(_runs(group, flat_bounds[pos:pos + len(group)]))
    pos += len(group)
  block = _read_runs(ckpt, view.name, runs)  # source layout
  block = block.reshape([b - a for a, b in flat_bounds]).transpose(view.perm)
  if keep is None:
    return block
  starts = list(itertools.accumulate((0,) + view.merge))
  return block.reshape([math.prod(block.shape[a:b]) for a, b in zip(starts, starts[1:])])[keep]


def _read_block(ckpt: Checkpoint, source: Source, dtype, index: tuple[slice, ...]) -> np.ndarray:
  """make_array_from_callback's callback: one device's block of the target."""
  bounds = []
  for s, dim in zip(index, source.shape):
    start, stop, step = s.indices(dim)
    assert step == 1, index
    bounds.append((start, stop))
  if not source.stacked:
    return np.ascontiguousarray(_read_view(ckpt, source.views[0], bounds), dtype)
  (first, last), rest = bounds[0], bounds[1:]
  out = np.empty([last - first] + [b - a for a, b in rest], dtype)
  for i, view in enumerate(source.views[first:last]):
    out[i] = _read_view(ckpt, view, rest)
  return out


def _once_per_block(read):
  """`read`, called once per distinct index: make_array_from_callback asks once per
  device and holds every answer until it places them, so devices holding the same
  block (replicas over data or tensor) would otherwise read and hold it again each."""
  blocks = {}

  def cached(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in blocks:
      blocks[key] = read(index)
    return blocks[key]

  return cached


def load(ckpt: Checkpoint, sources: Mapping[Hashable, Source], targets: Mapping[Hashable, jax.ShapeDtypeStruct],
         ignore: Collection[str] = ()) -> dict[Hashable, jax.Array]:
  """Arrays of `targets` (ShapeDtypeStructs carrying shardings) read from `ckpt` by
  `sources`, each device's block read alone. See `check` for what is an error."""
  if set(sources) != set(targets):
    raise ValueError(f"sources and targets differ: {sorted(map(_label, set(sources) ^ set(targets)))}")
  check(ckpt, sources, ignore)
  arrays = {}
  for key, target in targets.items():
    if sources[key].shape != tuple(target.shape):
      raise ValueError(f"{_label(key)}: the source gives {sources[key].shape}, the target is {target.shape}.")
    read = functools.partial(_read_block, ckpt, sources[key], target.dtype)
    arrays[key] = jax.make_array_from_callback(target.shape, target.sharding, _once_per_block(read))
  log.info("read %.1f MB from %d tensor(s) in %s", ckpt.bytes_read / 1e6, len(ckpt.shapes), ckpt.directory)
  return arrays


def to_tensors(sources: Mapping[Hashable, Source], arrays: Mapping[Hashable, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `load`: our (host) arrays as the source tensors, by name."""
  if set(sources) != set(arrays):
    raise ValueError(f"sources and arrays differ: {sorted(map(_label, set(sources) ^ set(arrays)))}")
  tensors = {}
  for key, source in sources.items():
    value = np.asarray(arrays[key])
    if value.shape != source.shape:
      raise ValueError(f"{_label(key)}: array of shape {value.shape}, the source layout needs {source.shape}.")
    for view, layer in zip(source.views, value if source.stacked else [value]):
      layer = layer.reshape(view.unmerged_shape)
      tensors[view.name] = np.ascontiguousarray(layer.transpose(np.argsort(view.perm)).reshape(view.source_shape))
  return tensors
