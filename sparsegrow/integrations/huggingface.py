"""A Hugging Face `transformers.Trainer` callback that trains the model sparse (docs/integrations/huggingface.md).

    from sparsegrow.integrations.huggingface import SparsegrowCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsegrowCallback(density=0.1, method="rigl", every=100)])
    trainer.train()                        # or train(resume_from_checkpoint=True)

When each piece happens, and why there (Trainer 4.40 to 5.x):
- on_init_end (end of Trainer.__init__): the Sparsifier is built on trainer.model. The Trainer
  builds its optimizer later, inside train(), so the optimizer sees the sparse model's
  parameters (storage="sparse" replaces Linear weights). An optimizer passed to
  Trainer(optimizers=...) was built before: fine for storage="masked", refused by attach() for
  "sparse" (it does not hold the new weights).
- on_train_begin (after the optimizer is built and, on resume, after model and optimizer states
  are loaded): the schedule is derived from state.max_steps unless one was given, the
  Sparsifier is attached to the optimizer, and on resume its state is loaded from the
  checkpoint folder.
- on_step_end (once per optimizer step, i.e. after the gradient_accumulation_steps
  micro-batches): sparsifier.step(). RigL's gradient and search's rows are summed over the
  micro-batches by the Sparsifier's own hooks.
- on_log: density, ITOP and (on update steps, which are always logged) the update's totals
  are added to the logs under "sparsegrow/...", and to state.log_history.
- on_save: the Sparsifier's state goes to <checkpoint folder>/sparsegrow.pt.
"""
from __future__ import annotations

import os

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("sparsegrow.integrations.huggingface needs transformers and accelerate: "
                      "pip install sparsegrow[hf]") from e

from ..schedules import UpdateSchedule
from ..updater import Sparsifier
from ._common import CHECKPOINT_FILE, ScheduleSpec, SparsifierRecipe, report_scalars, update_scalars


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (its class picks the reset table entry)."""
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover
        return optimizer
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


class SparsegrowCallback(TrainerCallback):
    """Train a `transformers.Trainer`'s model sparse with a `sparsegrow.Sparsifier`.

    density and **sparsifier_kwargs: as `sparsegrow.Sparsifier` (method, distribution, include,
        storage, seed, ...), without model and optimizer, which come from the Trainer.
    schedule: an `UpdateSchedule` in optimizer steps; or leave it None and give every (ΔT),
        end (T_end as a fraction of the Trainer's total optimizer steps), fraction and decay.
    resume_from: the checkpoint folder to restore the Sparsifier from when the Trainer resumes;
        by default args.resume_from_checkpoint if it is a folder, else
        <output_dir>/checkpoint-<the resumed global step> (what train(resume_from_checkpoint=True)
        and a path inside output_dir pick).
    """

    def __init__(self, density: float = 0.1, *, schedule: UpdateSchedule | None = None,
                 every: int = 100, end: float = 0.75, fraction: float = 0.3, decay: str = "cosine",
                 resume_from: str | os.PathLike | None = None, **sparsifier_kwargs):
        self.recipe = SparsifierRecipe(schedule, ScheduleSpec(every, end, fraction, decay),
                                       {"density": density, **sparsifier_kwargs})
        self.resume_from = resume_from
        self.sparsifier: Sparsifier | None = None
        self._model = None
        self._last_stats: dict | None = None  # the latest update's, until it is logged

    # -- before training: build, schedule, attach, restore ------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SparsegrowCallback needs Trainer(model=...): model_init is not "
                             "supported (the Sparsifier must be built on the model that trains)")
        self._model = model
        self.sparsifier = self.recipe.build(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparsifier is None:
            raise RuntimeError(
                "SparsegrowCallback was not there when the Trainer was built: pass it in "
                "Trainer(callbacks=[...]) so it sparsifies the model before the optimizer exists")
        if model is not self._model:
            raise RuntimeError("the Trainer's model changed after it was built (model_init?); "
                               "the Sparsifier holds the first one: pass Trainer(model=...)")
        self.recipe.set_total_steps(self.sparsifier, state.max_steps)
        self.sparsifier.attach(_torch_optimizer(optimizer))
        if state.global_step > 0:  # resuming: the Trainer loaded model and optimizer already
            self._restore(args, state)
        elif self.sparsifier.step_count != 0:
            raise RuntimeError("this SparsegrowCallback has trained already; use a new one per "
                               "Trainer.train() from step 0")

    def _restore(self, args, state) -> None:
        folder = self.resume_from
        if folder is None and isinstance(args.resume_from_checkpoint, str) \
                and os.path.isdir(args.resume_from_checkpoint):
            folder = args.resume_from_checkpoint
        if folder is None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step}, but {path} does not exist; without it the "
                "masks would not be the ones the weights were trained with. Pass the checkpoint "
                "folder: SparsegrowCallback(..., resume_from=FOLDER)")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        if int(sd["step"]) != state.global_step:
            raise ValueError(f"{path} holds the Sparsifier at step {sd['step']}, but the Trainer "
                             f"resumes at step {state.global_step}")
        self.sparsifier.load_state_dict(sd)

    # -- during training -------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.sparsifier.step()
        if self.sparsifier.step_count != state.global_step:  # a resume that skipped _restore
            raise RuntimeError(f"the Sparsifier is at step {self.sparsifier.step_count} but the "
                               f"Trainer at {state.global_step}")
        if stats is not None:
            self._last_stats = stats
            control.should_log = True  # every update is logged, at its step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sparsifier is None or logs is None:
            return
        scalars = report_scalars(self.sparsifier)
        if self._last_stats is not None:
            scalars.update(update_scalars(self._last_stats))
            self._last_stats = None
        logs.update(scalars)
        # Trainer.log appended a copy of logs to the history before calling back
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_save(self, args, state, control, **kwargs):
        sd = self.sparsifier.state_dict()  # a collective under torch.distributed: every rank
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(sd, os.path.join(folder, CHECKPOINT_FILE))
