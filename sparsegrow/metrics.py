"""What a run reports about its topology: densities, churn and in-time over-parameterization.

ITOP exploration rate (Liu et al. 2021, "Do we actually need dense over-parameterization?"): the
share of all possible connections of the sparse layers that have been active at any time so far.
A static run stays at its density; a dynamic run climbs above it.
"""
from __future__ import annotations

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


def itop_rate(ever_active: dict[str, torch.Tensor], numel: dict[str, int]) -> float:
    total = sum(numel.values())
    return sum(int(v.numel()) for v in ever_active.values()) / total if total else 1.0
