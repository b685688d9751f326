"""What a run reports about its topology: densities, churn and in-time over-parameterization.

ITOP exploration rate (Liu et al. 2021, "Do we actually need dense over-parameterization?"): the
share of all possible connections of the sparse layers that have been active at any time so far.
A static run stays at its density; a dynamic run climbs above it.
"""
from __future__ import annotations

import math

import torch


def union_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two 1-D index tensors (either may be unsorted)."""
    return torch.unique(torch.cat([a, b]))


def density_report(nnz: dict[str, int], numel: dict[str, int]) -> dict:
    total_nnz, total = sum(nnz.values()), sum(numel.values())
    return {
        "global_density": total_nnz / total if total else 1.0,
        "layers": {name: nnz[name] / numel[name] for name in nnz},
        "nnz": total_nnz,
        "numel": total,
    }


def itop_rate(ever_active: dict[str, "EverActive"], numel: dict[str, int]) -> float:
    """Σ connections ever active / Σ numel."""
    total = sum(numel.values())
    return sum(v.count() for v in ever_active.values()) / total if total else 1.0


# -- a bounded record of the connections ever active ----------------------------------------------

_HLL_BITS = 14  # 2^14 registers: 16 KiB per layer, relative standard error 1.04 / 128 = 0.8%


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                              0x94D049BB133111EB))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash64(idx: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 flat indices (multiplications wrap mod 2^64 on every device): the same
    64 pseudo-random bits for the same index on any device and rank."""
    z = idx.long() + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


class EverActive:
    """The connections of one layer ever active, for the ITOP rate, in bounded memory.

    Exact while it holds at most `cap` indices (a sorted int64 tensor: 8 B per connection ever
    active); past that a HyperLogLog sketch (Flajolet et al. 2007) of 2^14 one-byte registers,
    16 KiB whatever the churn, counting distinct connections with a relative standard error of
    0.8% (the estimate is deterministic: the same on every rank and after a resume). A dynamic run
    that replaces 30% of its connections every update would otherwise hold 38x its active count
    after 100 LeNet epochs, and without limit at 10⁶ × 10⁶."""

    def __init__(self, active: torch.Tensor, cap: int):
        self.cap = int(cap)
        self.exact: torch.Tensor | None = torch.unique(active.long())
        self.registers: torch.Tensor | None = None
        self._spill()

    def add(self, idx: torch.Tensor) -> None:
        if self.exact is not None:
            self.exact = union_sorted(self.exact.to(idx.device), idx.long())
            self._spill()
        else:
            self._sketch(idx)

    def count(self) -> float:
        if self.exact is not None:
            return float(self.exact.numel())
        m = self.registers.numel()
        inv = torch.pow(2.0, -self.registers.double()).sum()
        est = 0.7213 / (1 + 1.079 / m) * m * m / float(inv)
        zeros = int((self.registers == 0).sum())
        if est <= 2.5 * m and zeros:  # small range: linear counting
            est = m * math.log(m / zeros)
        return est

    def nbytes(self) -> int:
        t = self.exact if self.exact is not None else self.registers
        return t.numel() * t.element_size()

    def _spill(self) -> None:
        if self.exact is not None and self.exact.numel() > self.cap:
            self.registers = torch.zeros(1 << _HLL_BITS, dtype=torch.uint8, device=self.exact.device)
            self._sketch(self.exact)
            self.exact = None

    def _sketch(self, idx: torch.Tensor) -> None:
        if idx.numel() == 0:
            return
        self.registers = self.registers.to(idx.device)
        h = hash64(idx)
        reg = _shr(h, 64 - _HLL_BITS)  # the top bits pick the register
        rest = h & ((1 << (64 - _HLL_BITS)) - 1)  # 50 bits: rank = leading zeros + 1
        rank = torch.where(rest > 0, (64 - _HLL_BITS) - torch.floor(torch.log2(rest.double())),
                           torch.full_like(rest, 65 - _HLL_BITS, dtype=torch.float64))
        self.registers = self.registers.long().scatter_reduce(
            0, reg, rank.long(), "amax").to(torch.uint8)

    def state_dict(self) -> dict:
        return {"cap": self.cap, "exact": self.exact, "registers": self.registers}

    @classmethod
    def from_state(cls, state, cap: int) -> "EverActive":
        """From `state_dict()`, or from a sorted index tensor (checkpoints before the sketch)."""
        if torch.is_tensor(state):
            return cls(state, cap)
        rec = cls.__new__(cls)
        rec.cap = int(state["cap"])
        rec.exact = None if state["exact"] is None else state["exact"].clone()
        rec.registers = None if state["registers"] is None else state["registers"].clone()
        return rec
