"""Sampled candidates, scored exactly: growth whose cost scales with the pairs it touches.

Instead of scoring all N × M pairs of S = Zᵀ X (Z: (R, N) output gradients, X: (R, M) inputs),
draw c = candidates · n pairs (j, i) from a distribution that favours large |S_ji|, score the
distinct drawn pairs exactly (an SDDMM at those positions, `layers.kernels.sddmm`) and keep the
n best inactive ones. Cost: O(c (R + log c)) plus O(R (N + M)) for the sampling tables, never
O(N M R). Three samplers (backend names `sample-<sampler>`):

  norm     P(j, i) ∝ ‖Z_:j‖^p ‖X_:i‖^p (GSE's GraBo, Heddes et al. 2024; p = 2 default, or 1):
           j and i drawn independently by inverse CDF.
  wedge    P(j, i) ∝ Σ_r |Z_rj X_ri| (Cohen & Lewis 1999): r ∝ ‖Z_r‖₁ ‖X_r‖₁, then j ∝ |Z_rj|
           and i ∝ |X_ri| within row r.
  diamond  (Ballard, Kolda, Pinar, Seshadhri, ICDM 2015) a wedge draw (j, r, i) closed by a second
           row r' ∝ |Z_r'j|; the draw adds sgn(Z_rj Z_r'j X_ri) X_r'i ‖Z_:j‖₁ to pair (j, i), whose
           expected sum over D draws is D S_ji² / W (W = Σ_r ‖Z_r‖₁ ‖X_r‖₁): pairs are drawn as
           by wedge, and only those whose summed estimate is > 0 are scored exactly.

Draws are organised by row of S: row j gets a Poisson(c · P(j)) number of draws, each from the
sampler's P(i | j) (`Plan`), so pair (j, i) is drawn Poisson(c · P(j, i)) times. Every categorical
draw is an inverse-CDF lookup (float64 cumsum + searchsorted(right=True)) of uniforms from the
caller's generator: deterministic given the generator. On CPU one C pass per row
(`sample_kernel`) draws, deduplicates with a stamp array over the M columns, skips the row's
active columns, sorts the row's few survivors and scores them: no sort of the whole candidate set.
The torch path (the fallback and test oracle; CUDA) draws the same pairs, deduplicates with one
sort of the candidate keys (O(c log c)), removes active pairs with a linear merge against the
sorted active set and scores with an SDDMM. If fewer than n distinct inactive candidates remain,
the rest are drawn uniformly among the other inactive pairs ("random_filled"), so density stays
exact.

`search(queries, k)` is the per-query form of the contract (each query's candidates drawn the
same way); growth calls `pairs(Z, X, n, excluded, generator, metric)` through `top_pairs`.
"""
from __future__ import annotations

import math

import torch

from ..layers.kernels import get_backend, searchsorted_sorted, sddmm
from .base import BACKENDS, best_scored, check_pairs_call
from .sample_kernel import row_candidates

SAMPLED_METRICS = ("ip", "abs_ip")


def check_candidates(candidates) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) \
            or not math.isfinite(candidates) or candidates <= 0:
        raise ValueError(f"candidates must be a number > 0 (pairs drawn per grown connection), "
                         f"got {candidates!r}")


def _uniform(count: int, generator: torch.Generator, device) -> torch.Tensor:
    """(count,) float64 uniforms in [0, 1) from the generator, moved to `device`."""
    return torch.rand(count, generator=generator, dtype=torch.float64,
                      device=generator.device).to(device)


