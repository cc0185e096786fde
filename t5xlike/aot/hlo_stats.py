"""What an optimised HLO module holds: collectives, custom calls, loop trip counts.

`hlo_stats(text)` reads the text of a compiled, SPMD-partitioned module
(`jax.stages.Compiled.as_text()`: one device's program) and counts, per
executed step, every collective by kind (all-gather, reduce-scatter,
all-reduce, all-to-all, collective-permute; their async `-start` forms
count once) and every custom call by target. An instruction inside a
`while` body counts as many times as the loop runs (scan over layers,
micro-batches): the trip count XLA records in the loop's backend config
(XLA:GPU), else the one its induction variable gives (libtpu prints no
backend config for loops: a counter starting at a constant, compared
`LT` with a constant in the condition, incremented by a constant); nested
loops multiply, and called computations (fusions, async computations,
conditionals' branches) inherit their caller's count.

The bytes of a collective are those of its full buffer on one device: the
larger of its operands' and its result's sizes (all-gather: the gathered
result; reduce-scatter: the operand before scattering; the others move
buffers of equal size), summed over executions. That is the data each
device sends or receives up to the factor (n - 1) / n of a ring over n
devices, or 2 (n - 1) / n for an all-reduce.

Collectives between TPU slices (multi-slice over the data-center network)
are not collective instructions: libtpu compiles them to host transfers of
the multi-slice ("megascale") runtime, a `send` / `recv` pair per buffer
whose `_xla_megascale_transfer_type` names the collective. Each `send` counts
as one collective of kind 'dcn-' + that type ('dcn-all-reduce'), with the
bytes of the buffer it sends (`HloStats.dcn_bytes`; `collective_bytes` is the
rest, the collectives over the chips' own links).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

#: Bytes per element of HLO's primitive types (sub-byte types rounded up to 1/2).
_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                      r"branch_computations|called_computations|async_execution_thread)="
                      r"(\{[^}]*\}|%[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
#: The prefix of the kinds of collectives between slices (`HloStats.dcn_bytes`).
DCN_PREFIX = "dcn-"


def shape_bytes(type_text: str) -> float:
  """Bytes of an HLO type: an array `bf16[8,128]{1,0}` or a tuple of them (summed)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _ITEM_BYTES:
      count = 1
      for dim in filter(None, dims.split(",")):
        count *= int(dim)
      total += count * _ITEM_BYTES[dtype]
  return total


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: name, result type (text), opcode, operand names, the text
  between its parentheses (a constant's literal), the rest, whether it is the ROOT."""
  name: str
  type_text: str
  opcode: str
  operands: tuple[str, ...]
  arguments: str
  attributes: str
  root: bool = False


def _split_type(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) tuple(%a, %b), ...' -> ('(f32[2], s32[])', 'tuple(%a, %b), ...')."""
  if rest.startswith("("):
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  type_text, _, tail = rest.partition(" ")
  return type_text, tail


def _parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  root, name, rest = match.groups()
  type_text, tail = _split_type(rest)
  opcode, paren, after = tail.partition("(")
  if not paren:
    return None
  depth, end = 1, len(after)
  for i, char in enumerate(after):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      end = i
      break
  operands = tuple(re.findall(r"%([\w.\-]+)", after[:end]))
  return Instruction(name, type_text, opcode.strip(), operands, after[:end], after[end + 1:],
                     bool(root))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
  """({computation name: its instructions}, the entry computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and " = " not in line.split("{")[0]:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is not None:
      if line.strip() == "}":
        current = None
        continue
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  return computations, entry


def _callees(instruction: Instruction) -> list[tuple[str, str]]:
  """(attribute, computation) pairs an instruction calls."""
  out = []
  for attribute, value in _CALLEES.findall(instruction.attributes):
    out += [(attribute, name) for name in re.findall(r"%([\w.\-]+)", value)]
  return out


@dataclasses.dataclass(frozen=True)
class HloStats:
  """Per-step counts of one device's program.

  Attributes:
    collectives: kind -> (executions per step, bytes per step on one device).
    custom_calls: target -> executions per step.
    kernel_custom_calls: target -> executions per step of the custom calls that are
      kernels of their own (outside fusions).
    kernel_custom_call_sites: target -> instructions (not executions) of those kernels
      in the executed computations.
    unknown_trip_counts: `while` loops without a known trip count (counted once).
    cycles_once, cycles_per_step: the sums of libtpu's per-kernel `estimated_cycles`
      (its backend config of fusions and other kernels; 0 elsewhere) over the executed
      computations, each counted once, and as often as it executes per step.
  """
  collectives: dict[str, tuple[int, float]]
  custom_calls: dict[str, int]
  kernel_custom_calls: dict[str, int]
  kernel_custom_call_sites: dict[str, int]
  unknown_trip_counts: int
  cycles_once: int = 0
  cycles_per_step: int = 0

  @property
  def loop_expansion(self) -> float | None:
    """cycles_per_step / cycles_once: how much loops multiply the work of a program whose
    loop bodies are counted once (None without cycle estimates)."""
    return self.cycles_per_step / self.cycles_once if self.cycles_once else None

  @property
  def collective_bytes(self) -> float:
    """Bytes per step of the collectives over the chips' own links (ICI, NVLink)."""
    return sum(size for kind, (_, size) in self.collectives.items()
               if not kind.startswith(DCN_PREFIX))

  @property
  def dcn_bytes(self) -> float:
    """Bytes per step one chip sends to other slices (multi-slice host transfers)."""
    return sum(size for kind, (_, size) in self.collectives.items()
               if kind.startswith(DCN_PREFIX))


def _executions(computations: dict[str, list[Instruction]], entry: str
                ) -> tuple[dict[str, int], set[str], int]:
  """(executions per step of each computation, the fused computations, loops without a
  known trip count). Computations are printed callees first: callers come later."""
  counts: dict[str, int] = {entry: 1}
  fused: set[str] = set()
  unknown = 0
  for name in reversed(list(computations)):
    times = counts.get(name, 0)
    for instruction in computations[name]:
      for attribute, callee in _callees(instruction):
        factor = 1
        if instruction.opcode == "while" and attribute == "body":
          trip = _trip_count(instruction, computations[name], computations)
          factor = 1 if trip is None else trip
          unknown += trip is None and times > 0
        if instruction.opcode == "fusion" or name in fused:
          fused.add(callee)
        counts[callee] = counts.get(callee, 0) + times * factor
  return counts, fused, unknown


def _constant(instruction: Instruction | None) -> int | None:
  """The value of an integer scalar constant (through copies), else None."""
  if instruction is None or instruction.opcode != "constant":
    return None
  try:
    return int(instruction.arguments)
  except ValueError:
    return None


def _trip_count(loop: Instruction, caller: list[Instruction],
                computations: dict[str, list[Instruction]]) -> int | None:
  """A `while` loop's trip count: XLA's `known_trip_count`, else its induction variable's
  (`start`, `limit` and `step` constants, see the module docstring); None if neither."""
  known = _TRIP_COUNT.search(loop.attributes)
  if known:
    return int(known.group(1))
  callees = dict(_callees(loop))
  condition, body = (computations.get(callees.get(k, ""), []) for k in ("condition", "body"))
  if not condition or not body or not loop.operands:
    return None

  def lookup(instructions: list[Instruction]):
    named = {i.name: i for i in instructions}
    def follow(name: str) -> Instruction | None:
      instruction = named.get(name)
      while instruction is not None and instruction.opcode == "copy" and instruction.operands:
        instruction = named.get(instruction.operands[0])
      return instruction
    return follow

  def element(instruction: Instruction | None) -> int | None:
    """The tuple index a get-tuple-element reads."""
    if instruction is None or instruction.opcode != "get-tuple-element":
      return None
    index = re.search(r"\bindex=(\d+)", instruction.attributes)
    return int(index.group(1)) if index else None

  in_condition, in_body, in_caller = lookup(condition), lookup(body), lookup(caller)
  for compare in condition:
    if compare.opcode != "compare" or len(compare.operands) != 2:
      continue
    left, right = (in_condition(op) for op in compare.operands)
    if "direction=LT" in compare.attributes:
      index, limit = element(left), _constant(right)
    elif "direction=GT" in compare.attributes:
      index, limit = element(right), _constant(left)
    else:
      continue
    init = in_caller(loop.operands[0])
    if index is None or limit is None or init is None or init.opcode != "tuple":
      return None
    start = _constant(in_caller(init.operands[index])) if index < len(init.operands) else None
    root = next((i for i in body if i.root and i.opcode == "tuple"), None)
    update = in_body(root.operands[index]) if root and index < len(root.operands) else None
    if start is None or update is None or update.opcode != "add":
      return None
    step = None
    for operand in update.operands:
      value = in_body(operand)
      carried = element(value)
      if carried == index:  # the counter itself
        continue
      if carried is not None and carried < len(init.operands):
        value = in_caller(init.operands[carried])  # a step carried through the loop
      step = _constant(value)
    if step is None or step <= 0:
      return None
    return max(0, -(-(limit - start) // step))
  return None


def hlo_stats(text: str) -> HloStats:
  """The `HloStats` of an optimised module's text (see the module docstring)."""
  computations, entry = parse_module(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  counts, fused, unknown = _executions(computations, entry)
  collectives: dict[str, list[float]] = {}
  custom_calls: dict[str, int] = {}
  kernels: dict[str, int] = {}
  sites: dict[str, int] = {}
  cycles_once = cycles_per_step = 0
  for name, instructions in computations.items():
    times = counts.get(name, 0)
    if not times:
      continue
    if name not in fused:
      cycles = sum(int(m.group(1)) for i in instructions
                   if (m := _CYCLES.search(i.attributes)))
      cycles_once, cycles_per_step = cycles_once + cycles, cycles_per_step + cycles * times
    types = {i.name: i.type_text for i in instructions}
    done = {i.operands[0]: i.type_text for i in instructions
            if i.opcode.endswith("-done") and i.operands}
    for instruction in instructions:
      kind = instruction.opcode.removesuffix("-start")
      dcn = _DCN_TRANSFER.search(instruction.attributes) if kind == "send" else None
      if dcn is not None:
        kind = DCN_PREFIX + dcn.group(1).lower().replace("_", "-")
        entry_ = collectives.setdefault(kind, [0, 0.0])
        entry_[0] += times
        entry_[1] += times * shape_bytes(types.get(instruction.operands[0], ""))
      elif kind in COLLECTIVES:
        result = done.get(instruction.name, instruction.type_text) if (
            instruction.opcode.endswith("-start")) else instruction.type_text
        operands = sum(shape_bytes(types.get(op, "")) for op in instruction.operands)
        entry_ = collectives.setdefault(kind, [0, 0.0])
        entry_[0] += times
        entry_[1] += times * max(shape_bytes(result), operands)
      elif instruction.opcode == "custom-call":
        target = _TARGET.search(instruction.attributes)
        key = target.group(1) if target else "?"
        custom_calls[key] = custom_calls.get(key, 0) + times
        if name not in fused:
          kernels[key] = kernels.get(key, 0) + times
          sites[key] = sites.get(key, 0) + 1
  return HloStats(collectives={k: (int(v[0]), float(v[1])) for k, v in collectives.items()},
                  custom_calls=custom_calls, kernel_custom_calls=kernels,
                  kernel_custom_call_sites=sites, unknown_trip_counts=int(unknown),
                  cycles_once=cycles_once, cycles_per_step=cycles_per_step)


def count_matching(counts: dict[str, int], needles: Iterable[str]) -> int:
  """Executions of the custom calls whose target contains any of `needles`."""
  return sum(n for target, n in counts.items() if any(s in target for s in needles))
