"""Drop criteria: which active connections to remove at an update.

A drop criterion decides, it does not mutate: given the current values of a layer's active
connections it returns positions into that active set; the Sparsifier applies them.
"""
from __future__ import annotations

import torch

from .registry import Registry
from .selection import select_top

DROP = Registry("drop criterion")


@DROP.register("magnitude", "drop the active connections of smallest |w| (SET, RigL)")
class MagnitudeDrop:
    def select(self, values: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """values: (nnz,) active weights -> (n,) sorted positions into them; ties are random."""
        return select_top(-values.abs().float(), n, generator)