def _categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: (K,) weights >= 0, (c,) uniforms in [0, 1) -> (c,) int64 draws in [0, K)."""
    cum = torch.cumsum(weights.double(), 0)
    return torch.searchsorted(cum, u * cum[-1], right=True).clamp_(max=weights.numel() - 1)


class _RowTable:
    """Per-row categorical draws from a nonnegative (R, K) matrix A: k ∝ A[r, k] within row r."""

    def __init__(self, A: torch.Tensor):
        R, K = A.shape
        self.K = K
        self.cum = torch.cumsum(A.double().reshape(-1), 0)  # (R·K,) one flat cumsum
        ends = self.cum[K - 1::K]  # (R,) cumulative mass at each row's end
        self.start = torch.cat([ends.new_zeros(1), ends[:-1]])
        # (R,) row sums, summed per row: a difference of the flat cumsum's ends can come out
        # slightly negative for an all-zero row (CUDA's parallel scan groups sums differently)
        self.mass = A.double().sum(1)

    def draw(self, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.cum, self.start[r] + u * self.mass[r], right=True)
        return (pos - r * self.K).clamp_(0, self.K - 1)


class Plan:
    """How one update draws: the per-row draw counts and the float64 inverse-CDF tables.

    Row j of S gets K_j ~ Poisson(draws · P(j)) draws (so pair (j, i) is drawn Poisson(draws ·
    P(j, i)) times, independently over pairs), each from the sampler's conditional P(i | j):
      norm     P(j) ∝ ‖Z_:j‖^p; i ∝ ‖X_:i‖^p (one table row, r = 0)
      wedge    P(j) ∝ Σ_r |Z_rj| ‖X_r‖₁; r ∝ |Z_rj| ‖X_r‖₁ (rtab row j), then i ∝ |X_ri| (itab row r)
      diamond  as wedge, and r' ∝ |Z_r'j| (ctab row j) for the draw's estimate
    Uniforms come from the generator in the order u1 (r), u2 (i), u3 (r'), one per draw each."""

    def __init__(self, Z, X, draws: float, sampler: str, generator, power: float = 2.0):
        dev = Z.device
        if sampler == "norm":
            pj = Z.norm(dim=0).double() ** power
            self.rtab, self.ctab = None, None
            self.itab = _RowTable((X.norm(dim=0).double() ** power)[None, :])
        else:
            Za = Z.abs()
            self.itab = _RowTable(X.abs())  # (R, M)
            A = (Za.double() * self.itab.mass[:, None]).t()  # (N, R): |Z_rj| ‖X_r‖₁
            self.rtab = _RowTable(A)
            pj = self.rtab.mass
            self.ctab = _RowTable(Za.t()) if sampler == "diamond" else None
        total = float(pj.sum())
        rates = pj * (draws / total) if total > 0 else pj
        self.counts = torch.poisson(rates.cpu(), generator=generator
                                    if generator.device.type == "cpu" else None).long().to(dev)
        self.dptr = torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])
        n = int(self.dptr[-1])
        self.u1 = _uniform(n, generator, dev) if self.rtab is not None else None
        self.u2 = _uniform(n, generator, dev)
        self.u3 = _uniform(n, generator, dev) if self.ctab is not None else None

    def draw(self, Z, X):
        """All draws, row by row: ((D,) j sorted, (D,) i, (D,) float64 estimates or None)."""
        N = Z.shape[1]
        j = torch.repeat_interleave(torch.arange(N, device=Z.device), self.counts)
        r = self.rtab.draw(j, self.u1) if self.rtab is not None else torch.zeros_like(j)
        i = self.itab.draw(r, self.u2)
        if self.ctab is None:
            return j, i, None
        r2 = self.ctab.draw(j, self.u3)
        w = torch.sign(Z[r, j] * Z[r2, j] * X[r, i]).double() * X[r2, i].double() * self.ctab.mass[j]
        return j, i, w


def draw_pairs(Z, X, draws: float, sampler: str, generator, power: float = 2.0):
    """About `draws` pairs (j, i) drawn by `sampler` (see `Plan`): (j, i, estimates or None)."""
    return Plan(Z.float(), X.float(), draws, sampler, generator, power).draw(Z.float(), X.float())


def _candidates_torch(plan, Z, X, excluded):
    """Torch path: (sorted distinct inactive keys, S at them, distinct inactive drawn)."""
    M = X.shape[1]
    j, i, w = plan.draw(Z, X)
    keys, acc = _distinct(j * M + i, w)
    keep = free_mask(keys, excluded)
    distinct = int(keep.sum())
    if acc is not None:
        keep &= acc > 0  # diamond: score only pairs whose S² estimate is positive
    keys = keys[keep]
    return keys, score_at_rows(Z, X, keys), distinct


def _candidates_c(plan, Z, X, excluded):
    """C path (CPU, float32): the same candidates without a global sort, or None."""
    if Z.device.type != "cpu" or get_backend() in ("torch", "reference"):
        return None
    N, M, R = Z.shape[1], X.shape[1], Z.shape[0]
    aptr = torch.searchsorted(excluded, torch.arange(N + 1) * M) if excluded.numel() \
        else torch.zeros(N + 1, dtype=torch.long)
    acol = (excluded % M).contiguous() if excluded.numel() else torch.zeros(1, dtype=torch.long)
    tab = (lambda t: None if t is None else (t.cum, t.start, t.mass))
    return row_candidates(N, M, R, plan.dptr, plan.u1, plan.u2, plan.u3, tab(plan.rtab),
                          tab(plan.itab), tab(plan.ctab), Z.t().contiguous(),
                          X.t().contiguous(), aptr, acol)


