"""What a compiled program communicates and computes, read from its optimized HLO (``compiled.as_text()``).

Every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (and their ``-start`` forms) is
found in the computations reachable from the entry, with its bytes, the mesh axes its groups span and how many
times it runs: a ``while`` body counts its trip count times (``known_trip_count`` in the loop's backend config;
else the constant bound its condition compares against, an upper bound; else the caller's ``unknown_trips``, e.g.
the train step's accumulation loop, whose bound is an argument), a ``conditional`` its costliest branch, fusions and
calls once per use. Dots are counted the same way (2 FLOPs per multiply-add; their operand and result bytes are the
least memory traffic they need). A TPU compiler writes dots as convolutions whose windows carry batch-like dims;
counted as 2 x output x input features, they are an estimate, so for such programs the planner scales XLA's own
count (each loop body once) by this walk's ratio of every-iteration to once-per-body FLOPs.

Bytes per device, ring algorithms over the n devices of a group (the convention of the analytic estimate):
all-gather in·(n−1) (its output is n inputs), reduce-scatter in·(n−1)/n, all-reduce 2·in·(n−1)/n,
all-to-all in·(n−1)/n, collective-permute in ("in" = the operand's bytes on one device).

Replica groups come in three spellings, all read here: explicit (``{{0,1},{2,3}}``), iota
(``[2,4]<=[4,2]T(1,0)``: iota over the dims, transposed, reshaped to groups) and mesh
(``mesh['axis_0'=4,'axis_1'=2], device_ids=([4,2]T(1,0)) {'axis_0'}``: the devices that share every coordinate but
those of the named axes). Ids are positions in the program's device assignment, i.e. in the flattened mesh, so a
group's mesh axes are those along which its members' coordinates differ.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONVERT_LIKE = {"parameter", "convert", "bitcast", "copy", "reshape", "transpose", "tuple", "get-tuple-element"}
_NARROW = ("bf16", "f16")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Instruction:
    root: bool
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        depth, end = 1, 0
        for end, ch in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        return re.findall(r"%([\w.\-]+)", self.rest[:end])


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple's elements summed)."""
    return float(sum(DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for t, dims in _ARRAY.findall(shape) if t in DTYPE_BYTES))


def _dtype(shape: str) -> str:
    found = _ARRAY.search(shape)
    return found.group(1) if found else "?"


def _dims(shape: str) -> list[int]:
    found = _ARRAY.search(shape)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, the entry computation's name)."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        found = _INSTRUCTION.match(line) if current is not None else None
        if found:
            root, *rest = found.groups()
            current.append(Instruction(bool(root), *rest))
    return computations, entry


# --- replica groups -> mesh axes -------------------------------------------------------------------------------

def _iota(spec: str) -> np.ndarray:
    """``[4,2]T(1,0)`` or ``[8]``: iota over the dims, transposed; returned flat."""
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec.strip())
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(p) for p in m.group(2).split(",")])
    return ids.reshape(-1)


def replica_groups(rest: str, num_devices: int) -> list[list[int]] | None:
    """The groups of a collective's attributes (None when it names none: a collective-permute)."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", rest)
    if m:
        return _iota(m.group(3)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", rest)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        ids = np.arange(math.prod(sizes))
        if m.group(2):
            spec = m.group(2).strip()
            ids = _iota(spec) if spec.startswith("[") else np.array([int(i) for i in spec.split(",")])
        over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
        keep = [i for i in range(len(names)) if i not in over]
        grid = ids.reshape(sizes).transpose(keep + over)
        return grid.reshape(-1, math.prod(sizes[i] for i in over) if over else 1).tolist()
    start = rest.find("replica_groups={")
    if start < 0:
        return None
    depth, i = 0, start + len("replica_groups=")
    for i in range(i, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            break
    body = rest[start + len("replica_groups="):i + 1]
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([^{}]*)\}", body[1:-1])]
    return [g for g in groups if g] or [list(range(num_devices))]


def group_axes(group: Sequence[int], mesh_axes: Sequence[str], mesh_shape: Sequence[int]) -> tuple[str, ...]:
    """The mesh axes along which a group's members differ ("+partial" when the group is a strict part of them)."""
    coords = np.stack(np.unravel_index(np.asarray(group), tuple(mesh_shape)))
    axes = tuple(a for a, row in zip(mesh_axes, coords) if len(set(row.tolist())) > 1)
    span = math.prod(s for a, s in zip(mesh_axes, mesh_shape) if a in axes)
    return axes if span == len(group) else axes + ("partial",)


