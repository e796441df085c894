"""What to quantize and how: the spec (bits, group size, symmetry) and the per-module plan."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from infopt.errors import InfoptError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InfoptError(f"invalid bits {self.bits}: choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise InfoptError(f"invalid group size {self.group_size}: use -1 or a positive number")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def fits(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def packed_bytes(self, out_features: int, in_features: int, scale_bytes: int = 2) -> int:
        """Bytes on disk for one quantized weight: codes, scales and (asymmetric) zero points."""
        groups = self.num_groups(in_features)
        codes = out_features * math.ceil(in_features * self.bits / 32) * 4
        scales = out_features * groups * scale_bytes
        zeros = 0 if self.symmetric else math.ceil(out_features * self.bits / 32) * groups * 4
        return codes + scales + zeros

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


def parse_override(text: str, base: QuantSpec) -> tuple[str, QuantSpec | None]:
    """`REGEX=BITS[:GROUP][:sym|asym]` or `REGEX=skip` into (regex, spec or None)."""
    if "=" not in text:
        raise InfoptError(f"invalid override {text!r}: expected REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip")
    pattern, _, value = text.rpartition("=")
    _compile(pattern)
    if value == "skip":
        return pattern, None
    parts = value.split(":")
    try:
        bits = int(parts[0])
        group = int(parts[1]) if len(parts) > 1 and parts[1] not in ("sym", "asym") else base.group_size
    except ValueError:
        raise InfoptError(f"invalid override {text!r}: bits and group size must be integers") from None
    symmetric = base.symmetric
    if parts[-1] in ("sym", "asym"):
        symmetric = parts[-1] == "sym"
    return pattern, QuantSpec(bits, group, symmetric)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InfoptError(f"invalid regular expression {pattern!r}: {exc}") from None


@dataclass
class PlanEntry:
    module: str
    shape: tuple[int, int]
    spec: QuantSpec | None
    note: str = ""


@dataclass
class QuantPlan:
    entries: list[PlanEntry]
    dense_bytes: int = 0  # everything that stays in full precision, linears excluded
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.spec is not None]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.spec is None]

    def spec_for(self, module: str) -> QuantSpec | None:
        for entry in self.entries:
            if entry.module == module:
                return entry.spec
        return None

    def expected_bytes(self, dense_element_bytes: int) -> int:
        total = self.dense_bytes
        for e in self.entries:
            out_f, in_f = e.shape
            if e.spec is None:
                total += out_f * in_f * dense_element_bytes
            else:
                total += e.spec.packed_bytes(out_f, in_f, dense_element_bytes) + 16
        return total


def build_plan(
    linear_shapes: dict[str, tuple[int, int]],
    spec: QuantSpec,
    ignore: list[str] = (),
    overrides: list[tuple[str, QuantSpec | None]] = (),
    packable: Callable[[tuple[int, int], QuantSpec], str | None] | None = None,
) -> QuantPlan:
    """Decide a spec (or none, with the reason) for every candidate linear, in the given order.

    The last matching override wins; `ignore` patterns always win. A linear whose input dimension
    the group size does not divide stays in full precision with a warning: the packed formats
    cannot represent a ragged last group. `packable` lets the output format refuse shapes it cannot
    pack (returning the reason); those linears also stay in full precision with a warning.
    """
    ignore_res = [_compile(p) for p in ignore]
    override_res = [(_compile(p), s) for p, s in overrides]
    entries, warnings = [], []
    for module, shape in linear_shapes.items():
        chosen, note = spec, ""
        for regex, override in override_res:
            if regex.search(module):
                chosen, note = override, "override" if override else "skipped by override"
        if any(regex.search(module) for regex in ignore_res):
            chosen, note = None, "ignored"
        if chosen is not None and not chosen.fits(shape[1]):
            note = f"in_features {shape[1]} not divisible by group size {chosen.group_size}"
            warnings.append(f"{module} left in full precision: {note}")
            chosen = None
        reason = packable(shape, chosen) if chosen is not None and packable is not None else None
        if reason:
            note = reason
            warnings.append(f"{module} left in full precision: {note}")
            chosen = None
        entries.append(PlanEntry(module, shape, chosen, note))
    return QuantPlan(entries, warnings=warnings)
