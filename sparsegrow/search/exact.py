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

from ..topology import sample_inactive
from ..metrics import union_sorted
from .base import BACKENDS, TopPool, check_metric

_SAMPLE = 512  # rows and columns of the sub-matrix that seeds the threshold
_MARGIN = 1.5  # aim the initial threshold at margin * n survivors


def default_block_bytes(n_rows: int, n_cols: int) -> int:
    """Bytes of the score block: 1/64 of the dense matrix, between 4 MiB and 32 MiB.

    Few large blocks beat many small ones on a shared machine: every multithreaded op waits at
    a barrier for a thread that another process may have descheduled, so ops are kept few."""
    return int(min(max(n_rows * n_cols * 4 // 64, 4 << 20), 32 << 20))


def score_floor(metric: str) -> float:
    # abs_ip: only strictly positive scores are pooled (zeros are filled at random, see above).
    return torch.finfo(torch.float32).tiny if metric == "abs_ip" else -math.inf


def _initial_threshold(Z, X, n, excluded, metric, floor) -> float:
    """A threshold about `_MARGIN * n` inactive pairs exceed, from a random sub-matrix of S."""
    N, M = Z.shape[1], X.shape[1]
    free = N * M - excluded.numel()
    p = _MARGIN * n / max(free, 1)
    g = torch.Generator().manual_seed(N * 1_000_003 + M)  # private: never shifts the caller's draws
    side = max(1, int(math.sqrt(min(_SAMPLE * _SAMPLE, N * M // 16))))  # <= 1/16 of S
    rows = torch.randperm(N, generator=g)[:side].to(Z.device)
    cols = torch.randperm(M, generator=g)[:side].to(Z.device)
    s = _scores(Z[:, rows].t() @ X[:, cols], metric, Z[:, rows], X[:, cols]).reshape(-1)
    above = int(p * s.numel())
    if p >= 1 or above < 20:  # too few samples above: start from the floor
        return floor
    return max(float(torch.topk(s, above, sorted=False).values.min()), floor)


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
    check_metric(metric)
    R, N = Z.shape
    M = X.shape[1]
    numel = N * M
    if n > numel - excluded.numel():
        raise ValueError(f"cannot grow {n} connections: only {numel - excluded.numel()} are inactive")
    Z, X = Z.float(), X.float()
    floor = score_floor(metric)
    bound = prune and metric in ("ip", "abs_ip")
    if bound:  # visit rows and columns in decreasing norm
        zn, xn = Z.norm(dim=0), X.norm(dim=0)
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
    buf = torch.empty(min(block_rows, N) * M, device=Z.device)
    hit = torch.empty(buf.numel(), dtype=torch.bool, device=Z.device)  # reused: no page faults
    tau0 = _initial_threshold(Z, X, n, excluded, metric, floor) if seed_threshold else floor
    computed, passes = 0, 0
    for tau_start in (tau0, floor):
        passes += 1
        pool = TopPool(n, excluded, numel, threshold=tau_start, capacity=3 * n)
        pend_idx, pend_val, pending = [], [], 0
        flush_at = 2 * n + 256  # the threshold rises at each flush (bound pruning needs it)

        def flush():
            if not pend_idx:
                return
            q, v = torch.cat(pend_idx), torch.cat(pend_val)
            pend_idx.clear(), pend_val.clear()
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
            _scores(blk, metric, zn2=None if zn2 is None else zn2[r0:r1],
                    xn2=xn2 if xn2 is None else xn2[:c])
            computed += (r1 - r0) * c
            flat_blk = blk.view(-1)
            mask = hit[: flat_blk.numel()]
            torch.ge(flat_blk, tau, out=mask)
            pos = torch.nonzero(mask).squeeze(1)
            if pos.numel() == 0:
                continue
            # Survivors as flat indices in the permuted order; mapped and checked in batches
            # (few ops per block: on a shared machine each op waits for a time slice).
            pend_val.append(flat_blk[pos])
            pend_idx.append(pos + r0 * M if c == M else (pos // c + r0) * M + pos % c)
            pending += pos.numel()
            if pending >= flush_at:
                flush()
                pending = 0
        flush()
        if pool.size >= n or tau_start <= floor:
            break
        # The seeded threshold was too high (rare): search again from the floor.
    zero_filled = max(0, n - pool.size)
    if zero_filled:  # every inactive pair with a positive score is in the pool: fill with zeros
        idx, val = pool.contents()
        extra = sample_inactive(numel, union_sorted(excluded, idx), zero_filled, generator,
                                excluded.device)
        idx = torch.cat([idx, extra])
        val = torch.cat([val, torch.zeros(zero_filled, device=val.device)])
        idx, order = torch.sort(idx)
        val = val[order]
    else:
        idx, val = pool.select(n, generator)
    info = {"pairs_computed": computed / max(numel, 1), "passes": passes,
            "zero_filled": zero_filled, "pool_prunes": pool.prunes}
    return idx, val, info


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
