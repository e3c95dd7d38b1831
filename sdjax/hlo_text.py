"""Reading a compiled XLA program's HLO text (`compiled.as_text()`): its computations, how often each runs,
and the work inside loops that XLA's cost analysis leaves out.

XLA's `cost_analysis()` counts a `while` loop's body once, however many times it runs: a step whose layers
run under `nn.scan` (`model.scan_layers`) reports a fraction of its FLOPs (a 10-layer scanned stack: a tenth of
its matmuls). JAX offers no per-computation costs, so this module reads the loops' trip counts off the text
(XLA:CPU writes `known_trip_count`; libtpu does not, its loop condition compares the counter with a
constant) and counts what the bodies do: matmul and convolution FLOPs from their shapes, HBM bytes from each
top-level instruction's operands and result, as XLA's analysis does (a dynamic slice of a stacked buffer reads
the slice, an in-place update writes the update). `sdjax.roofline` adds `(trips - 1)` times those to the cost
analysis; `sdjax.models.tpu_attention` multiplies kernel calls found inside loops.

No JAX or XLA API exposes this (jax 0.10-0.12), hence a text reader; it reads what it recognises and counts
nothing it does not (an unknown trip count counts a loop once, as XLA does)."""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_NAME = re.compile(r"%([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"(\{[^}]*\}|%[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_INT_CONSTANT = re.compile(r"[su](?:8|16|32|64)\[\]\S*\s+constant\((\d+)\)")
# Instructions that move no data of their own (views, tuples, control flow whose callees are counted).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "optimization-barrier"}


def array_bytes(shapes: str) -> int:
    """Bytes of every array type written in `shapes` ("f32[4,8]{1,0}", a tuple of them, ...)."""
    return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in ARRAY.findall(shapes) if dtype in DTYPE_BYTES)


def _dims(shape: str) -> list[int]:
    found = ARRAY.search(shape)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type as written: "f32[64,128]{1,0}", or a tuple "(s32[], ...)"
    opcode: str
    operands: list[str]  # names of the operand instructions
    attributes: str  # the rest of the line: dims, callees, backend config
    line: str


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]

    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> Instruction | None:
    head = _INSTRUCTION.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    close = _balanced(rest, paren)
    return Instruction(name=head.group(1), shape=shape, opcode=rest[:paren], line=line,
                       operands=_NAME.findall(rest[paren:close]), attributes=rest[close:])


def parse(hlo_text: str) -> tuple[dict[str, Computation], str | None]:
    """The computations of a compiled program's text, by name, and the entry computation's name."""
    computations: dict[str, Computation] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and current is None:
            current = Computation(header.group(1), [])
            computations[current.name] = current
            if line.startswith("ENTRY"):
                entry = current.name
        elif line.strip() == "}":
            current = None
        elif current is not None and (instruction := _parse_instruction(line)):
            current.instructions.append(instruction)
    return computations, entry


def callees(instruction: Instruction) -> list[str]:
    names = []
    for group in _CALLEES.findall(instruction.attributes):
        names += _NAME.findall(group)
    return names


def trip_count(loop: Instruction, computations: dict[str, Computation]) -> int | None:
    """How often a `while` runs its body: XLA's `known_trip_count` where written, else the constant its
    condition compares the counter with (JAX's loops count from 0 up to it by 1), else None."""
    known = _TRIP_COUNT.search(loop.attributes)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", loop.attributes)
    if not condition or condition.group(1) not in computations:
        return None
    pending, constants = [condition.group(1)], []
    while pending:  # the condition and whatever it calls (a fused compare)
        computation = computations.get(pending.pop())
        if computation is None:
            continue
        for instruction in computation.instructions:
            if instruction.opcode == "constant":
                constants += [int(c) for c in _INT_CONSTANT.findall(instruction.line)]
            pending += callees(instruction)
    return constants[0] if len(constants) == 1 else None


def executions(computations: dict[str, Computation], entry: str) -> dict[str, int]:
    """How many times each computation runs per run of the program: loop bodies (and conditions) times their
    trip counts, nested loops multiplied; fused and called computations as often as their callers."""
    times: dict[str, int] = {}

    def visit(name: str, count: int) -> None:
        if name not in computations:
            return
        times[name] = times.get(name, 0) + count
        for instruction in computations[name].instructions:
            trips = trip_count(instruction, computations) if instruction.opcode == "while" else None
            for callee in callees(instruction):
                visit(callee, count * (trips or 1))

    visit(entry, 1)
    return times


_WINDOW = re.compile(r"window=\{([^}]*)\}")


