"""What the trainer callbacks share: building the Sparsifier, its schedule, its stats as scalars.

The schedule: pass `schedule=UpdateSchedule(...)` to fix it in optimizer steps, or leave it out
and give `every` (ΔT, optimizer steps between updates), `end` (T_end as a fraction of the
trainer's total optimizer steps, RigL's 0.75), `fraction` and `decay`; the callback then builds
UpdateSchedule(every, end=int(end * total_steps), fraction=fraction, decay=decay) once the
trainer knows its total steps (max_steps, or epochs x optimizer steps per epoch).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..schedules import UpdateSchedule
from ..updater import Sparsifier

# Stands in until the trainer knows its total steps (set_schedule replaces it before step 1):
# construction needs a valid schedule, and this one's first update (step 1) is never reached.
_PLACEHOLDER = UpdateSchedule(every=1, end=2)
CHECKPOINT_FILE = "sparsegrow.pt"  # the Sparsifier's state, beside the trainer's checkpoint
PREFIX = "sparsegrow/"  # of every logged key


@dataclass(frozen=True)
class ScheduleSpec:
    """UpdateSchedule's arguments with `end` as a fraction of the trainer's total steps."""

    every: int = 100
    end: float = 0.75
    fraction: float = 0.3
    decay: str = "cosine"

    def __post_init__(self):
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"end is a fraction of the total steps, in (0, 1], got {self.end!r}")

    def build(self, total_steps: int) -> UpdateSchedule:
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"the trainer's total number of optimizer steps is unknown ({total_steps!r}), so "
                "the update schedule cannot be derived: pass schedule=UpdateSchedule(...) or set max_steps")
        return UpdateSchedule(every=self.every, end=int(self.end * total_steps),
                              fraction=self.fraction, decay=self.decay)


class SparsifierRecipe:
    """The Sparsifier's keyword arguments, kept until the trainer's model exists."""

    def __init__(self, schedule: UpdateSchedule | None, spec: ScheduleSpec, kwargs: dict):
        for key in ("model", "optimizer"):
            if key in kwargs:
                raise TypeError(f"{key} comes from the trainer; do not pass {key}=")
        if kwargs.get("method") == "dst":
            raise ValueError("method 'dst' (DSTSparsifier) adds sparsifier.loss() to the training "
                             "loss, which a callback cannot do: call it from your own loop")
        if schedule is not None and not isinstance(schedule, UpdateSchedule):
            raise TypeError(f"schedule must be an UpdateSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.spec = spec
        self.kwargs = kwargs

    def build(self, model: nn.Module) -> Sparsifier:
        return Sparsifier(model, schedule=self.schedule or _PLACEHOLDER, **self.kwargs)

    def set_total_steps(self, sparsifier: Sparsifier, total_steps: int | None) -> None:
        """Give the sparsifier its real schedule now that the trainer knows its length."""
        if self.schedule is None and sparsifier.dynamic:
            sparsifier.set_schedule(self.spec.build(total_steps))


def update_scalars(stats: dict) -> dict[str, float]:
    """An update's stats (Sparsifier.step()'s dict) as flat scalars: totals, not per layer."""
    keys = ("fraction", "dropped", "grown", "regrown", "skipped_nonfinite", "time_s")
    return {f"{PREFIX}update_{k}": float(stats[k]) for k in keys}


def report_scalars(sparsifier: Sparsifier) -> dict[str, float]:
    """Density over the sparse layers, ITOP rate (share of connections ever active), updates."""
    rep = sparsifier.report()
    return {f"{PREFIX}density": float(rep["global_density"]), f"{PREFIX}itop": float(rep["itop"]),
            f"{PREFIX}n_updates": float(rep["n_updates"]),
            f"{PREFIX}total_update_time_s": float(rep["update_time_s"])}
