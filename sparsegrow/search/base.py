"""The one contract every search backend keeps, the metric transforms, and the top-n pool.

Contract (faiss-like): an index is built over one group of vectors and searched with the other.

    index = BACKENDS.get("faiss-hnsw")(**options)
    index.build(base)                      # base: (n_base, d) float32, e.g. the M columns of X
    scores, ids = index.search(queries, k) # queries: (n_q, d) -> (n_q, k) inner products, ids
                                           # (ids are -1 where fewer than k were found)
    lims, scores, ids = index.range_search(queries, threshold)   # optional: all ip > threshold

Every index does maximum-inner-product search. The thesis's metrics are reduced to it here:
    ip      score ⟨u, v⟩
    abs_ip  score |⟨u, v⟩|, searched with both signs of the query (u and -u) and merged
    l2      score -‖u - v‖², via the augmentation u' = [u, -1], v' = [v, ‖v‖²/2], for which
            ⟨u', v'⟩ = ⟨u, v⟩ - ‖v‖²/2 ranks each query's neighbours as L2 does, and
            -‖u - v‖² = 2⟨u', v'⟩ - ‖u‖² ranks pairs globally.

`TopPool` keeps the n best (flat index, score) pairs seen so far with a running threshold and
never more than `capacity` pairs; exact search and the merge of approximate results share it.
"""
from __future__ import annotations

import importlib
import math

import torch

from ..registry import Registry
from ..selection import select_top
from ..metrics import union_sorted
from ..topology import isin_sorted, sample_inactive

METRICS = ("ip", "abs_ip", "l2")

BACKENDS: Registry = Registry("search backend")

INSTALL_HINT = "pip install sparsegrow[search]"


def require(module: str, backend: str):
    """Import an optional package or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"search backend {backend!r} needs the optional package {module!r}, which is not "
            f"installed; install it with `{INSTALL_HINT}`"
        ) from e


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown search metric {metric!r}; allowed: {', '.join(METRICS)}")


def to_l2_base(v: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, d+1): [v, ‖v‖²/2]."""
    return torch.cat([v, 0.5 * (v * v).sum(1, keepdim=True)], 1)


