"""Communication volume of a compiled program, read from its optimised HLO text (survey §9.1.5).

Every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute is found, async
start/done pairs are counted once (at the start), and ops inside while loops (scanned layers,
microbatch loops) are multiplied by the loop's trip count when XLA knows it
(`known_trip_count`). One exception: the TPU compiler overlaps a collective with a loop of compute
(e.g. the next layer's weight all-gather with a windowed-einsum loop of this one) by placing it in
an `async_collective_fusion` inside the loop body that carries its progress from iteration to
iteration (the fusion's outputs include the partial result and step counters): it runs once per
execution of the loop, not once per iteration, and is counted so. Counting it per iteration made a
llama2-7b FSDP step on v5e-16 gather 100 GiB per device instead of 26 GiB. Two figures per op,
both per device:

  bytes       the size of the logical buffer the collective works on: the operand of an
              all-reduce, all-to-all or collective-permute, the gathered output of an all-gather,
              the unscattered input of a reduce-scatter.
  link_bytes  what a device sends under the bandwidth-optimal ring algorithms, with N devices in
              the group: all-reduce 2(N-1)/N · bytes, all-gather, reduce-scatter and all-to-all
              (N-1)/N · bytes, collective-permute bytes.

XLA:CPU does not form reduce-scatters (an FSDP gradient is all-reduced and then sliced there);
TPU and GPU compilers do, so the same program counts differently per backend.
"""

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
  r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# A TPU collective overlapped with a loop, run in steps over its iterations (see the docstring).
