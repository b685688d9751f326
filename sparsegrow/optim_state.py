"""Reset optimizer state of dropped and grown connections, for any torch optimizer.

A connection that is dropped must not come back carrying its old momentum, and a grown one must
start with fresh moments (RigL resets them too). Every state tensor with the parameter's shape
(SGD's momentum_buffer, Adam's exp_avg / exp_avg_sq / max_exp_avg_sq, ...) is zeroed at the given
flat positions; scalars such as Adam's `step` are left alone.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def reset_positions(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                    flat_idx: torch.Tensor) -> None:
    state = optimizer.state.get(param)
    if not state or flat_idx.numel() == 0:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.view(-1)[flat_idx.to(value.device)] = 0


@torch.no_grad()
def reindex(optimizer: torch.optim.Optimizer, param: torch.Tensor, keep_src: torch.Tensor,
            keep_dst: torch.Tensor, new_numel: int) -> None:
    """Re-index per-nnz state after a truly sparse parameter changed length.

    Every state tensor with the parameter's (old) 1-D shape becomes a zero tensor of length
    `new_numel` with new[keep_dst] = old[keep_src]: kept connections keep their state, dropped
    ones vanish, grown ones start at zero. Call before the parameter's data is replaced.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in list(state.items()):
        if torch.is_tensor(value) and value.dim() == 1 and value.shape == param.shape:
            new = value.new_zeros(new_numel)
            new[keep_dst] = value[keep_src]
            state[key] = new
