"""From a Config to the objects of a run: device, sparsifier, optimizer, lr schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsegrow import Sparsifier, UpdateSchedule
from sparsegrow.fan_in import fan_in_lr_scales, split_param_groups
from sparsegrow.updater import METHODS

from .config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device, or a one-line ConfigError when this machine lacks it
    (torch would fail later, mid-construction, with an assertion and a traceback)."""
    device = torch.device(name)  # the form (cpu | cuda | cuda:N) is checked by config.validate
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"train.device={name!r}, but this torch build ({torch.__version__}) has "
                              "no CUDA support: use train.device=cpu or install a CUDA build of torch")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device={name!r}, but no CUDA device is visible "
                              "(check the driver and CUDA_VISIBLE_DEVICES); use train.device=cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name!r}, but only {count} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
    return device


def resolve_schedule(cfg: Config, steps_per_epoch: int, total_steps: int) -> UpdateSchedule:
    s = cfg.sparsity
    every = steps_per_epoch if s.update_every == "epoch" else int(s.update_every)
    end = int(round(s.update_end * total_steps)) if s.update_end <= 1 else int(s.update_end)
    try:
        return UpdateSchedule(every=every, end=end, start=s.update_start, fraction=s.fraction,
                              decay=s.decay)
    except ValueError as e:
        raise ConfigError(f"sparsity schedule (update_every={s.update_every!r}, update_end="
                          f"{s.update_end}, {total_steps} training steps): {e}") from None


def build_sparsifier(cfg: Config, model: nn.Module, steps_per_epoch: int,
                     sparse_init: bool | None = None):
    """The method's sparsifier, through the METHODS registry alone: a method with its own
    constructor (`Method.make`, e.g. DST) gets its config section (`Method.options`) as keyword
    arguments; every other method is a `Sparsifier`. `sparse_init` overrides
    `sparsity.sparse_init` (the truly sparse build scales the init itself, after the conv init)."""
    s = cfg.sparsity
    total_steps = steps_per_epoch * cfg.train.epochs
    try:
        spec = METHODS.get(s.method)
    except ValueError as e:
        raise ConfigError(f"sparsity.method: {e}") from None
    if spec.make is not None:
        if s.fixed:
            raise ConfigError(f"sparsity.fixed={s.fixed!r} does not apply to method {s.method!r} "
                              "(its masks are not set by topology updates); leave it empty")
        options = vars(getattr(cfg, spec.options)) if spec.options else {}
        return spec.make(model, include=s.include, seed=cfg.seed, **options)
    grow = s.grow or spec.grow
    dynamic = (s.drop or spec.drop) is not None and (grow is not None or spec.prune)
    grow_kwargs = None
    if grow == "search":
        grow_kwargs = {**vars(cfg.search), **vars(cfg.signal)}
    return Sparsifier(
        model, s.density, method=s.method,
        schedule=resolve_schedule(cfg, steps_per_epoch, total_steps) if dynamic else None,
        distribution=s.distribution, drop=s.drop, grow=s.grow, grow_kwargs=grow_kwargs,
        include=s.include, dense_layers=s.dense_layers, fixed=s.fixed, allow_regrow=s.allow_regrow,
        grow_init=s.grow_init,
        sparse_init=s.sparse_init if sparse_init is None else sparse_init, storage=s.storage, fan_in=s.fan_in,
        seed=cfg.seed,
    )


def build_optimizer(cfg: Config, model: nn.Module, sparsifier) -> torch.optim.Optimizer:
    t = cfg.train
    if hasattr(sparsifier, "param_groups"):  # e.g. DST keeps its thresholds out of weight decay
        params = sparsifier.param_groups(model, t.weight_decay)
    else:
        params = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": t.weight_decay}]
    # every group carries "lr_scale": the loop sets its lr to the schedule's lr times it
    scales = fan_in_lr_scales(model, t.lr_fan_in_base) if t.lr_fan_in_base else {}
    params = split_param_groups(params, model, scales)
    for group in params:
        group["lr"] = t.lr * group["lr_scale"]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr)
    return torch.optim.AdamW(params, lr=t.lr)


def lr_at(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate as a pure function of the step (0-based)."""
    t = cfg.train
    warmup = t.warmup_epochs * steps_per_epoch
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if t.lr_schedule == "step":  # x0.1 at 50% and 75% of training
        return t.lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))
    return t.lr