def _window(attributes: str, rank: int) -> dict[str, list[int]]:
    """A convolution's window per spatial dimension: stride, padding (low), lhs and rhs dilation."""
    found = _WINDOW.search(attributes)
    fields = dict(item.split("=", 1) for item in found.group(1).split() if "=" in item) if found else {}

    def values(key, default):
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank

    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * rank
    return {"stride": values("stride", 1), "pad_low": pads,
            "lhs_dilate": values("lhs_dilate", 1), "rhs_dilate": values("rhs_dilate", 1)}


def _reads_of_real_input(in_size: int, out_size: int, window: int, stride: int, pad_low: int, lhs_dilate: int,
                         rhs_dilate: int) -> int:
    """How many (output position, window position) pairs of one spatial dimension land on an input element
    rather than on padding or a hole of the input's dilation: the multiply-adds XLA's cost analysis counts."""
    extent = (in_size - 1) * lhs_dilate + 1  # the dilated input, before padding
    pairs = 0
    for k in range(window):
        offset = k * rhs_dilate - pad_low  # input position of output 0 at window position k
        if lhs_dilate == 1:
            first = max(0, math.ceil(-offset / stride))
            last = min(out_size - 1, math.floor((extent - 1 - offset) / stride))
            pairs += max(0, last - first + 1)
        else:
            pairs += sum(1 for o in range(out_size)
                         if 0 <= o * stride + offset < extent and (o * stride + offset) % lhs_dilate == 0)
    return pairs


def _convolution_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """2 x output batch x output features x kernel input features x, per spatial dimension, the (output,
    window) position pairs that read real input: XLA's count for a convolution. (TPU programs write matmuls
    as convolutions too, batched ones with the batch as a padded spatial window: counting every window
    position there would count the padding, 8x too much in a measured attention matmul.)"""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
    if not labels or len(instruction.operands) < 2:
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    lhs, kernel = _dims(shapes.get(instruction.operands[0], "")), _dims(shapes.get(instruction.operands[1], ""))
    out = _dims(instruction.shape)
    if not (len(lhs) == len(lhs_labels) and len(kernel) == len(kernel_labels) == len(out_labels) == len(out)):
        return 0.0
    spatial = sorted(label for label in out_labels if label.isdigit())
    window = _window(instruction.attributes, len(spatial))
    flops = 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")]
    for d, label in enumerate(spatial):
        flops *= _reads_of_real_input(lhs[lhs_labels.index(label)], out[out_labels.index(label)],
                                      kernel[kernel_labels.index(label)], window["stride"][d],
                                      window["pad_low"][d], window["lhs_dilate"][d], window["rhs_dilate"][d])
    return flops


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    if not contracting or not instruction.operands:
        return 0.0
    lhs = _dims(shapes.get(instruction.operands[0], ""))
    dims = [int(d) for d in contracting.group(1).split(",") if d]
    if any(d >= len(lhs) for d in dims):
        return 0.0
    return 2.0 * math.prod(_dims(instruction.shape)) * math.prod(lhs[d] for d in dims)


def computation_flops(computation: Computation) -> float:
    """The matmul and convolution FLOPs written in one computation (not its callees)."""
    shapes = {i.name: i.shape for i in computation.instructions}
    total = 0.0
    for instruction in computation.instructions:
        if instruction.opcode == "dot":
            total += _dot_flops(instruction, shapes)
        elif instruction.opcode == "convolution":
            total += _convolution_flops(instruction, shapes)
    return total


def _parameters(computation: Computation) -> dict[int, str]:
    """A fused computation's parameters: number -> name."""
    found = {}
    for instruction in computation.instructions:
        number = re.search(r"parameter\((\d+)\)", instruction.line) if instruction.opcode == "parameter" else None
        if number:
            found[int(number.group(1))] = instruction.name
    return found


def _sliced_reads(parameter: str, computation: Computation, computations: dict[str, Computation]) -> int | None:
    """If a fused computation uses its `parameter` only as the buffer of dynamic slices or in-place updates
    (directly, through bitcasts, or in fusions nested in it), the bytes those read of it (slices: their size;
    updates: none); else None (it reads all of it)."""
    total = 0
    for instruction in computation.instructions:
        if parameter not in instruction.operands:
            continue
        buffer = instruction.operands[0] == parameter
        through = None
        if instruction.opcode == "bitcast":
            through = _sliced_reads(instruction.name, computation, computations)
        elif instruction.opcode == "fusion" and instruction.operands.count(parameter) == 1:
            nested = next((computations[c] for c in callees(instruction) if c in computations), None)
            inner = _parameters(nested).get(instruction.operands.index(parameter)) if nested else None
            through = _sliced_reads(inner, nested, computations) if inner else None
        if instruction.opcode == "dynamic-slice" and buffer:
            total += array_bytes(instruction.shape)
        elif instruction.opcode == "dynamic-update-slice" and buffer:
            continue
        elif through is not None:
            total += through
        else:
            return None
    return total


