"""Drop criteria: which active connections to remove at an update.

A drop criterion decides, it does not mutate: given the current values of a layer's active
connections it returns positions into that active set; the Sparsifier applies them.
"""
from __future__ import annotations

import torch

from .registry import Registry
from .selection import require_finite, select_top, select_top_rows

DROP = Registry("drop criterion")


@DROP.register("magnitude", "drop the active connections of smallest |w| (SET, RigL)")
class MagnitudeDrop:
    def select(self, values: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """values: (nnz,) active weights -> (n,) sorted positions into them; ties are random."""
        # -|inf| would read as select_top's "ineligible" -inf: refuse non-finite weights here
        require_finite(values, "drop scores (|w| of the active weights)")
        return select_top(-values.abs().float(), n, generator)

    def select_rows(self, values: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """values: (rows, k) active weights of each output unit (constant fan-in) -> (rows, n)
        positions into each row, sorted; ties are random."""
        require_finite(values, "drop scores (|w| of the active weights)")
        return select_top_rows(-values.abs().float(), n, generator)