_STEPPED = "async_collective_fusion"


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of the program.

  Attributes:
    kind: One of KINDS.
    name: The HLO instruction name.
    computation: The HLO computation holding it.
    group_size: Devices in each replica group.
    bytes: Logical buffer bytes per execution (see the module docstring).
    count: Executions per program run (trip counts of enclosing loops multiplied).
  """

  kind: str
  name: str
  computation: str
  group_size: int
  bytes: float
  count: int

  @property
  def link_bytes(self) -> float:
    """Bytes a device sends per execution under ring algorithms."""
    n = self.group_size
    if self.kind == "collective-permute":
      return self.bytes
    if n <= 1:
      return 0.0
    factor = 2 * (n - 1) / n if self.kind == "all-reduce" else (n - 1) / n
    return factor * self.bytes


def _dtype_bytes(dtype: str) -> float:
  if dtype in _DTYPE_BYTES:
    return _DTYPE_BYTES[dtype]
  if dtype.startswith("f8") or dtype.startswith("s8") or dtype.startswith("u8"):
    return 1
  raise ValueError(f"unknown HLO element type {dtype!r}")


def _shapes(text: str) -> list[float]:
  """Byte sizes of every array shape in `text` (a result type, possibly a tuple)."""
  return [
    math.prod(int(d) for d in dims.split(",") if d) * _dtype_bytes(dtype)
    for dtype, dims in _SHAPE.findall(text)
  ]


def _split_result(rest: str) -> tuple[str, str, str]:
  """'(f32[2], f32[4]) all-gather-start(%x), ...' -> (result type, opcode, remainder)."""
  if rest.startswith("("):
    depth, end = 0, len(rest) - 1
    for pos, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        end = pos
        break
    result, tail = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    result, _, tail = rest.partition(" ")
  opcode = tail.split("(", 1)[0].strip()
  return result, opcode, tail


def _group_size(attrs: str, num_partitions: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['data'=2,'fsdp'=4] {'fsdp'}: the product of the named axes.
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:  # Iota form [groups, size]<=[...].
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([d for d in m.group(1).split(",") if d.strip()])
  return num_partitions  # replica_groups={}: one group of every device.


def _buffer_bytes(kind: str, opcode: str, result: str, group: int) -> float:
  sizes = _shapes(result)
  if opcode.endswith("-start"):
    if kind == "all-gather":  # (operands..., outputs...)
      sizes = sizes[len(sizes) // 2 :]
    elif kind == "collective-permute":  # (operand, output, context scalars...)
      sizes = sizes[:1]
  total = float(sum(sizes))
  return total * group if kind == "reduce-scatter" else total


def parse_hlo(text: str) -> list[Collective]:
  """Every collective in an HLO module's text, with its execution count.

  Args:
    text: `compiled.as_text()` (optimised HLO).

  Returns:
    One `Collective` per instruction (async pairs once).
  """
  m = re.search(r"num_partitions=(\d+)", text)
  num_partitions = int(m.group(1)) if m else 1
  ops: dict[str, list] = defaultdict(list)  # computation -> [(kind, name, group, bytes)]
  calls: dict[str, list] = defaultdict(list)  # computation -> [(callee, factor or condition)]
  constants: dict[str, dict] = defaultdict(dict)  # computation -> {name: integer constant}
  limits: dict[str, int] = {}  # loop condition computation -> N of its `i < N` root
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        entry = current if m.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, rest = m.groups()
    result, opcode, tail = _split_result(rest)
    const = re.match(r"constant\((-?\d+)\)", tail)
    if const and re.fullmatch(r"[su]\d+\[\]", result.split("{")[0]):
      constants[current][name] = int(const.group(1))
    if opcode == "compare" and "direction=LT" in tail and line.lstrip().startswith("ROOT"):
      operands = re.findall(r"%([\w.\-]+)", tail.split(")", 1)[0])
      if len(operands) == 2 and operands[1] in constants[current]:
        limits[current] = constants[current][operands[1]]
    trip = _TRIP.search(tail)
    found = dict(_CALLS.findall(tail))
    for attr, callee in _CALLS.findall(tail):
      if attr == "condition":
        continue
      if attr == "body":
        # XLA:CPU/GPU annotate known_trip_count; TPU does not: then read the condition's
        # `i < N` (loops from jax start at 0 and step by 1).
        factor = int(trip.group(1)) if trip else ("?", found.get("condition"))
      elif callee.startswith(_STEPPED):
        factor = "once per loop"
      else:
        factor = 1
      calls[current].append((callee, factor))
    for branch_list in _BRANCHES.findall(tail):
      calls[current].extend((b.strip().lstrip("%"), 1) for b in branch_list.split(",") if b)
    kind = opcode.removesuffix("-start")
    if kind in KINDS and not opcode.endswith("-done"):
      group = _group_size(tail, num_partitions)
      ops[current].append((kind, name, group, _buffer_bytes(kind, opcode, result, group)))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  counts: dict[str, int] = defaultdict(int)

  def visit(comp: str, times: int, trip: int = 1, depth: int = 0):
    """Adds `times` executions of `comp`; `trip` is the trip count of the innermost loop."""
    if depth > 64 or times == 0:
      return
    counts[comp] += times
    for callee, factor in calls.get(comp, ()):
      if factor == "once per loop":  # Stepped over the iterations of the enclosing loop.
        visit(callee, max(times // trip, 1), 1, depth + 1)
        continue
      if isinstance(factor, tuple):  # Trip count from the loop condition (1 if unreadable).
        factor = limits.get(factor[1], 1)
      inner = factor if factor != 1 else trip  # A body starts a loop; calls stay in theirs.
      visit(callee, times * factor, inner, depth + 1)

  visit(entry, 1)
  return [
    Collective(kind, name, comp, group, nbytes, counts[comp])
    for comp, found in ops.items()
    for kind, name, group, nbytes in found
    if counts[comp]
  ]


def comm_bytes(compiled_or_text) -> dict:
  """Collective bytes per program run, by kind.

  Args:
    compiled_or_text: A `jax.stages.Compiled` or its `as_text()`.

  Returns:
    {"bytes": {kind: bytes}, "link_bytes": {kind: bytes}, "ops": {kind: executions},
    "total_bytes": float, "total_link_bytes": float}; every kind is present (0 if absent).
  """
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  out = {"bytes": dict.fromkeys(KINDS, 0.0), "link_bytes": dict.fromkeys(KINDS, 0.0)}
  out["ops"] = dict.fromkeys(KINDS, 0)
  for op in parse_hlo(text):
    out["bytes"][op.kind] += op.bytes * op.count
    out["link_bytes"][op.kind] += op.link_bytes * op.count
    out["ops"][op.kind] += op.count
  out["total_bytes"] = sum(out["bytes"].values())
  out["total_link_bytes"] = sum(out["link_bytes"].values())
  return out


def per_step(compiled, steps_per_call: int = 1) -> dict | None:
  """Collective bytes per train step by kind (plus totals), for the efficiency report.

  Args:
    compiled: The compiled train step (running `steps_per_call` steps), or None.
    steps_per_call: Steps per program run.

  Returns:
    {kind: bytes, "total": bytes, "ring_link_total": bytes, "ops": executions}, or None without
    a program.
  """
  if compiled is None:
    return None
  found = comm_bytes(compiled)
  k = max(steps_per_call, 1)
  out = {kind: found["bytes"][kind] / k for kind in KINDS}
  out["total"] = found["total_bytes"] / k
  out["ring_link_total"] = found["total_link_bytes"] / k
  out["ops"] = sum(found["ops"].values()) / k
  return out