def _distinct(keys: torch.Tensor, weights: torch.Tensor | None):
    """Sorted distinct keys, and the summed weights per key (or None): O(c log c)."""
    keys, order = torch.sort(keys, stable=True)  # stable: estimates sum in draw order
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    if weights is None:
        return keys[new], None
    seg = torch.cumsum(new, 0) - 1
    acc = torch.zeros(int(new.sum()), dtype=weights.dtype, device=keys.device)
    acc.index_add_(0, seg, weights[order])
    return keys[new], acc


def free_mask(keys: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Mask of the sorted `keys` not in the sorted `excluded`: one linear merge on CPU."""
    if excluded.numel() == 0:
        return torch.ones_like(keys, dtype=torch.bool)
    pos = searchsorted_sorted(excluded, keys).clamp_(max=excluded.numel() - 1)
    return excluded[pos] != keys


def score_at(Zt: torch.Tensor, Xt: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """S_ji = <Zt[j], Xt[i]> at the sorted flat keys j·M + i: (len(keys),), via one SDDMM."""
    N, M = Zt.shape[0], Xt.shape[0]
    ptr = torch.searchsorted(keys, torch.arange(N + 1, device=keys.device) * M)
    # each key's column by one remainder, not by subtracting its row's start (a repeat_interleave
    # over the keys, a multiply, a subtract): lowrank's active_bound at 4.3 M keys 0.10 -> 0.07 s
    return sddmm(ptr, torch.remainder(keys, M), Zt, Xt)


def score_at_rows(Z: torch.Tensor, X: torch.Tensor, keys: torch.Tensor,
                  block_bytes: int = 32 << 20, whole_bytes: int = 64 << 20) -> torch.Tensor:
    """`score_at` from Z: (R, N), X: (R, M) as the signal holds them. Signals up to
    `whole_bytes` each are transposed whole; larger ones a tile at a time: columns of X in blocks
    of `block_bytes` (the pairs of each taken out of the sorted keys, which stay sorted), rows of
    Z likewise. Extra memory: two blocks and the keys of one column block, not the two transposed
    signals (at 10⁶ × 10⁶, R = 128: 1 GB); time: one pass over the keys per column block."""
    R, N = Z.shape
    M = X.shape[1]
    if 4 * R * max(N, M) <= whole_bytes:
        return score_at(Z.t().contiguous(), X.t().contiguous(), keys)
    width = max(1, block_bytes // (4 * max(R, 1)))  # rows of Zᵀ or of Xᵀ per block
    out = torch.empty(keys.numel(), dtype=torch.promote_types(Z.dtype, X.dtype),
                      device=keys.device)
    cols = (keys % M).to(torch.int32 if M < 2**31 else torch.int64)
    for c0 in range(0, M, width):
        c1 = min(c0 + width, M)
        pos = torch.nonzero((cols >= c0) & (cols < c1)).squeeze(1)
        if pos.numel() == 0:
            continue
        sub = keys[pos]
        sub = (sub // M) * (c1 - c0) + (sub % M - c0)  # (row, col - c0) in a (N, c1 - c0) tile
        Xt = X[:, c0:c1].t().contiguous()
        cuts = torch.searchsorted(sub, torch.arange(0, N + width, width, device=keys.device)
                                  .clamp_(max=N) * (c1 - c0)).tolist()
        for b, r0 in enumerate(range(0, N, width)):
            k0, k1 = cuts[b], cuts[b + 1]
            if k1 > k0:
                r1 = min(r0 + width, N)
                out[pos[k0:k1]] = score_at(Z[:, r0:r1].t().contiguous(), Xt,
                                           sub[k0:k1] - r0 * (c1 - c0))
    return out


class SampledIndex:
    """Candidate sampling + exact scoring behind the search contract (mode "pairs")."""

    mode = "pairs"
    sampler = "norm"

    def __init__(self, candidates: float = 16, power: float = 2.0, seed: int = 0):
        check_candidates(candidates)
        if isinstance(power, bool) or power not in (1, 2, 1.0, 2.0):
            raise ValueError(f"power must be 1 or 2 (norm sampling ∝ ‖z‖^p ‖x‖^p), got {power!r}")
        self.candidates, self.power, self.seed = float(candidates), float(power), seed

    # -- growth: the n best inactive pairs of S ---------------------------------------------

    @torch.no_grad()
    def pairs(self, Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
              generator: torch.Generator, metric: str = "abs_ip"):
        """Z: (R, N), X: (R, M), excluded: sorted int64 flat indices -> (sorted idx (n,),
        scores (n,), info) as `exact_top_pairs`, info reporting the work done."""
        N, M = check_pairs_call(Z, X, n, excluded, metric, SAMPLED_METRICS,
                                "sampled backends support")
        numel = N * M
        Z, X = Z.float().contiguous(), X.float().contiguous()
        draws = self.candidates * n
        plan = Plan(Z, X, draws, self.sampler, generator, self.power)
        out = _candidates_c(plan, Z, X, excluded)
        kernel = "c" if out is not None else "torch"
        keys, scores, distinct = out if out is not None else _candidates_torch(plan, Z, X, excluded)
        if metric == "abs_ip":
            scores = scores.abs_()
        info = {"sampler": self.sampler, "candidates": float(self.candidates),
                "draws": int(plan.dptr[-1]), "distinct": distinct, "scored": keys.numel(),
                "kernel": kernel}
        idx, val, info["random_filled"] = best_scored(keys, scores, n, excluded, numel, generator)
        return idx, val, info

    # -- the per-query contract ---------------------------------------------------------------

    def build(self, base: torch.Tensor) -> None:
        self.base = base.float().contiguous()  # (n_base, d)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: candidates · k draws among the base vectors (norm: ∝ ‖x_i‖^p; wedge and
        diamond: ∝ Σ_r |q_r x_ri|) plus k uniform ones, scored exactly; the k best, best first (ids -1 and
        scores -inf where fewer than k distinct came back)."""
        q = queries.float()
        n_q, n_b = q.shape[0], self.base.shape[0]
        g = torch.Generator(device=q.device).manual_seed(self.seed)
        per = int(math.ceil(self.candidates * k))
        qid = torch.arange(n_q, device=q.device).repeat_interleave(per)
        if self.sampler == "norm":
            i = _categorical(self.base.norm(dim=1) ** self.power, _uniform(qid.numel(), g, q.device))
        else:  # wedge (and diamond's draws): r ∝ |q_r| ‖X_r‖₁, then i ∝ |X_ri|
            xt = _RowTable(self.base.t().abs())
            rw = torch.cumsum((q.abs().double() * xt.mass[None, :]), 1)  # (n_q, d)
            u = _uniform(qid.numel(), g, q.device).view(n_q, per) * rw[:, -1:]
            r = torch.searchsorted(rw, u, right=True).clamp_(max=q.shape[1] - 1).reshape(-1)
            i = xt.draw(r, _uniform(qid.numel(), g, q.device))
        explore = torch.randint(0, n_b, (n_q * k,), generator=g, device=g.device).to(q.device)
        keys, _ = _distinct(torch.cat([qid * n_b + i, torch.arange(n_q, device=q.device)
                                       .repeat_interleave(k) * n_b + explore]), None)
        qk, ik = keys // n_b, keys % n_b
        ip = (q[qk] * self.base[ik]).sum(1)
        dense = torch.full((n_q, n_b), -math.inf, device=q.device)  # small cases only
        dense[qk, ik] = ip
        k_eff = min(k, n_b)
        scores, ids = torch.topk(dense, k_eff, dim=1)
        ids = torch.where(torch.isfinite(scores), ids, torch.full_like(ids, -1))
        if k_eff < k:
            scores = torch.cat([scores, scores.new_full((n_q, k - k_eff), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((n_q, k - k_eff), -1)], 1)
        return scores, ids


@BACKENDS.register("sample-norm", "candidates drawn ∝ ‖dz_j‖²‖x_i‖² (GraBo), scored exactly")
class NormSampledIndex(SampledIndex):
    sampler = "norm"


@BACKENDS.register("sample-wedge", "candidates drawn ∝ Σ_r |dz_rj x_ri| (wedge sampling), "
                   "scored exactly")
class WedgeSampledIndex(SampledIndex):
    sampler = "wedge"


@BACKENDS.register("sample-diamond", "wedge draws weighted to E ∝ G_ji² (diamond sampling), "
                   "positive estimates scored exactly")
class DiamondSampledIndex(SampledIndex):
    sampler = "diamond"