def to_l2_query(u: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, d+1): [u, -1]."""
    return torch.cat([u, -torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], 1)


def index_dtype(numel: int) -> torch.dtype:
    """Flat indices fit int32 up to 2^31 - 1: half the memory of int64 in candidate pools."""
    return torch.int32 if numel < 2**31 else torch.int64


class TopPool:
    """The n largest scores among non-excluded flat indices, kept with a running threshold.

    Invariant: the pool holds every non-excluded pair offered so far whose score is >= `threshold`
    (the threshold only rises, and only to the n-th largest score in the pool, so every pair of
    the global top n that was offered is kept, ties at the n-th value included). `select` then
    breaks ties at the n-th value with the caller's generator exactly as `select_top` does over
    a dense score vector in flat order, so the result equals dense top-n selection.
    """

    def __init__(self, n: int, excluded: torch.Tensor, numel: int, threshold: float = -math.inf,
                 capacity: int | None = None):
        self.n = n
        self.numel = numel
        self.excluded = excluded
        self.threshold = threshold
        self.capacity = max(capacity or 2 * n, n + 1024)
        self.dtype = index_dtype(numel)
        self._idx: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []
        self.size = 0
        self.offered = 0  # pairs that passed the threshold (before exclusion), for stats
        self.prunes = 0

    def add(self, idx: torch.Tensor, val: torch.Tensor, filtered: bool = False) -> None:
        """idx: (c,) flat indices (int64), val: (c,) scores. filtered: already >= threshold."""
        if not filtered:
            keep = val >= self.threshold
            idx, val = idx[keep], val[keep]
        if idx.numel() == 0:
            return
        self.offered += idx.numel()
        if self.excluded.numel():
            free = ~isin_sorted(idx, self.excluded)
            idx, val = idx[free], val[free]
        elif filtered:  # nothing copied them yet, and the caller may reuse its buffers (exact does)
            idx, val = idx.to(self.dtype, copy=True), val.clone()
        self._idx.append(idx.to(self.dtype))
        self._val.append(val)
        self.size += idx.numel()
        if self.size > self.capacity:
            self._prune()

    def _prune(self) -> None:
        idx, val = self._cat()
        kth = float(torch.topk(val, self.n, sorted=False).values.min())
        keep = val >= kth
        self._idx, self._val = [idx[keep]], [val[keep]]
        self.size = int(keep.sum())
        self.threshold = max(self.threshold, kth)
        self.prunes += 1

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._idx:
            dev = self.excluded.device
            return (torch.empty(0, dtype=self.dtype, device=dev), torch.empty(0, device=dev))
        if len(self._idx) > 1:
            self._idx, self._val = [torch.cat(self._idx)], [torch.cat(self._val)]
        return self._idx[0], self._val[0]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices sorted ascending as int64, their scores) of everything in the pool."""
        idx, val = self._cat()
        idx, order = torch.sort(idx.long())
        return idx, val[order]

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 flat indices, scores) of the pool's pairs >= its k-th best score (ties
        kept: k or more), emptying the pool: the cut comes before the sort, so only those are
        sorted and the pool's own buffers are freed first."""
        idx, val = self._cat()
        self._idx, self._val, self.size = [], [], 0
        if val.numel() > k:
            keep = val >= torch.topk(val, k, sorted=False).values.min()
            idx, val = idx[keep], val[keep]
            del keep
        idx, order = torch.sort(idx.long())
        return idx, val[order]

    def result(self, generator: torch.Generator, fill: float = 0.0):
        """The n best pairs: (sorted flat indices, scores, how many were filled at random).

        If fewer than n pairs were pooled (every pair offered is in the pool), the rest are drawn
        uniformly among the inactive pairs outside it, with score `fill`."""
        missing = max(0, self.n - self.size)
        if not missing:
            return (*self.select(self.n, generator), 0)
        idx, val = self.contents()
        extra = sample_inactive(self.numel, union_sorted(self.excluded, idx), missing, generator,
                                self.excluded.device)
        idx, order = torch.sort(torch.cat([idx, extra]))
        val = torch.cat([val, torch.full((missing,), fill, device=val.device)])[order]
        return idx, val, missing

    def select(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best pairs (k <= pool size): (sorted flat indices, scores)."""
        idx, val = self._cat()
        if val.numel() > k:  # only pairs >= the k-th best can be chosen: sort just those
            keep = val >= torch.topk(val, k, sorted=False).values.min()
            idx, val = idx[keep], val[keep]
        idx, order = torch.sort(idx.long())
        val = val[order]
        pos = select_top(val, k, generator)
        return idx[pos], val[pos]


def best_scored(keys: torch.Tensor, scores: torch.Tensor, n: int, excluded: torch.Tensor,
                numel: int, generator: torch.Generator):
    """The n best of scored candidates: (sorted flat indices (n,), scores, random_filled).

    keys: sorted distinct inactive flat indices, scores: their scores. Ties at the n-th value are
    broken with `generator` (as `select_top`); with fewer than n candidates the rest are drawn
    uniformly among the other inactive pairs (score -inf), so the layer keeps its density."""
    if keys.numel() == n:  # nothing to choose (lowrank with one candidate per grown pair)
        return keys, scores, 0
    if keys.numel() > n:  # only pairs >= the n-th best can be chosen
        top = scores >= torch.topk(scores, n, sorted=False).values.min()
        keys, scores = keys[top], scores[top]
        pos = select_top(scores, n, generator)
        return keys[pos], scores[pos], 0
    missing = n - keys.numel()
    extra = sample_inactive(numel, union_sorted(excluded, keys), missing, generator, keys.device)
    idx, order = torch.sort(torch.cat([keys, extra]))
    val = torch.cat([scores, scores.new_full((missing,), -math.inf)])[order]
    return idx, val, missing


def check_pairs_call(Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
                     metric: str, metrics: tuple[str, ...], who: str) -> tuple[int, int]:
    """The checks every `pairs` backend makes first: (N, M). who: e.g. "backend 'lowrank'
    supports", the start of the metric error."""
    if metric not in metrics:
        raise ValueError(f"{who} metrics {', '.join(metrics)}, not {metric!r}")
    N, M = Z.shape[1], X.shape[1]
    if n > N * M - excluded.numel():
        raise ValueError(f"cannot grow {n} connections: only {N * M - excluded.numel()} "
                         "are inactive")
    return N, M
