"""Top-n pairs of two vector groups through any backend: the growth search.

    idx, scores, info = top_pairs(Z, X, n, excluded, generator, backend="faiss-hnsw",
                                  metric="abs_ip", k_similar=0.15)

Z: (R, N) and X: (R, M) hold the two groups as columns (for growth: dZ and the layer input, R
batch rows). The result is the n best flat indices j * M + i, sorted, none in `excluded`.

backend "exact" searches all pairs globally (`exact_top_pairs`). Every other backend is built over
the M columns of X and searched with the N columns of Z; each query's candidates go to one global
`TopPool`. How many candidates each query gets is the crux (thesis ch. 3):

  * per-query (global_threshold=False): k = ceil(k_similar * M) for every query, the thesis's rule.
    When a few rows hold most of the mass of S = Zᵀ X, their true top entries far exceed k while
    most other queries contribute nothing: recall collapses (0.07 measured for HNSW).
  * global threshold (default): the same total budget k_similar * M * N is shared among queries in
    proportion to how many of their entries exceed the global n-th best score, estimated from a
    random sample of columns; range backends ("faiss-range") search every query above the
    estimated threshold directly.

If fewer than n inactive candidates come back, the rest are drawn at random among inactive pairs
(reported as "random_filled"), so the layer keeps its exact density.
"""
from __future__ import annotations

import math

import torch

from ..selection import require_finite
from .base import BACKENDS, TopPool, check_metric, to_l2_base, to_l2_query
from .auto import auto_top_pairs
from .exact import _scores, exact_top_pairs

_SAMPLE_COLS = 512


def uses_k_similar(backend: str) -> bool:
    """Whether `k_similar` shapes `backend`'s growth: only the per-query index searches below use
    it; exact search, auto and the pair samplers (mode "pairs") choose pairs without it."""
    return backend not in ("exact", "auto") and getattr(BACKENDS.get(backend), "mode", "knn") != "pairs"


def _estimate_counts(Z, X, n, metric, generator_seed: int) -> torch.Tensor:
    """(N,) estimated number of entries of each row of S above the global n-th best score."""
    N, M = Z.shape[1], X.shape[1]
    g = torch.Generator().manual_seed(generator_seed)
    cols = torch.randperm(M, generator=g)[:_SAMPLE_COLS].to(Z.device)
    s = _scores(Z.t() @ X[:, cols], metric, Z, X[:, cols])  # (N, m)
    p = min(1.0, n / (N * M))
    flat = s.reshape(-1)
    if flat.numel() > 16_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=g)[:16_000_000].to(flat.device)]
    tau = torch.quantile(flat, 1.0 - p)
    return (s >= tau).float().mean(1) * M


def _allocate_k(Z, X, n, budget, metric, seed) -> torch.Tensor:
    """(N,) per-query k summing to about `budget`, in proportion to each row's estimated count."""
    N, M = Z.shape[1], X.shape[1]
    est = _estimate_counts(Z, X, n, metric, seed) + 0.5  # every query keeps a little
    k = torch.ceil(est * (budget / float(est.sum()))).clamp_(1, M)
    return k.long()


def _queries_and_base(Z, X, metric):
    """Index vectors (M, d') and query vectors (N, d') for inner-product search under `metric`."""
    base, queries = X.t().float(), Z.t().float()
    if metric == "l2":
        base, queries = to_l2_base(base), to_l2_query(queries)
    return base.contiguous(), queries.contiguous()


def _to_scores(ip, j, metric, zn2):
    """Inner products of (possibly augmented) vectors -> global scores of `metric`."""
    if metric == "l2":
        return 2 * ip - zn2[j]
    return ip


