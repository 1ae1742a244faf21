"""What a compiled program's optimised HLO text says about communication: the collectives
it runs, how often (a while loop's body once per trip), and the bytes each moves per chip.

Used by `src.aot` on TPU programs compiled from a CPU host. Bytes are per chip and per
step, on the wire of a ring (or one-hop) algorithm for a replica group of g devices and
a per-device operand of b bytes:

| collective | bytes per chip |
| --- | --- |
| all-gather | b (g - 1): it receives every other shard |
| reduce-scatter | b (g - 1) / g |
| all-reduce | 2 b (g - 1) / g (a reduce-scatter and an all-gather) |
| all-to-all | b (g - 1) / g |
| collective-permute | b |

The TPU compiler emits FSDP's gradient reduce-scatters as `all-reduce-scatter` fusions (a
kCustom fusion around an all-reduce whose output is sliced to a shard); those all-reduces
are counted as the reduce-scatters they are.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape: 'f32[8,128]{1,0:T(8,128)}', a tuple of them, 'f8e4m3fn[4]'."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue  # token[], opaque: no data
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  op: str
  rest: str  # operands and attributes, as printed


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]

  def shapes(self) -> dict[str, str]:
    return {i.name: i.shape for i in self.instructions}


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
  """(computations by name, the entry's name) of HLO module text."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = comps.setdefault(m.group(1), Computation(m.group(1), []))
      entry = m.group(1) if line.startswith("ENTRY") else entry
      continue
    m = current is not None and _INSTRUCTION.match(line)
    if m:
      current.instructions.append(Instruction(*m.groups()))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def operands(inst: Instruction) -> list[str]:
  """Names of the instruction's operands (the text up to the closing parenthesis)."""
  depth, end = 1, 0
  for end, ch in enumerate(inst.rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", inst.rest[:end])


def callees(inst: Instruction) -> list[tuple[str, str]]:
  """(role, computation) pairs the instruction calls: fusion bodies, loop bodies and conditions, branches."""
  out = []
  for role, value in _CALLEES.findall(inst.rest):
    out += [(role, name) for name in re.findall(r"%?([\w.\-]+)", value.strip("{}"))]
  return out


def trip_count(inst: Instruction, caller: Computation, comps: dict[str, Computation]) -> int | None:
  """Iterations of a while loop: the compiler's `known_trip_count`, else read from a JAX-style
  condition `counter < N` (or `N > counter`) with the counter's start a constant in the loop's init tuple."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest)
  if m:
    return int(m.group(1))
  cond = comps.get(dict((r, c) for r, c in callees(inst)).get("condition", ""))
  if cond is None:
    return None
  by_name = {i.name: i for i in cond.instructions}
  for i in cond.instructions:
    if i.op != "compare":
      continue
    a, b = (by_name.get(n) for n in operands(i)[:2])
    direction = re.search(r"direction=(\w+)", i.rest).group(1)
    if direction in ("GT", "GE"):
      a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
    if direction not in ("LT", "LE") or a is None or b is None or b.op != "constant" or a.op != "get-tuple-element":
      continue
    bound = int(re.match(r"\s*(-?\d+)", b.rest).group(1)) + (direction == "LE")
    index = int(re.search(r"index=(\d+)", a.rest).group(1))
    return bound - _loop_start(inst, index, caller)
  return None


def _loop_start(inst: Instruction, index: int, caller: Computation) -> int:
  """The constant a while loop's counter (tuple element `index`) starts from; 0 when not a constant."""
  by_name = {i.name: i for i in caller.instructions}
  init = by_name.get((operands(inst) or [""])[0])
  if init is None or init.op != "tuple" or index >= len(operands(init)):
    return 0
  value = by_name.get(operands(init)[index])
  while value is not None and value.op == "copy":
    value = by_name.get(operands(value)[0])
  m = value is not None and value.op == "constant" and re.match(r"\s*(-?\d+)", value.rest)
  return int(m.group(1)) if m else 0


def multiplicities(comps: dict[str, Computation], entry: str) -> tuple[dict[str, int], list[str]]:
  """How many times each computation runs per execution of `entry` (a loop body: its trip count
  times its caller's), and the loops whose trip count could not be read (counted once)."""
  edges, unknown = {}, []  # caller -> [(callee, runs per caller run)]
  for name, comp in comps.items():
    for inst in comp.instructions:
      trips = 1
      if inst.op == "while":
        trips = trip_count(inst, comp, comps)
        if trips is None:
          unknown.append(inst.name)
          trips = 1
      edges[name] = edges.get(name, []) + [(callee, trips if role == "body" else 1) for role, callee in callees(inst)
                                           if role != "to_apply" and callee in comps]  # not reductions' scalar adds
  callers = {}
  for name, out in edges.items():
    for callee, _ in out:
      callers[callee] = callers.get(callee, 0) + 1
  times, ready = {entry: 1}, [entry]  # Kahn's order over the (acyclic) call graph: callers before callees
  while ready:
    name = ready.pop()
    for callee, n in edges.get(name, []):
      times[callee] = times.get(callee, 0) + times.get(name, 0) * n
      callers[callee] -= 1
      if not callers[callee]:
        ready.append(callee)
  return {k: v for k, v in times.items() if v}, unknown


def group_size_and_groups(inst: Instruction, devices: int) -> tuple[int, list[list[int]]]:
  """(devices in each replica group, the groups as partition ids). Formats: {{0,1},{2,3}}; iota
  [G,S]<=[dims]T(perm); mesh['a'=4,'b'=2] {'a'}; none or {} (all devices). A collective-permute's
  groups are its source-target pairs."""
  text = inst.rest
  if inst.op.startswith("collective-permute"):
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", text)
    pairs = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []
    return (2 if pairs else 1), pairs
  m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", text)
  if m:
    groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return len(groups[0]), groups
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if m:
    dims = [int(d) for d in m.group(3).split(",")]
    perm = [int(p) for p in m.group(4).split(",")] if m.group(4) else list(range(len(dims)))
    return int(m.group(2)), _iota_groups(dims, perm, int(m.group(2)))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
  if m:
    axes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
    chosen = set(re.findall(r"'(\w+)'", m.group(2)))
    perm = [i for i, (a, _) in enumerate(axes) if a not in chosen] + [i for i, (a, _) in enumerate(axes) if a in chosen]
    size = math.prod(n for a, n in axes if a in chosen)
    return size, _iota_groups([n for _, n in axes], perm, size)
  return devices, [list(range(devices))]


def _iota_groups(dims: list[int], perm: list[int], size: int) -> list[list[int]]:
  ids = list(range(math.prod(dims)))
  strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
  order = []
  for flat in range(len(ids)):  # the transposed array's elements in row-major order
    idx, rem = [], flat
    for d in reversed([dims[p] for p in perm]):
      idx.append(rem % d)
      rem //= d
    idx = idx[::-1]
    order.append(sum(idx[k] * strides[perm[k]] for k in range(len(perm))))
  return [order[i:i + size] for i in range(0, len(order), size)]


@dataclasses.dataclass
class Collective:
  kind: str  # one of KINDS (a fused all-reduce-scatter is a reduce-scatter)
  name: str
  computation: str
  times: int  # executions per step
  group: int  # devices per replica group
  operand_bytes: float  # per device, one execution
  dcn: bool  # a group spans slices

  @property
  def bytes_per_chip(self) -> float:
    g, b = self.group, self.operand_bytes
    if g <= 1:
      return 0.0
    wire = {"all-gather": b * (g - 1), "reduce-scatter": b * (g - 1) / g, "all-reduce": 2 * b * (g - 1) / g,
            "all-to-all": b * (g - 1) / g, "collective-permute": b}[self.kind]
    return wire * self.times


def collectives(hlo_text: str, devices: int, slice_of=None) -> tuple[list[Collective], list[str]]:
  """Every collective of a program over `devices` partitions (async start/done pairs once) with its
  executions per step, and the loops whose trip count is unknown. `slice_of`: partition id -> slice
  index, to tell the groups that cross the data-center network (DCN) from those inside a slice (ICI)."""
  comps, entry = parse(hlo_text)
  times, unknown = multiplicities(comps, entry)
  found = []
  for name, comp in comps.items():
    if name not in times:
      continue
    shapes = comp.shapes()
    for inst in comp.instructions:
      kind = inst.op.removesuffix("-start")
      if kind not in KINDS:
        continue
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"  # the TPU compiler's fused form: all-reduce, then the shard sliced out
      size = sum(shape_bytes(shapes[o]) for o in operands(inst) if o in shapes)
      group, groups = group_size_and_groups(inst, devices)
      dcn = bool(slice_of and groups and any(len({slice_of(d) for d in g}) > 1 for g in groups))
      found.append(Collective(kind, inst.name, name, times[name], group, size, dcn))
  return found, unknown


def summarise(found: list[Collective]) -> dict:
  """Per-kind totals: executions per step, and bytes per chip per step over ICI and DCN."""
  out = {}
  for kind in KINDS:
    mine = [c for c in found if c.kind == kind]
    out[kind] = dict(count=sum(c.times for c in mine),
                     ici_bytes=sum(c.bytes_per_chip for c in mine if not c.dcn),
                     dcn_bytes=sum(c.bytes_per_chip for c in mine if c.dcn))
  return out


def count_mosaic_kernels(hlo_text: str) -> int:
  """Pallas/Mosaic kernels (splash attention) in optimised TPU HLO: their custom calls."""
  return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text))
