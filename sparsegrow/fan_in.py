"""Learning rates scaled by a layer's active fan-in: µP's readout rule, for sparse layers.

An SGD step moves a layer's output unit by about lr · δ · Σ_i x_i², summed over its F active
inputs: with O(1) inputs, in proportion to F. A truly sparse hidden layer keeps F small at any
width (ER at ε = 20: F ≈ 20–40 at 10⁶ units), but a dense classifier over 10⁶ hidden units has
F = 10⁶, so at the lr that trains the hidden layers one step throws the logits far off
(784-262144-262144-10, lr 0.05: max |logit| 0.34 → 16 → 158 in two steps, the loss 94 by step
5; benchmarks/results/first_steps_s6.txt). µP (Yang & Hu 2021, "Tensor Programs IV") scales the readout's SGD lr as 1/width;
with sparse layers the width that counts is the active fan-in. `fan_in_lr_scales(model, base)`
gives lr × base / F to every weight whose F exceeds `base`, and 1 to the rest: unlike µP it does
not single out the readout, so choose a base above every hidden layer's fan-in (the configs use
1024 with hidden fan-ins of 20–65). With SGD and AdamW the weight decay step is lr-proportional,
so a scaled weight's decay shrinks by the same factor.

Only for methods whose inactive weights are exactly zero from the start (every registered
method but GMP and DST): one that starts dense or learns its density would be scaled by its
dense fan-in for the whole run; the experiments' config refuses that combination.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers.sparse_conv import SparseConv2d
from .layers.sparse_linear import SparseLinear


def active_fan_in(module: nn.Module) -> float | None:
    """Mean active inputs per output unit of a Linear / Conv2d layer (dense, masked or truly
    sparse: counts the nonzero weights, which are the active ones for masked storage; DST's
    thresholded weights are dense), None for any other module."""
    if isinstance(module, SparseLinear):
        return module.values.numel() / module.out_features
    if isinstance(module, SparseConv2d):
        return module.values.numel() / module.out_channels
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        w = module.weight
        if w.device.type == "meta":
            raise ValueError("active_fan_in: the model is still on the meta device; "
                             "materialise it first")
        return torch.count_nonzero(w.detach()).item() / w.shape[0]
    return None


def fan_in_lr_scales(model: nn.Module, base: int) -> dict[str, float]:
    """{parameter name: lr multiplier base / F} for every Linear / Conv2d weight (the `values`
    of a truly sparse layer) whose active fan-in F exceeds `base`; the rest keep lr × 1 and are
    not listed. Biases are not scaled (their step does not sum over inputs); frozen weights
    (requires_grad False) are left out."""
    if not (isinstance(base, int) and base > 0):
        raise ValueError(f"fan_in_lr_scales: base must be a positive int, got {base!r}")
    scales = {}
    for name, module in model.named_modules():
        fan_in = active_fan_in(module)
        if fan_in is None or fan_in <= base:
            continue
        weight = "values" if isinstance(module, (SparseLinear, SparseConv2d)) else "weight"
        if getattr(module, weight).requires_grad:
            scales[f"{name}.{weight}" if name else weight] = base / fan_in
    return scales


def split_param_groups(groups: list[dict], model: nn.Module, scales: dict[str, float]) -> list[dict]:
    """The optimizer's param groups with every scaled parameter moved to a group of its own,
    each group given its "lr_scale" (1.0 for the rest): set group["lr"] = lr * group["lr_scale"]
    at each step."""
    by_id = {id(p): scales[n] for n, p in model.named_parameters() if n in scales}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in by_id]
        options = {k: v for k, v in group.items() if k != "params"}
        if rest:
            out.append({**options, "params": rest, "lr_scale": 1.0})
        for p in group["params"]:
            if id(p) in by_id:
                out.append({**options, "params": [p], "lr_scale": by_id[id(p)]})
    missing = set(by_id) - {id(p) for g in groups for p in g["params"]}
    if missing:
        names = sorted(n for n, p in model.named_parameters() if id(p) in missing)
        raise ValueError(f"split_param_groups: {names} are scaled but in no param group")
    return out


__all__ = ["active_fan_in", "fan_in_lr_scales", "split_param_groups"]
