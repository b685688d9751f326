"""Which connections exist in each sparse parameter: the storage interface and its masked form.

A sparse parameter is addressed by flat ("linear") indices into its dense shape, e.g. for a
Linear weight of shape (N, M) the connection (j, i) is index j * M + i. The active set is a
sorted 1-D LongTensor of such indices. Every storage implements the same four operations, so
every drop/grow criterion, distribution and schedule works on any of them:

    active()                      -> sorted flat indices of active connections, (nnz,)
    values(idx)                   -> current weights at flat indices idx, (len(idx),)
    update(drop, grow, init, opt) -> remove `drop`, add `grow` with initial values `init`,
                                     and reset the optimizer state of both
    enforce()                     -> inactive weights are exactly zero (after updates and loads)
    reset_inactive_state(opt)     -> the optimizer state of inactive connections holds the
                                     reset table's values (`optim_state.RESETS`; at attach, loads)

`param` is the Parameter the optimizer must train (the dense weight for masked storage, the
`values` of truly sparse storage).

`MaskedParam` (this file) keeps a dense weight and a boolean mask; the mask is the single
source of truth. Truly sparse storage (values + indices) lives in `sparsegrow.layers`.

The helpers on sorted index sets at the bottom never build a dense tensor, so samplers and
criteria written with them also serve layers too wide for a dense mask.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from . import optim_state


class SparseParam(Protocol):
    fqn: str  # fully qualified parameter name, e.g. "features.0.weight"
    shape: torch.Size  # dense shape (out, in, *kernel)
    numel: int
    module: nn.Module
    param: nn.Parameter  # what the optimizer trains; the Sparsifier checks it holds it

    def active(self) -> torch.Tensor: ...
    def nnz(self) -> int: ...
    def values(self, idx: torch.Tensor) -> torch.Tensor: ...
    def update(self, drop: torch.Tensor, grow: torch.Tensor, init: torch.Tensor,
               optimizer: torch.optim.Optimizer | None) -> None: ...
    def enforce(self) -> None: ...
    def reset_inactive_state(self, optimizer: torch.optim.Optimizer) -> None: ...
    def scale_init_to_active_fan_in(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def squash(self, model: nn.Module) -> None:
        """Finalise: leave `model` a plain module holding this weight densely (zeros off the
        active set), with no hook, buffer or sparse layer of the storage left behind."""


@runtime_checkable
class DenseGradSource(Protocol):
    """A storage that forms the dense weight gradient (masked storage) and lets the growth
    signal read it, unmasked, in each backward: `observe_grad(fn)` calls fn(grad) with the dense
    gradient (*shape) before the mask is applied; `observe_grad(None)` stops."""

    fqn: str
    shape: torch.Size
    param: nn.Parameter

    def observe_grad(self, fn: Callable[[torch.Tensor], None] | None) -> None: ...


class MaskedParam:
    """A dense weight with a boolean mask of the same shape (the reference storage).

    The mask is a persistent buffer of the weight's own module, `<param_name>_mask` (e.g.
    `fc1.weight_mask`), so `model.to()`, `model.state_dict()` and `model.load_state_dict()` carry
    the topology with the weights; this object holds no tensor of its own. Loading a model state
    restores the topology: `active()` reads the buffer, and a load hook zeroes the weight off it.

    A gradient hook zeroes the weight gradient off the mask (a select, not a product: NaN * 0 is
    NaN). With the optimizer state of inactive connections at the reset table's values (attach
    and every drop put it there), momentum, Adam moments and (coupled or decoupled) weight decay
    then never move an inactive weight away from exactly zero, even when training diverges; the
    table reasons it out per optimizer. So `enforce` is needed only after updates and loads.
    The hook first hands the unmasked dense gradient to its observer, if any (`observe_grad`:
    the growth signal of RigL's gradient grow, summed over micro-batches and ranks there).

    Why a buffer and not a torch.nn.utils.parametrize parametrization (torch.ao's FakeSparsity):
    a parametrization renames the weight in the state_dict (`parametrizations.weight.original`),
    so a sparse model's checkpoint would no longer load into the plain architecture, and it
    multiplies weight by mask in every forward; the buffer keeps `weight` where it was and costs
    nothing per step (the gradient hook and `enforce()` already keep inactive weights at zero).
    """

    def __init__(self, fqn: str, module: nn.Module, param_name: str, active: torch.Tensor):
        self.fqn = fqn
        self.module = module
        self.param_name = param_name
        self.mask_name = mask_buffer_name(param_name)
        param = self.param
        self.shape = param.shape
        self.numel = param.numel()
        mask = torch.zeros(self.shape, dtype=torch.bool, device=param.device)
        mask.view(-1)[active.to(param.device)] = True
        if self.mask_name in module._parameters or (
                hasattr(module, self.mask_name) and self.mask_name not in module._buffers):
            raise ValueError(f"{fqn}: its module already has an attribute {self.mask_name!r}, "
                             "where masked storage keeps the mask; rename it or use include=...")
        module.register_buffer(self.mask_name, mask, persistent=True)
        self._grad_observer: Callable[[torch.Tensor], None] | None = None
        old = getattr(param, "_sparsegrow_hook", None)
        if old is not None:  # sparsified again: the newest mask alone applies
            old.remove()
        self._hook = param._sparsegrow_hook = param.register_hook(self._mask_grad)
        self._load_hooks = [
            module._register_load_state_dict_pre_hook(self._before_load),
            module.register_load_state_dict_post_hook(lambda m, keys: self.enforce()),
        ]
        self.enforce()

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def mask(self) -> torch.Tensor:
        """The module's mask buffer (*shape), bool; wherever `.to()` has moved it."""
        return self.module._buffers[self.mask_name]

    def _before_load(self, state_dict, prefix, *args) -> None:
        # A model state saved before masks lived in the model (no `<name>_mask` key): keep the
        # current mask; the Sparsifier's state_dict, loaded next, restores the saved one.
        key = prefix + self.mask_name
        if key not in state_dict and prefix + self.param_name in state_dict:
            state_dict[key] = self.mask.clone()

    def observe_grad(self, fn: Callable[[torch.Tensor], None] | None) -> None:
        self._grad_observer = fn

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._grad_observer is not None:
            self._grad_observer(grad)
        return torch.where(self.mask, grad, 0)

    def active(self) -> torch.Tensor:
        return torch.nonzero(self.mask.view(-1)).squeeze(1)

    def nnz(self) -> int:
        return int(self.mask.sum())

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        return self.param.detach().view(-1)[idx]

    @torch.no_grad()
    def update(self, drop, grow, init, optimizer=None) -> None:
        flat_w, flat_m = self.param.view(-1), self.mask.view(-1)
        flat_m[drop] = False
        flat_w[drop] = 0
        flat_m[grow] = True
        flat_w[grow] = init.to(flat_w.dtype)
        if optimizer is not None:
            optim_state.reset_positions(optimizer, self.param, torch.cat([drop, grow]))

    @torch.no_grad()
    def enforce(self) -> None:
        self.param.masked_fill_(~self.mask, 0)  # not mul_: NaN * 0 is NaN

    @torch.no_grad()
    def reset_inactive_state(self, optimizer: torch.optim.Optimizer) -> None:
        # e.g. momentum left by dense training before sparsifying, which would move inactive weights
        optim_state.reset_positions(optimizer, self.param,
                                    torch.nonzero(~self.mask.view(-1)).squeeze(1))

    @torch.no_grad()
    def scale_init_to_active_fan_in(self) -> None:
        """Sparse-aware init: scale each output unit's weights by sqrt(fan_in / active fan_in)."""
        rows = self.mask.view(self.shape[0], -1)  # (out, in * kh * kw)
        scale = (rows.shape[1] / rows.sum(1).clamp(min=1).float()).sqrt()
        self.param.view(self.shape[0], -1).mul_(scale[:, None].to(self.param.dtype))

    def remove(self) -> None:
        """Detach from the model: no gradient hook, no load hooks, no mask buffer. The weight
        keeps its values (zeros off the mask); `Sparsifier.squash()` calls this for every layer."""
        self._hook.remove()
        if getattr(self.param, "_sparsegrow_hook", None) is self._hook:
            del self.param._sparsegrow_hook
        for h in self._load_hooks:
            h.remove()
        self._load_hooks = []
        self.module._buffers.pop(self.mask_name, None)

    def squash(self, model: nn.Module) -> None:
        self.enforce()
        self.remove()

    def state_dict(self) -> dict:
        return {"mask": self.mask.clone()}

    def load_state_dict(self, state: dict) -> None:
        mask = state["mask"].to(self.mask.device)
        if mask.shape != self.mask.shape:
            raise ValueError(f"{self.fqn}: mask shape {tuple(mask.shape)} != {tuple(self.shape)}")
        self.mask.copy_(mask)
        self.enforce()


def mask_buffer_name(param_name: str) -> str:
    """Where masked storage keeps a weight's mask in its module: "weight" -> "weight_mask"."""
    return f"{param_name}_mask"


# ---------------------------------------------------------------------------------------------
# Sorted index-set helpers (no dense tensors).


def isin_sorted(x: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """Boolean (len(x),): which entries of x are in the sorted 1-D tensor `sorted_set`."""
    if sorted_set.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    pos = torch.searchsorted(sorted_set, x).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[pos] == x


def sample_inactive(numel: int, excluded: torch.Tensor, k: int, generator: torch.Generator,
                    device=None) -> torch.Tensor:
    """k distinct flat indices in [0, numel) not in the sorted `excluded`, uniformly at random.

    Returns them sorted. Small or nearly full layers (or a k near the free count) take the
    complement directly; otherwise rejection sampling (draw, deduplicate, drop excluded, repeat), which never allocates more than
    O(k) memory. Choosing a random k-subset of the distinct accepted draws keeps it uniform.
    """
    device = device if device is not None else excluded.device
    n_free = numel - excluded.numel()
    if k > n_free:
        raise ValueError(f"cannot grow {k} connections: only {n_free} of {numel} are inactive")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    # The complement costs O(numel); rejection costs O(k) draws per round and needs few rounds
    # unless most free positions are wanted or few are free.
    if numel <= (1 << 16) or n_free < 0.05 * numel or k > n_free // 2:
        free = torch.ones(numel, dtype=torch.bool)
        free[excluded.cpu()] = False
        cand = torch.nonzero(free).squeeze(1)
    else:
        # Draws come from the (CPU) generator, so a seed picks the same connections on every
        # device; filtering and deduplication run where `excluded` lives (on a GPU they cost
        # ~0.5-3 s per update on the CPU at 4096²-65536², hundreds of layer steps).
        cand = torch.empty(0, dtype=torch.long, device=excluded.device)
        while cand.numel() < k:
            need = k - cand.numel()
            draw = math.ceil(need * numel / n_free * 1.2) + 64
            new = torch.randint(0, numel, (draw,), generator=generator).to(excluded.device)
            # Deduplicate before filtering, on sorted draws: the binary searches of consecutive
            # sorted queries walk the same paths through `excluded`, 10× faster than unsorted
            # ones at 12 M draws into 40 M actives (benchmarks/bench_random_grow.py).
            new = torch.unique_consecutive(torch.sort(new).values)
            new = new[~isin_sorted(new, excluded)]
            cand = new if cand.numel() == 0 else torch.unique(torch.cat([cand, new]))  # sorted
    # A uniform k-subset of the distinct accepted draws, kept in order by a mask (no sort).
    pick = torch.randperm(cand.numel(), generator=generator).to(cand.device)[:k]
    keep = torch.zeros(cand.numel(), dtype=torch.bool, device=cand.device)
    keep[pick] = True
    return cand[keep].to(device)


def sample_rows(rows: int, fan: int, k: int, generator: torch.Generator, device=None,
                excluded: torch.Tensor | None = None) -> torch.Tensor:
    """k distinct flat indices in each row of a (rows, fan) layout, none in the sorted `excluded`,
    uniformly at random per row (constant fan-in). Returns rows * k sorted flat indices.

    Draws one uniform key per entry (O(rows * fan), the size of a masked layer) and keeps each
    row's k smallest keys among its eligible entries.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    keys = torch.rand(rows, fan, generator=generator)  # (rows, fan), on the CPU generator
    if excluded is not None and excluded.numel():
        keys.view(-1)[excluded.cpu()] = 2.0  # above every key: never among the k smallest
        room = fan - torch.bincount(excluded.cpu() // fan, minlength=rows)
        if bool((room < k).any()):
            raise ValueError(f"cannot grow {k} connections per row: a row has only "
                             f"{int(room.min())} inactive")
    cols = keys.topk(k, dim=1, largest=False).indices  # (rows, k)
    flat = (cols + fan * torch.arange(rows)[:, None]).reshape(-1)
    return torch.sort(flat).values.to(device if device is not None else "cpu")
