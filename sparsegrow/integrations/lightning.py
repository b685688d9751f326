"""A Lightning callback that trains a LightningModule sparse (docs/integrations/lightning.md).

    from sparsegrow.integrations.lightning import SparsegrowCallback
    trainer = lightning.pytorch.Trainer(max_steps=10_000, callbacks=[
        SparsegrowCallback(density=0.1, method="rigl", every=100)])
    trainer.fit(module, loader)            # or fit(..., ckpt_path="last.ckpt")

When each piece happens, and why there (Lightning 2.2 and later; Trainer._run's order):
- setup(stage="fit"), the first hook of fit, before configure_optimizers and before a
  checkpoint is restored: the Sparsifier is built on the LightningModule, so the optimizer sees
  the sparse model's parameters (storage="sparse" replaces Linear weights), a DDP wrapper is
  built around the sparse model, and a checkpoint's weights load into it. Layers made in
  `configure_model` do not exist yet then: build them in __init__.
- load_state_dict (restoring a checkpoint): the Sparsifier's masks, step and generator.
- on_fit_start (optimizers built): the schedule is derived from
  trainer.estimated_stepping_batches unless one was given, and the Sparsifier is attached to
  the optimizer that holds its weights.
- on_train_batch_end: sparsifier.step() when the batch ended with an optimizer step
  (trainer.global_step moved), so with accumulate_grad_batches=k it steps once per k batches.
- Update stats (and density, ITOP) go to every logger at the update's step (log_metrics,
  so no update is dropped by log_every_n_steps) and to trainer.callback_metrics (pl_module.log).
- state_dict: the Sparsifier's state, saved in every Lightning checkpoint.
"""
from __future__ import annotations

import math

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sparsegrow.integrations.lightning needs lightning: "
                      "pip install sparsegrow[lightning]") from e

from ..schedules import UpdateSchedule
from ..updater import Sparsifier
from ._common import ScheduleSpec, SparsifierRecipe, report_scalars, update_scalars


class SparsegrowCallback(Callback):
    """Train a LightningModule sparse with a `sparsegrow.Sparsifier`.

    density and **sparsifier_kwargs: as `sparsegrow.Sparsifier` (method, distribution, include,
        storage, seed, ...), without model and optimizer, which come from the Trainer.
    schedule: an `UpdateSchedule` in optimizer steps; or leave it None and give every (ΔT),
        end (T_end as a fraction of trainer.estimated_stepping_batches), fraction and decay.
    """

    def __init__(self, density: float = 0.1, *, schedule: UpdateSchedule | None = None,
                 every: int = 100, end: float = 0.75, fraction: float = 0.3, decay: str = "cosine",
                 **sparsifier_kwargs):
        self.recipe = SparsifierRecipe(schedule, ScheduleSpec(every, end, fraction, decay),
                                       {"density": density, **sparsifier_kwargs})
        self.sparsifier: Sparsifier | None = None
        self._model = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.sparsifier is None:
            self._model = pl_module
            self.sparsifier = self.recipe.build(pl_module)
        elif pl_module is not self._model:
            raise RuntimeError("this SparsegrowCallback sparsified another module; use one "
                               "callback per LightningModule")

    def on_fit_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self.recipe.set_total_steps(self.sparsifier, int(total) if math.isfinite(total) else None)
        held = {id(p) for p in (sp.param for sp in self.sparsifier.params)}
        chosen = [o for o in trainer.optimizers
                  if held & {id(p) for g in o.param_groups for p in g["params"]}]
        if len(chosen) > 1:
            raise ValueError("more than one optimizer trains the sparse weights; the Sparsifier "
                             "resets the state of one")
        # attach names the sparse weights no optimizer holds
        self.sparsifier.attach(chosen[0] if chosen else trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: it moves once per accumulate_grad_batches batches
        if trainer.global_step == self.sparsifier.step_count:
            return
        if trainer.global_step != self.sparsifier.step_count + 1:
            raise RuntimeError(f"the Sparsifier is at step {self.sparsifier.step_count} but the "
                               f"Trainer at {trainer.global_step}")
        stats = self.sparsifier.step()
        if stats is None:
            return
        scalars = {**update_scalars(stats), **report_scalars(self.sparsifier)}
        for logger in trainer.loggers:  # rank zero only, inside each logger
            logger.log_metrics(scalars, step=trainer.global_step)
        pl_module.log_dict(scalars, on_step=True, on_epoch=False, logger=False)

    def state_dict(self) -> dict:
        # a collective under torch.distributed (Lightning asks every rank when it checkpoints)
        return {"sparsifier": self.sparsifier.state_dict()} if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "sparsifier" not in state_dict:
            return
        if self.sparsifier is None:
            raise RuntimeError("restoring a SparsegrowCallback before setup(): its model is unknown")
        self.sparsifier.load_state_dict(state_dict["sparsifier"])