@torch.no_grad()
def top_pairs(Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
              generator: torch.Generator, backend: str = "exact", metric: str = "abs_ip",
              k_similar: float = 0.15, global_threshold: bool = True, seed: int = 0,
              backend_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    check_metric(metric)
    # A NaN score is never pooled (it compares false) and the pool would fill the gap at random:
    # refuse non-finite vectors, whose scores would be non-finite (selection.NonFiniteScores).
    require_finite(Z, "the search grow signal dZ (layer output gradients)")
    require_finite(X, "the search grow signal X (layer inputs)")
    if backend == "exact":
        return exact_top_pairs(Z, X, n, excluded, generator, metric, **(backend_options or {}))
    if backend == "auto":
        return auto_top_pairs(Z, X, n, excluded, generator, metric, **(backend_options or {}))
    if getattr(BACKENDS.get(backend), "mode", "knn") == "pairs":  # sampled: draws pairs itself
        return BACKENDS.get(backend)(**(backend_options or {})).pairs(Z, X, n, excluded,
                                                                      generator, metric)
    N, M = Z.shape[1], X.shape[1]
    numel = N * M
    if n > numel - excluded.numel():
        raise ValueError(f"cannot grow {n} connections: only {numel - excluded.numel()} are inactive")
    Z, X = Z.float(), X.float()
    index = BACKENDS.get(backend)(**(backend_options or {}))
    base, queries = _queries_and_base(Z, X, metric)
    index.build(base)
    zn2 = (Z * Z).sum(0) if metric == "l2" else None
    signs = (1.0, -1.0) if metric == "abs_ip" else (1.0,)
    pool = TopPool(n, excluded, numel, capacity=max(2 * n, 1 << 16))
    info = {"candidates": 0}
    seed_n = seed * 7919 + N * 31 + M

    def offer(j: torch.Tensor, i: torch.Tensor, ip: torch.Tensor) -> None:
        ok = i >= 0
        if metric == "abs_ip":
            ok &= ip > 0  # each pair is positive under exactly one sign of its query
        j, i, ip = j[ok], i[ok], ip[ok]
        info["candidates"] += ip.numel()
        pool.add(j * M + i, _to_scores(ip, j, metric, zn2))

    if getattr(index, "mode", "knn") == "range":
        if metric == "l2":
            raise ValueError("backend 'faiss-range' supports metrics ip and abs_ip, not l2")
        tau = _range_threshold(Z, X, n, metric, seed_n)
        for attempt in range(4):
            for sgn in signs:
                lims, ip, ids = index.range_search(sgn * queries, tau)
                j = torch.repeat_interleave(torch.arange(N, device=ids.device), lims.diff())
                offer(j, ids, ip)
            if pool.size >= n or tau <= 0:
                break
            tau = tau / 2 if tau > 0 else tau  # too few above: lower the threshold and search again
            pool = TopPool(n, excluded, numel, capacity=max(2 * n, 1 << 16))
        info["threshold"] = tau
    else:
        budget = k_similar * M * N
        if global_threshold:
            k_q = _allocate_k(Z, X, n, budget, metric, seed_n)
        else:
            k_q = torch.full((N,), max(1, math.ceil(k_similar * M)), dtype=torch.long)
        # One search per power-of-two bucket of k: at most log2(M) + 1 calls.
        bucket = torch.clamp(2 ** torch.ceil(torch.log2(k_q.float())), max=M).long().cpu()
        for kb in torch.unique(bucket).tolist():
            rows = torch.nonzero(bucket == kb).squeeze(1)
            step = max(1, (4 << 20) // (kb * len(signs)))  # bound the candidates held at once
            for r0 in range(0, rows.numel(), step):
                q = rows[r0:r0 + step].to(queries.device)
                for sgn in signs:
                    ip, ids = index.search(sgn * queries[q], kb)
                    j = q[:, None].expand_as(ids).reshape(-1)
                    offer(j, ids.reshape(-1), ip.reshape(-1))
        info["k_mean"] = float(k_q.float().mean())
    idx, val, random_filled = pool.result(generator, fill=-math.inf)
    info["random_filled"] = random_filled
    return idx, val, info


def _range_threshold(Z, X, n, metric, seed) -> float:
    """Inner-product threshold about 1.5 n pairs exceed, from a random sample of columns."""
    N, M = Z.shape[1], X.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    cols = torch.randperm(M, generator=g)[:_SAMPLE_COLS].to(Z.device)
    s = _scores(Z.t() @ X[:, cols], metric, Z, X[:, cols]).reshape(-1)
    p = min(1.0, 1.5 * n / (N * M))
    if s.numel() > 16_000_000:
        s = s[torch.randperm(s.numel(), generator=g)[:16_000_000].to(s.device)]
    return float(torch.quantile(s, 1.0 - p))