def _written(instruction: Instruction, fused: Computation | None) -> int:
    """Bytes an instruction writes: its result, less what in-place dynamic-update-slices leave as it was (a
    fusion's result, or each element of a multi-output fusion's tuple, that is one: its update)."""
    if fused is None or not fused.instructions:
        if instruction.opcode == "dynamic-update-slice" and len(instruction.operands) > 1:
            return 0  # counted by the caller from its update operand
        return array_bytes(instruction.shape)
    inner = fused.by_name()

    def element(root: Instruction) -> int:
        while root.opcode == "bitcast" and root.operands and root.operands[0] in inner:
            root = inner[root.operands[0]]
        if root.opcode == "dynamic-update-slice" and len(root.operands) > 1 and root.operands[1] in inner:
            return array_bytes(inner[root.operands[1]].shape)
        return array_bytes(root.shape)

    root = next((i for i in fused.instructions if i.line.lstrip().startswith("ROOT")), fused.instructions[-1])
    if root.opcode == "tuple":
        return sum(element(inner[o]) if o in inner else 0 for o in root.operands)
    return element(root)


def computation_bytes(computation: Computation, computations: dict[str, Computation]) -> float:
    """HBM bytes the top-level instructions of one (unfused) computation read and write, XLA's way: each
    instruction's operands and result; fusions as one instruction; slices of a buffer as the slice."""
    shapes = {i.name: i.shape for i in computation.instructions}
    total = 0.0
    for instruction in computation.instructions:
        if instruction.opcode in _NO_TRAFFIC:
            continue
        fused = None
        if instruction.opcode == "fusion":
            fused = next((computations[c] for c in callees(instruction) if c in computations), None)
        parameters = _parameters(fused) if fused is not None else {}
        for position, operand in enumerate(instruction.operands):
            read = None
            if fused is not None and position in parameters:
                read = _sliced_reads(parameters[position], fused, computations)
            elif instruction.opcode == "dynamic-slice" and position == 0:
                read = array_bytes(instruction.shape)
            elif instruction.opcode == "dynamic-update-slice" and position == 0:
                read = 0  # in place: the update (operand 1) is read, and written
            elif instruction.opcode == "dynamic-update-slice" and position == 1:
                read = 2 * array_bytes(shapes.get(operand, ""))
            total += array_bytes(shapes.get(operand, "")) if read is None else read
        total += _written(instruction, fused)
    return total


@dataclasses.dataclass(frozen=True)
class LoopCosts:
    loops: int  # while loops with a known trip count above 1
    extra_flops: float  # matmul/convolution FLOPs of their bodies' repeats that XLA's analysis leaves out
    extra_bytes: float  # the same for HBM bytes


def uncounted_loop_costs(hlo_text: str) -> LoopCosts:
    """What XLA's cost analysis of a compiled program misses by counting each loop body once: for every
    computation run n > 1 times, (n - 1) x its FLOPs (matmuls, convolutions, in it and its fusions) and its
    unfused instructions' bytes."""
    computations, entry = parse(hlo_text)
    if entry is None:
        return LoopCosts(0, 0.0, 0.0)
    times = executions(computations, entry)
    loops = sum(1 for c in computations.values() for i in c.instructions
                if i.opcode == "while" and (trip_count(i, computations) or 0) > 1 and times.get(c.name))
    fused = {callee for c in computations.values() for i in c.instructions if i.opcode == "fusion"
             for callee in callees(i)}
    extra_flops = extra_bytes = 0.0
    for name, count in times.items():
        if count <= 1:
            continue
        computation = computations[name]
        extra_flops += (count - 1) * computation_flops(computation)
        if name not in fused:
            extra_bytes += (count - 1) * computation_bytes(computation, computations)
    return LoopCosts(loops, extra_flops, extra_bytes)


def lines_with_executions(hlo_text: str):
    """Each instruction line of a compiled program with how many times it runs per run of the program (lines
    of computations never reached from the entry: 0)."""
    computations, entry = parse(hlo_text)
    times = executions(computations, entry) if entry else {}
    for computation in computations.values():
        for instruction in computation.instructions:
            yield instruction.line, times.get(computation.name, 0)