def _permute_axes(rest: str, mesh_axes, mesh_shape) -> tuple[tuple[str, ...], int]:
    listed = rest.split("source_target_pairs=")[-1]
    pairs = [tuple(int(i) for i in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", listed)]
    moved = [(s, t) for s, t in pairs if s != t]
    if not moved:
        return (), 1
    axes = set()
    for s, t in moved:
        axes.update(group_axes([s, t], mesh_axes, mesh_shape))
    return tuple(a for a in mesh_axes if a in axes), 2


# --- counting -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    """Per device, for one run of a program: collective bytes and executions by (kind, axes, dtype), dot FLOPs."""

    collectives: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(lambda: [0.0, 0.0]))
    flops: float = 0.0
    flops_once: float = 0.0  # the same with every loop body counted once (as XLA's cost analysis counts)
    convolutions: int = 0  # convolution ops: a TPU compiler's dots (their FLOPs here are an estimate)
    dot_bytes: float = 0.0
    unknown_loops: int = 0  # while loops whose trip count was not in the program (the caller's value was used)

    def add(self, other: "Counts", times: float = 1.0) -> None:
        for key, (b, n) in other.collectives.items():
            self.collectives[key][0] += times * b
            self.collectives[key][1] += times * n
        self.flops += times * other.flops
        self.flops_once += other.flops_once
        self.convolutions += other.convolutions
        self.dot_bytes += times * other.dot_bytes
        self.unknown_loops += other.unknown_loops

    def bytes_by_axes(self) -> dict[str, float]:
        """Bytes per device by the mesh axes a collective spans, e.g. {"fsdp": ..., "data+fsdp": ...}."""
        out: dict[str, float] = collections.defaultdict(float)
        for (_, axes, _), (b, _) in self.collectives.items():
            if b:
                out["+".join(axes)] += b
        return dict(out)

    def total_bytes(self) -> float:
        return sum(b for b, _ in self.collectives.values())


class _Walker:
    def __init__(self, computations, mesh_axes, mesh_shape, unknown_trips: int):
        self.comps, self.axes, self.shape = computations, tuple(mesh_axes), tuple(mesh_shape)
        self.unknown_trips, self.n = unknown_trips, math.prod(mesh_shape)
        self.memo: dict[str, Counts] = {}
        self.by_name = {i.name: i for body in computations.values() for i in body}
        self.shapes = {name: i.shape for name, i in self.by_name.items()}
        self.users: dict[str, list[Instruction]] = collections.defaultdict(list)
        for ins in self.by_name.values():
            for o in ins.operands:
                self.users[o].append(ins)

    def counts(self, name: str) -> Counts:
        if name not in self.memo:
            self.memo[name] = Counts()  # guards against (malformed) recursion
            total = Counts()
            for ins in self.comps.get(name, []):
                self._instruction(ins, total)
            self.memo[name] = total
        return self.memo[name]

    def _operand_bytes(self, ins: Instruction) -> tuple[float, str]:
        """Bytes of the operands as the program means them, and their dtype. A compiler without 16-bit collectives
        (XLA:CPU) widens them: converts a bf16 value to float32 just before the collective and back just after;
        such an operand counts at its 16-bit size (a GPU or TPU compiler moves it as it is)."""
        total, dtypes = 0.0, []
        for i, o in enumerate(ins.operands):
            size, dtype = shape_bytes(self.shapes.get(o, "")), _dtype(self.shapes.get(o, ""))
            narrow = self._narrowed(o, ins, i)
            if narrow and DTYPE_BYTES.get(narrow, 4) < DTYPE_BYTES.get(dtype, 4):
                size, dtype = size * DTYPE_BYTES[narrow] / DTYPE_BYTES[dtype], narrow
            total, dtypes = total + size, dtypes + [dtype]
        return total, max(set(dtypes), key=dtypes.count) if dtypes else "?"

    def _convert_only(self, ins: Instruction) -> bool:
        if ins.op == "convert":
            return True
        called = _CALLED.findall(ins.rest) if ins.op == "fusion" else []
        return bool(called) and all(i.op in _CONVERT_LIKE for i in self.comps.get(called[0], []))

    def _widened_from(self, ins: Instruction | None) -> str | None:
        """The dtype a value was converted from, when its last real operation (inside a fusion: its root, through
        bitcasts, copies and reshapes) is a convert."""
        if ins is not None and ins.op == "fusion":
            called = _CALLED.findall(ins.rest)
            body = {i.name: i for i in self.comps.get(called[0], [])} if called else {}
            ins = next((i for i in body.values() if i.root), None)
            while ins is not None and ins.op in ("bitcast", "copy", "reshape", "transpose") and ins.operands:
                ins = body.get(ins.operands[0])
        if ins is None or ins.op != "convert" or not ins.operands:
            return None
        return _dtype(self.shapes.get(ins.operands[0], ""))

    def _narrowed(self, operand: str, ins: Instruction, index: int) -> str | None:
        """The 16-bit dtype an operand was widened from (its producer), or, for a reduction, that every user of its
        result narrows it to; else None."""
        source = self._widened_from(self.by_name.get(operand))
        if source in _NARROW:
            return source
        if ins.op.removesuffix("-start") not in ("all-reduce", "reduce-scatter"):
            return None  # a gather whose result is cast down gathers the wide value, as any compiler would
        results = self.users.get(ins.name, [])
        if len(ins.operands) > 1:  # a tuple: the element's get-tuple-element users
            results = [u for g in results if g.op == "get-tuple-element" and f"index={index}" in g.rest
                       for u in self.users.get(g.name, [])]
        targets = {_dtype(u.shape) for u in results if self._convert_only(u)}
        if results and len(targets) == 1 and all(self._convert_only(u) for u in results):
            return targets.pop() if targets <= set(_NARROW) else None
        return None

    def _instruction(self, ins: Instruction, total: Counts) -> None:
        kind = ins.op.removesuffix("-start")
        if kind in KINDS:
            self._collective(kind, ins, total)
        elif ins.op in ("dot", "convolution"):
            self._dot(ins, total)
        if ins.op == "while":
            trips, known = self._trips(ins)
            body = re.search(r"body=%?([\w.\-]+)", ins.rest).group(1)
            total.add(self.counts(body), trips)
            total.unknown_loops += 0 if known else 1
            return
        branches = _BRANCHES.search(ins.rest)
        if branches or ins.op == "conditional":
            names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else \
                [m for m in _CALLED.findall(ins.rest)]
            costliest = max((self.counts(b) for b in names), key=lambda c: (c.flops, c.total_bytes()),
                            default=Counts())
            total.add(costliest)
            return
        for called in _CALLED.findall(ins.rest):
            total.add(self.counts(called))

    def _collective(self, kind: str, ins: Instruction, total: Counts) -> None:
        size, dtype = self._operand_bytes(ins)
        if kind == "collective-permute":
            axes, n = _permute_axes(ins.rest, self.axes, self.shape)
            moved = size if axes else 0.0
        else:
            groups = replica_groups(ins.rest, self.n) or [list(range(self.n))]
            n = len(groups[0])
            axes = group_axes(groups[0], self.axes, self.shape) if n > 1 else ()
            factor = {"all-gather": n - 1, "reduce-scatter": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
                      "all-to-all": (n - 1) / n}[kind]
            moved = size * factor
        entry = total.collectives[(kind, axes, dtype)]
        entry[0] += moved
        entry[1] += 1

    def _dot(self, ins: Instruction, total: Counts) -> None:
        out = math.prod(_dims(ins.shape))
        operands = [self.shapes.get(o, "") for o in ins.operands[:2]]
        lhs, rhs = (_dims(s) for s in operands) if len(operands) == 2 else ([], [])
        if ins.op == "dot":
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
            contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        else:
            total.convolutions += 1
            # convolution: a TPU compiler writes dots as convolutions whose spatial dims carry batch-like dims;
            # each output element sums over the kernel's input features ("i")
            labels = re.search(r"dim_labels=\w+_(\w+)->", ins.rest)
            i = labels.group(1).index("i") if labels and rhs else None
            contract = rhs[i] if i is not None else 1
        total.flops += 2.0 * out * contract
        total.flops_once += 2.0 * out * contract
        total.dot_bytes += shape_bytes(ins.shape) + sum(shape_bytes(s) for s in operands)

    def _trips(self, ins: Instruction) -> tuple[int, bool]:
        known = _TRIPS.search(ins.rest)
        if known:
            return int(known.group(1)), True
        cond = re.search(r"condition=%?([\w.\-]+)", ins.rest).group(1)
        bound = self._constant_bound(cond)
        return (bound, True) if bound is not None else (self.unknown_trips, False)

    def _constant_bound(self, cond: str) -> int | None:
        """The integer constant a loop condition compares its counter against, if it has exactly one."""
        names, constants = [cond], []
        while names:
            for ins in self.comps.get(names.pop(), []):
                if ins.op == "constant" and re.fullmatch(r"[su](32|64)\[\]\S*", ins.shape):
                    constants.append(int(re.match(r"\s*(-?\d+)", ins.rest).group(1)))
                names += _CALLED.findall(ins.rest)
        return constants[0] if len(constants) == 1 else None


def count(text: str, mesh_axes: Sequence[str], mesh_shape: Sequence[int], *, unknown_trips: int = 1) -> Counts:
    """Collectives and dot FLOPs of one run of the program ``text`` (optimized HLO) on a mesh of that shape."""
    computations, entry = parse_module(text)
    return _Walker(computations, mesh_axes, mesh_shape, unknown_trips).counts(entry)


def table(counts: Counts) -> list[tuple[str, str, str, float, float]]:
    """(kind, axes, dtype, bytes per device, executions) rows, largest first."""
    rows = [(k, "+".join(a) or "-", d, b, n) for (k, a, d), (b, n) in counts.collectives.items() if b]
    return sorted(rows, key=lambda r: -r[3])
