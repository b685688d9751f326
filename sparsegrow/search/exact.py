"""Exact search: the default grow search and the oracle every approximate backend is measured against.

`exact_top_pairs(Z, X, n, excluded, metric)` returns the n best inactive pairs (j, i) of the
score matrix S = Zᵀ X (N × M; for growth Z = dZ rows, X = input rows, S = the weight gradient G)
without ever holding S. Rows of S are computed a block at a time (one GEMM per block into a
reused buffer of `block_bytes`), pairs below a running threshold are discarded with one vectorised
comparison, and the survivors go to a `TopPool` that excludes existing connections (sorted flat
indices, binary search) and raises the threshold to its n-th best score whenever it fills up.

Two things make it cheaper than the dense G + top-K it replaces:
  * the threshold starts near its final value, estimated from the scores of a random
    sub-matrix of S (at most 512 × 512, a tiny GEMM), so few pairs are ever kept;
  * bound-based pruning (as in LEMP, Teflioudi et al. 2015): |⟨z_j, x_i⟩| <= ‖z_j‖ ‖x_i‖. Rows and
    columns are visited in decreasing norm, so a row block only multiplies the prefix of columns
    whose bound can still reach the threshold, and the search stops at the first row block whose
    bound cannot. Exact, and on real layers (a few units hold most of the gradient mass) it skips
    most of the GEMM; on random data it skips nothing and costs nothing.

The result equals dense top-n selection (`select_top` over all inactive scores, ties at the n-th
value broken with the same generator) up to float rounding of the scores. Scores of exactly 0
(dead units) are never pooled for abs_ip: if fewer than n inactive pairs have |score| > 0, the rest
are drawn uniformly among the remaining inactive pairs, which is what dense selection's random
tie-break among the zeros does, in distribution.
"""
from __future__ import annotations

import math

import torch

from .base import BACKENDS, TopPool, check_metric
from .compact import compact_into

_SAMPLE = 512  # rows and columns of the sub-matrix that seeds the threshold (at least)
_SAMPLE_MAX = 4096
_MARGIN = 1.5  # aim the initial threshold at margin * n survivors
_RETRY = 6.0  # and a pass that fell short at retry * n


