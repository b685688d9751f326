"""Reset optimizer state of dropped and grown connections: one table entry per optimizer.

A connection that is dropped must not come back carrying its old moments, and a grown one must
start with the state a fresh parameter would get (RigL resets moments too). What "fresh" means
depends on the optimizer, so `RESETS` says, per optimizer class, what each per-weight state
tensor (one with the parameter's shape) starts at, as a function of the parameter's group:

    SGD       momentum_buffer                           0
    Adam(W)   exp_avg, exp_avg_sq, max_exp_avg_sq       0
    RMSprop   square_avg, momentum_buffer, grad_avg     0
    Adagrad   sum                                       group["initial_accumulator_value"]
    Rprop     prev                                      0
              step_size                                 group["lr"] (torch's initial step size;
                                                        0 would pin the weight: steps grow by
                                                        x1.2 from the 1e-6 floor)

Per-parameter scalars (`step` of Adam, RMSprop, Adagrad, Rprop) are left alone: one counter is
shared by every connection of the tensor, so restarting it would restart Adam's bias correction
(and Adagrad's lr decay) for the kept connections too. A grown connection under Adam therefore
takes a smaller first step than a fresh parameter would (m_hat = (1 - b1) g / (1 - b1^t)), as in
RigL, which zeroes the moments and keeps the global step.

Each entry also records whether a connection whose gradient is exactly zero and whose state holds
the table's values stays exactly at weight zero (`zero_stays_zero`, reasoned per optimizer in
the table below). For masked storage the gradient hook zeroes inactive gradients, and dropping
resets their state, so with such an optimizer inactive weights need no re-zeroing between updates.

Optimizers outside the table are refused at `Sparsifier.attach` (their state's meaning is
unknown); `register_optimizer` adds one. Truly sparse storage re-indexes per-nnz state with the
same table (`reindex`): grown positions get the table's value.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Initial = Callable[[dict], float]  # the parameter's group -> initial value of one state entry


@dataclass(frozen=True)
class StateReset:
    """What a new connection's per-weight optimizer state starts at, for one optimizer class.

    initial: state key -> function of the param group giving the value, e.g. {"sum": lambda g:
        g["initial_accumulator_value"]}; every per-weight state key the optimizer keeps must be
        listed (scalars such as `step` are never touched).
    zero_stays_zero: with a zero gradient and this state, a zero weight stays exactly zero
        (weight decay included). False makes the Sparsifier re-zero inactive weights every step.
    """

    initial: Mapping[str, Initial]
    zero_stays_zero: bool


def _zero(group: dict) -> float:
    return 0.0


def _lr(group: dict) -> float:
    return float(group["lr"])


def _initial_accumulator(group: dict) -> float:
    return float(group["initial_accumulator_value"])


RESETS: dict[type, StateReset] = {
    # w -= lr * (g + wd w + momentum buf): g = w = buf = 0 gives buf = 0 and no move (nesterov too).
    torch.optim.SGD: StateReset({"momentum_buffer": _zero}, True),
    # m = v = 0 and g + wd w = 0 keep m = v = 0, update m_hat / (sqrt(v_hat) + eps) = 0.
    torch.optim.Adam: StateReset({"exp_avg": _zero, "exp_avg_sq": _zero, "max_exp_avg_sq": _zero},
                                 True),
    # as Adam; decoupled decay w *= 1 - lr wd keeps 0 at 0.
    torch.optim.AdamW: StateReset({"exp_avg": _zero, "exp_avg_sq": _zero, "max_exp_avg_sq": _zero},
                                  True),
    # square_avg = grad_avg = 0 give avg = eps; update (g / avg, through the momentum buffer) = 0.
    torch.optim.RMSprop: StateReset(
        {"square_avg": _zero, "momentum_buffer": _zero, "grad_avg": _zero}, True),
    # sum += g^2 leaves sum >= 0; update g / (sqrt(sum) + eps) = 0.
    torch.optim.Adagrad: StateReset({"sum": _initial_accumulator}, True),
    # sign(g * prev) = 0 keeps step_size; update sign(g) * step_size = 0.
    torch.optim.Rprop: StateReset({"prev": _zero, "step_size": _lr}, True),
}


def register_optimizer(cls: type, initial: Mapping[str, float | Initial], *,
                       zero_stays_zero: bool = False) -> None:
    """Add (or replace) the reset entry of optimizer class `cls` (matched exactly, not subclasses).

    initial: every per-weight state key of `cls` -> its value for a new connection, a number or a
        function of the parameter's group ({} for an optimizer without per-weight state).
    zero_stays_zero: True only if a zero weight with zero gradient and this state never moves
        under `cls` (see `StateReset`); False keeps the safe per-step re-zeroing.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"register_optimizer expects a torch.optim.Optimizer subclass, got {cls!r}")
    table = {}
    for key, value in initial.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            table[key] = (lambda v: lambda group: v)(float(value))
        elif callable(value):
            table[key] = value
        else:
            raise ValueError(f"register_optimizer({cls.__name__}): the initial value of {key!r} "
                             f"must be a number or a function of the param group, got {value!r}")
    RESETS[cls] = StateReset(table, bool(zero_stays_zero))


