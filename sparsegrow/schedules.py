"""When topology updates happen, and how many connections each one replaces.

Steps count optimizer steps: `Sparsifier.step()` is called after `optimizer.step()`, so the
first call sees step t = 1. Updates happen at t = start + m * every (m = 1, 2, ...) while
t < end (RigL's T_end, by default 75% of training). The update fraction (the share of a layer's
active connections replaced at an update) is a pure function of t:

    constant: f(t) = alpha
    cosine:   f(t) = alpha / 2 * (1 + cos(pi * (t - start) / (end - start)))   (RigL's f_decay)
    linear:   f(t) = alpha * (1 - (t - start) / (end - start))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class UpdateSchedule:
    every: int  # ΔT, optimizer steps between updates
    end: int  # T_end, no update at or after this step
    start: int = 0
    fraction: float = 0.3  # alpha, update fraction at the start
    decay: str = "cosine"

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"schedule every (ΔT) must be an integer >= 1, got {self.every!r}")
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"schedule start must be an integer >= 0, got {self.start!r}")
        if not isinstance(self.end, int) or self.end <= self.start:
            raise ValueError(
                f"schedule end (T_end) must be an integer > start={self.start}, got {self.end!r}"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"update fraction must be in (0, 1], got {self.fraction!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; allowed: {', '.join(DECAYS)}")
        if self.start + self.every >= self.end:
            raise ValueError(
                f"schedule never fires: the first update would be at step "
                f"start + every = {self.start + self.every}, but updates stop at end={self.end}; "
                f"lower `every` or raise `end`"
            )

    def is_update_step(self, step: int) -> bool:
        return self.start < step < self.end and (step - self.start) % self.every == 0

    def fraction_at(self, step: int) -> float:
        progress = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        if self.decay == "constant":
            return self.fraction
        if self.decay == "cosine":
            return self.fraction / 2 * (1 + math.cos(math.pi * progress))
        return self.fraction * (1 - progress)

    def update_steps(self) -> list[int]:
        return list(range(self.start + self.every, self.end, self.every))