def default_block_bytes(n_rows: int, n_cols: int) -> int:
    """Bytes of the score block: 3% of the dense matrix, between 16 MiB and 64 MiB.

    Tall blocks keep the GEMM efficient (measured at 16384², B=128, 2 threads: 256-row blocks take
    1.6 s in all, 512 rows 1.3 s, 1024 rows 1.05 s, one full GEMM 1.17 s), while the memory-light
    target (extra memory <= 5% of the dense matrix at 16384²) bounds it from above. Below that the
    floor of 16 MiB wins (at 4096², 256-row blocks took 0.20 s in all against 0.04-0.11 s for one
    GEMM)."""
    return int(min(max(n_rows * n_cols * 4 * 3 // 100, 16 << 20), 64 << 20))


def score_floor(metric: str) -> float:
    # abs_ip: only strictly positive scores are pooled (zeros are filled at random, see above).
    return torch.finfo(torch.float32).tiny if metric == "abs_ip" else -math.inf


def _seed_thresholds(Z, X, zn, xn, n, excluded, metric, floor,
                     excluded_bound: torch.Tensor | None = None) -> list[float]:
    """Thresholds to start the search from, highest first, the floor last: about `_MARGIN * n`
    and `_RETRY * n` inactive pairs exceed the first two, estimated from one sub-matrix of S on
    rows and columns spread over the norm order (`_norm_spread`). A pass that ends with fewer
    than n pairs pooled is run again from the next one (the second estimate, not the floor:
    from the floor, lowrank:4 at 65,536², ε=20 pooled 5x the pairs, 1.27 s and 847 MiB extra).

    The sub-matrix counts active pairs as inactive ones. Where they crowd the top of S (training:
    they were grown from it) too few inactive pairs pass the estimate and the search falls
    through to the floor. With the excluded pairs' scores (`excluded_bound`), the count above a
    threshold is taken less the active pairs above it (from a sample of at most 2¹⁶ of them),
    lowering the threshold until the difference reaches the aim."""
    N, M = Z.shape[1], X.shape[1]
    free = N * M - excluded.numel()
    p = _MARGIN * n / max(free, 1)
    g = torch.Generator().manual_seed(N * 1_000_003 + M)  # private: never shifts the caller's draws
    # Enough entries that ~200 lie above (at 10⁶², n = 14 M: p = 2e-5, 3000² entries; 512²
    # held 5, the search started from the floor and pooled every pair until its first flush:
    # 1 GB more memory), at most 4096² and 1/16 of S.
    want = _SAMPLE if p <= 0 else min(max(_SAMPLE, math.ceil(math.sqrt(200 / p))), _SAMPLE_MAX)
    side = max(1, int(math.sqrt(min(want * want, N * M // 16))))
    if metric == "abs_ip" and _RETRY * n / max(free, 1) * min(side, N) * min(side, M) < 20:
        # so few pairs grown that no sample this size holds 20 above either aim (at 10⁶², late
        # updates grow ~10⁴): start from the heavy corner's bound instead of the floor. abs_ip
        # only: heavy rows and columns hold the top |⟨z, x⟩|, not the top signed one (with ip a
        # low corner start switched off the norm-bound pruning that the floor start keeps on)
        tau = _corner_threshold(Z, X, zn, xn, n, excluded, side)
        return ([tau] if tau is not None and tau > floor else []) + [floor]
    rows, cols = _norm_spread(zn, min(side, N), g), _norm_spread(xn, min(side, M), g)
    s = _scores(Z[:, rows].t() @ X[:, cols], metric, Z[:, rows], X[:, cols]).reshape(-1)
    act = None  # a sample of the active pairs' scores and its scale to all of them
    if excluded_bound is not None and excluded_bound.numel():
        pick = torch.randint(0, excluded_bound.numel(), (min(excluded_bound.numel(), 1 << 16),),
                             generator=g).to(excluded_bound.device)
        act = excluded_bound[pick]
        act_scale = excluded_bound.numel() / act.numel()
    kth = lambda k: float(torch.topk(s, k, sorted=False).values.min())  # noqa: E731
    out = []
    for margin in (_MARGIN, _RETRY):
        q = margin * n / max(free, 1)
        above = int(q * s.numel())
        if q >= 1 or above < 20:  # too few samples above: no estimate
            continue
        tau = kth(above)
        for _ in range(8 if act is not None else 0):  # all pairs above = aim + active above
            n_act = int((act >= tau).sum()) * act_scale
            need = min(int((margin * n + n_act) / (N * M) * s.numel()), s.numel())
            if need <= above * 1.05:
                break
            above, tau = need, kth(need)
        if tau > floor and (not out or tau < out[-1]):
            out.append(tau)
    return out + [floor]


def _corner_threshold(Z, X, zn, xn, n: int, excluded: torch.Tensor, side: int) -> float | None:
    """A start threshold (metric abs_ip) that one pass cannot fall short of: the n-th best |S|
    among the inactive pairs of the heavy corner (the `side` rows and columns of largest norm),
    less the two GEMMs' rounding. Those are pairs of S too, so at least n inactive pairs of S reach it.
    The top pairs sit on the heaviest rows and columns, so it is close to the n-th best of all S:
    at 10⁶², ε = 20, rank 4, n = 12,000 the whole lowrank grow took 3.38 s instead of 5.41 s from
    the floor, its pool checking 0.2% of the 40 M active pairs instead of all of them
    (benchmarks/results/bench_lowrank_small_n.md).
    None: the corner holds fewer than n inactive pairs. Cost: a side² GEMM and top-n, plus the
    active pairs on the corner's rows (a gather; no pass over all of `excluded`)."""
    M = X.shape[1]
    dev = Z.device
    rows = torch.topk(zn, min(side, zn.numel())).indices.sort().values  # (r,)
    cols = torch.topk(xn, min(side, M)).indices.sort().values  # (c,)
    s = (Z[:, rows].t() @ X[:, cols]).abs_()  # (r, c)
    n_active = 0
    if excluded.numel():  # the corner's active pairs: its rows' runs of `excluded`, its columns
        lo = torch.searchsorted(excluded, rows * M)
        counts = torch.searchsorted(excluded, (rows + 1) * M) - lo  # (r,) active pairs per row
        total = int(counts.sum())
        if total:
            first = torch.cumsum(counts, 0) - counts  # where each row's run starts in the gather
            pos = torch.repeat_interleave(lo - first, counts) + torch.arange(total, device=dev)
            row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), counts)
            col_at = torch.full((M,), -1, dtype=torch.long, device=dev)  # column -> corner column
            col_at[cols] = torch.arange(cols.numel(), device=dev)
            c = col_at[excluded[pos] % M]
            inside = c >= 0
            n_active = int(inside.sum())
            s[row_of[inside], c[inside]] = -math.inf
    if s.numel() - n_active < n:
        return None
    kth = float(torch.topk(s.reshape(-1), n, sorted=False).values.min())
    # this GEMM and the search's blocked one each err by <= R u ‖z‖‖x‖ on an inner product;
    # u: TF32's where CUDA GEMMs may use it
    tf32 = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    u = 2.0 ** (-11 if tf32 else -24)
    return kth - 2 * Z.shape[0] * u * float(zn[rows].max()) * float(xn[cols].max())


def _norm_spread(norms: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k of the L columns whose norms: (L,) are given, equally spaced in norm order from a
    random offset (a systematic sample, so its norm profile is the layer's). The top pairs sit
    on the few heaviest rows and columns: on a real-profile rank-4 signal at 65,536², ε=20, a
    plain random sample of them let 0.7-2.4x the aimed count through its threshold (six seeds),
    this one 1.4-1.8x; on log-normal norms the first pass fell short 5 times in 20 with the
    plain sample, never with this one (tests/test_search.py). It can still fall short (0.65x at
    the benchmark's seed): `_seed_thresholds` gives a second, lower start."""
    L = norms.numel()
    order = torch.argsort(norms)
    step = L / k
    pos = (float(torch.rand((), generator=g)) * step + step * torch.arange(k, dtype=torch.float64))
    return order[pos.long().clamp_(max=L - 1).to(order.device)]


def _bound_prunes(zn, xn, tau: float, worth: float = 0.9) -> bool:
    """Whether |<z_j, x_i>| <= ‖z_j‖‖x_i‖ < tau can rule out more than (1 - worth) of the pairs.

    Pruning visits rows and columns in norm order, which scrambles the order of the survivors
    (they must then be sorted); on data without heavy rows or columns it skips nothing, so it is
    used only where the bound can skip most of the GEMM. zn: (N,), xn: (M,) column norms."""
    if not tau > score_floor("abs_ip"):  # no seeded estimate: let the running threshold decide
        return True
    xs = torch.sort(xn).values  # ascending
    reach = xn.numel() - torch.searchsorted(xs, tau / zn.clamp(min=1e-30))  # (N,) per row
    return float(reach.sum()) < worth * zn.numel() * xn.numel()


def _scores(block, metric, zb=None, xb=None, zn2=None, xn2=None):
    """Inner products (rows, cols) -> scores of `metric`, in place."""
    if metric == "abs_ip":
        return block.abs_()
    if metric == "l2":  # -‖z - x‖² = 2⟨z, x⟩ - ‖z‖² - ‖x‖²
        zn2 = (zb * zb).sum(0) if zn2 is None else zn2
        xn2 = (xb * xb).sum(0) if xn2 is None else xn2
        return block.mul_(2).sub_(zn2[:, None]).sub_(xn2[None, :])
    return block


@torch.no_grad()
def exact_top_pairs(Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
                    generator: torch.Generator, metric: str = "abs_ip",
                    block_bytes: int | None = None, prune: bool = True,
                    seed_threshold: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The n best pairs of S = Zᵀ X by `metric` whose flat index j * M + i is not in `excluded`.

    Z: (R, N), X: (R, M) (R = batch rows, or sketch rows). excluded: sorted int64 flat indices.
    Returns (sorted flat indices (n,), their scores (n,), info) where info reports the work done:
    {"pairs_computed": share of S computed, "passes", "zero_filled", "pool_prunes"}.
    """
    pool, info = search_pool(Z, X, n, excluded, metric, block_bytes, prune, seed_threshold)
    # If every inactive pair with a positive score is in the pool and that is fewer than n, the
    # rest are zeros: drawn at random, as dense selection's tie-break among zeros would.
    idx, val, zero_filled = pool.result(generator, fill=0.0)
    return idx, val, {**info, "zero_filled": zero_filled}


@torch.no_grad()
def search_pool(Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
                metric: str = "abs_ip", block_bytes: int | None = None, prune: bool = True,
                seed_threshold: bool = True, excluded_bound: torch.Tensor | None = None
                ) -> tuple[TopPool, dict]:
    """The search of `exact_top_pairs` up to its pool: a `TopPool` holding every inactive pair
    of the top n (more when the pool has room; fewer than n only when fewer have a score above
    the metric's floor), and info {"pairs_computed", "passes", "pool_prunes",
    "excluded_checked"}. Callers that rescore the pool (the `lowrank` backend) skip exact
    selection's tie-break and sort.

    excluded_bound: (len(excluded),) float, at least the score this search computes for each
    excluded pair, rounding included (the caller's margin). A pass starting at threshold tau
    never pools a pair scoring below tau, so its pool checks only the excluded pairs whose bound
    reaches tau (`excluded_checked`: their share in the last pass): a binary search in a short
    list instead of all of them."""
    check_metric(metric)
    R, N = Z.shape
    M = X.shape[1]
    numel = N * M
    if n > numel - excluded.numel():
        raise ValueError(f"cannot grow {n} connections: only {numel - excluded.numel()} are inactive")
    Z, X = Z.float(), X.float()
    floor = score_floor(metric)
    zn, xn = Z.norm(dim=0), X.norm(dim=0)  # (N,), (M,): the seed's sample, the bound, its order
    starts = (_seed_thresholds(Z, X, zn, xn, n, excluded, metric, floor, excluded_bound)
              if seed_threshold else [floor])
    bound = prune and metric in ("ip", "abs_ip") and _bound_prunes(zn, xn, starts[0])
    if bound:  # visit rows and columns in decreasing norm
        zn, rperm = torch.sort(zn, descending=True)
        xn, cperm = torch.sort(xn, descending=True)
        Zt, Xp = Z[:, rperm].t().contiguous(), X[:, cperm].contiguous()  # (N, R), (R, M)
        zmax = zn.cpu().tolist()
        neg_xn = -xn * (1 - 1e-5)  # ascending, slightly widened so rounding never prunes a pair
    else:
        rperm = cperm = None
        Zt, Xp = Z.t().contiguous(), X.contiguous()
    zn2 = (Z * Z).sum(0) if metric == "l2" else None  # l2 is never permuted
    xn2 = (X * X).sum(0) if metric == "l2" else None

    block_rows = max(1, (block_bytes or default_block_bytes(N, M)) // (4 * M))
    buf = torch.empty(min(block_rows, N) * M, device=Z.device)  # reused: no page faults
    computed, passes = 0, 0
    pend_i = pend_v = torch.empty(0, device=Z.device)
    checked = excluded
    for tau_start in starts:
        passes += 1
        if excluded_bound is not None:
            checked = excluded[excluded_bound >= tau_start]  # still sorted
        pool = TopPool(n, checked, numel, threshold=tau_start, capacity=3 * n)
        # Survivors of the threshold collect in one preallocated buffer, as flat indices (in the
        # permuted order under bound pruning) and scores, and go to the pool in batches: few ops
        # per block (on a shared machine each op waits for a time slice) and no fresh memory.
        # The threshold rises at each flush (bound pruning needs it). Past a million pairs the
        # buffer holds n / 2: 12 B per slot, 2 · flush_at slots (at 10⁶², n = 14 M: 170 MB, not
        # the 690 MB of 2n + 256).
        flush_at = min(2 * n + 256, max(n // 2, 1 << 20))
        if pend_i.numel() < 2 * flush_at:
            pend_i = torch.empty(2 * flush_at, dtype=torch.long, device=Z.device)
            pend_v = torch.empty(2 * flush_at, device=Z.device)
        pending = 0

        def flush(count):
            if count == 0:
                return
            q, v = pend_i[:count], pend_v[:count]
            if bound:
                q = rperm[q // M] * M + cperm[q % M]
            pool.add(q, v, filtered=True)

        for r0 in range(0, N, block_rows):
            r1 = min(r0 + block_rows, N)
            tau = pool.threshold
            c = M
            if bound and tau > 0:
                top = zmax[r0] * (1 + 1e-5)
                if top * float(-neg_xn[0]) < tau:
                    break  # no later row can reach the threshold
                c = int(torch.searchsorted(neg_xn, -tau / top, right=True))
                if c == 0:
                    continue
            blk = buf[: (r1 - r0) * c].view(r1 - r0, c)
            torch.mm(Zt[r0:r1], Xp[:, :c], out=blk)
            if metric == "l2":
                _scores(blk, metric, zn2=zn2[r0:r1], xn2=xn2[:c])
            computed += (r1 - r0) * c
            # One pass over the block: (r0 + r) * M + col and the score (|ip| for abs_ip) of
            # every entry >= tau, appended to the pending buffer.
            k = compact_into(blk, tau, metric == "abs_ip", r0, M, pend_i, pend_v, pending)
            if k < 0:  # no room: hand the pending ones to the pool (raising tau), then retry
                flush(pending)
                pending = 0
                k = compact_into(blk, pool.threshold, metric == "abs_ip", r0, M, pend_i, pend_v, 0)
                if k < 0:  # one block alone holds more: grow the buffer
                    pend_i = torch.empty(-k, dtype=torch.long, device=Z.device)
                    pend_v = torch.empty(-k, device=Z.device)
                    k = compact_into(blk, pool.threshold, metric == "abs_ip", r0, M, pend_i,
                                     pend_v, 0)
            pending += k
            if pending >= flush_at:
                flush(pending)
                pending = 0
        flush(pending)
        if pool.size >= n or tau_start <= floor:
            break
        # The seeded threshold was too high: search again from the next, lower one.
    return pool, {"pairs_computed": computed / max(numel, 1), "passes": passes,
                  "pool_prunes": pool.prunes,
                  "excluded_checked": checked.numel() / max(excluded.numel(), 1)}


@BACKENDS.register("exact", "blocked exact search in torch (the oracle; any device)")
class ExactIndex:
    """Brute-force inner-product index with the common contract (per-query top-k, range search).

    Growth with backend "exact" does not go through here but through `exact_top_pairs`, which
    searches all pairs globally; this index is the per-query oracle for the other backends.
    """

    def __init__(self, block_bytes: int = 32 << 20):
        self.block_bytes = block_bytes
        self.base: torch.Tensor | None = None

    def build(self, base: torch.Tensor) -> None:
        self.base = base.float().contiguous()

    def _blocks(self, queries):
        rows = max(1, self.block_bytes // (4 * max(self.base.shape[0], 1)))
        for q0 in range(0, queries.shape[0], rows):
            yield q0, queries[q0:q0 + rows].float() @ self.base.t()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_eff = min(k, self.base.shape[0])
        scores, ids = [], []
        for _, s in self._blocks(queries):
            v, i = torch.topk(s, k_eff, dim=1)
            scores.append(v)
            ids.append(i)
        scores, ids = torch.cat(scores), torch.cat(ids)
        if k_eff < k:
            pad = k - k_eff
            scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        return scores, ids

    def range_search(self, queries: torch.Tensor, threshold: float):
        counts, scores, ids = [], [], []
        for _, s in self._blocks(queries):
            hit = s > threshold
            counts.append(hit.sum(1))
            r, c = torch.nonzero(hit, as_tuple=True)
            scores.append(s[r, c])
            ids.append(c)
        counts = torch.cat(counts)
        lims = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return lims, torch.cat(scores), torch.cat(ids)