def supported() -> list[str]:
    return [cls.__name__ for cls in RESETS]


def reset_entry(optimizer: torch.optim.Optimizer) -> StateReset:
    """The table entry of `optimizer`'s exact class; a ValueError naming the supported ones."""
    entry = RESETS.get(type(optimizer))
    if entry is None:
        raise ValueError(
            f"sparsegrow does not know how to reset the state of {type(optimizer).__name__} for "
            f"new connections; supported: {', '.join(supported())}. Add it with "
            "sparsegrow.register_optimizer(cls, {state key: initial value})")
    return entry


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> None:
    """Check that `optimizer` is in the table and trains every sparse parameter {fqn: Parameter}."""
    reset_entry(optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [fqn for fqn, p in params.items() if id(p) not in held]
    if missing:
        raise ValueError(
            f"the optimizer does not hold the sparse parameter(s) {missing}, so they would never "
            "train: build the optimizer after the Sparsifier (storage='sparse' replaces each "
            "Linear weight by a new `values` Parameter, which an optimizer built before never sees)")


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("the optimizer does not hold this parameter; build it after the Sparsifier")


def _per_weight(optimizer, param, state) -> dict[str, float]:
    """{key: initial value} of every per-weight state tensor of `param` (same shape as it)."""
    entry = reset_entry(optimizer)
    keys = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0
            and v.shape == param.shape]
    unknown = [k for k in keys if k not in entry.initial]
    if unknown:
        raise ValueError(
            f"{type(optimizer).__name__} keeps per-weight state {unknown} that the reset table "
            f"does not list (it lists {sorted(entry.initial)}); register it with "
            "sparsegrow.register_optimizer")
    group = _group_of(optimizer, param)
    return {k: entry.initial[k](group) for k in keys}


@torch.no_grad()
def reset_positions(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                    flat_idx: torch.Tensor) -> None:
    """Set every per-weight state tensor of `param` at `flat_idx` to the table's initial value."""
    state = optimizer.state.get(param)
    if not state or flat_idx.numel() == 0:
        return
    for key, value in _per_weight(optimizer, param, state).items():
        buf = state[key]
        buf.view(-1)[flat_idx.to(buf.device)] = value


@torch.no_grad()
def reindex(optimizer: torch.optim.Optimizer, param: torch.Tensor, keep_src: torch.Tensor,
            keep_dst: torch.Tensor, new_numel: int) -> None:
    """Re-index per-nnz state after a truly sparse parameter changed length.

    Every state tensor with the parameter's (old) 1-D shape becomes a tensor of length
    `new_numel` holding the table's initial value, with new[keep_dst] = old[keep_src]: kept
    connections keep their state, dropped ones vanish, grown ones start fresh. Call before the
    parameter's data is replaced.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in _per_weight(optimizer, param, state).items():
        old = state[key]
        new = old.new_full((new_numel,), value)
        new[keep_dst] = old[keep_src]
        state[key] = new


def keeps_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether inactive weights stay exactly zero under `optimizer` without re-zeroing."""
    return reset_entry(optimizer).zero_stays_zero
