"""`lowrank`: exact search on the best rank-k approximation of S = Zᵀ X, candidates rescored exactly.

Growth signals are nearly low-rank: on the captured Fashion-MNIST MLP signal (R = 128 batch rows,
benchmarks/signals/fmnist_mlp4096.pt) the top 4 / 8 / 16 singular values of S hold 81% / 92% / 98%
of ‖S‖²_F. So the largest entries of S are, nearly all, the largest entries of its rank-k
truncation S_k = A Bᵀ, and those are found by exact search on k-dimensional vectors instead of
R-dimensional ones. That search is cheaper per pair (k multiply-adds, not R) and, above all,
skips far more pairs: the norm bound |⟨a_j, b_i⟩| <= ‖a_j‖ ‖b_i‖ is tight in k dimensions (on the
65,536² real-profile signal exact search computes 27% of the pairs, rank 8 computes 1.4%).

    1. factors, never N × M: with the Gram matrices Gz = Z Zᵀ = Ez Λz Ezᵀ and Gx = X Xᵀ (R × R),
       Zᵀ = Qz Λz^½ Ezᵀ with orthonormal Qz = Zᵀ Ez Λz^-½ (likewise X), so S = Qz C Qxᵀ with the
       R × R core C = Λz^½ Ezᵀ Ex Λx^½. Its SVD C = U Σ Vᵀ is S's: S_k = A Bᵀ with
       A = Zᵀ (Ez Λz^-½ U_k Σ_k) (N × k) and B = Xᵀ (Ex Λx^-½ V_k) (M × k). O((N + M) R²).
    2. candidates: the ⌈c · n⌉ best inactive pairs of S_k by the metric (`exact.search_pool`:
       blocked GEMM, running threshold, norm-bound pruning, exclusion of active pairs).
    3. rescoring: S at the candidates by SDDMM (`sampled.score_at_rows`, the layer's kernel); the
       n best are kept (ties at the n-th value broken with the caller's generator). With one
       candidate per grown connection (c = 1, `auto`'s choice) there is nothing to choose: the
       rank-k top n is returned with its S_k scores, unrescored (growth reads only the pairs).

Knobs: `rank` k (default 8) and `candidates` c (pairs rescored per grown connection, default 1.5).
With k >= rank(S) the candidates are exact search's (up to rounding) and so is the result. Info
reports `energy`, the share of ‖S‖²_F in the top k singular values, which `auto` reads as the
quality proxy, and `pairs_computed` of step 2. Metrics ip and abs_ip (l2 ranks by ‖z - x‖, which
a low-rank S does not approximate).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .base import BACKENDS, best_scored, check_pairs_call
from .exact import search_pool
from .sampled import check_candidates, free_mask, score_at, score_at_rows

LOWRANK_METRICS = ("ip", "abs_ip")


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (dimensions of the low-rank search), "
                         f"got {rank!r}")


def _eig_basis(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and eigenvalues of the PSD (R, R) Gram matrix, numerically null ones dropped."""
    lam, E = torch.linalg.eigh(G)
    keep = lam > lam.max().clamp(min=0) * 1e-10
    return E[:, keep], lam[keep]


class Spectrum(NamedTuple):
    """S = Zᵀ X through R × R algebra (float64): S = (Zᵀ Ez Λz^-½) C (Ex Λx^-½)ᵀ X with
    C = (Λz^½ Ezᵀ Ex Λx^½) = U diag(s) Vh. `energy[i]`: share of ‖S‖²_F in the top i + 1
    singular values (all ones for S = 0)."""
    Ez: torch.Tensor
    sz: torch.Tensor
    Ex: torch.Tensor
    sx: torch.Tensor
    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    energy: torch.Tensor


def spectrum(Z: torch.Tensor, X: torch.Tensor) -> Spectrum:
    """Z: (R, N), X: (R, M): two (R, R) Gram matrices (O((N + M) R²)) and an R × R SVD."""
    Ez, lz = _eig_basis((Z @ Z.t()).double())
    Ex, lx = _eig_basis((X @ X.t()).double())
    sz, sx = lz.sqrt(), lx.sqrt()
    U, s, Vh = torch.linalg.svd((sz[:, None] * (Ez.t() @ Ex)) * sx[None, :])
    if s.numel() == 0 or float(s[0]) == 0:  # S = 0: any factors rank nothing
        energy = torch.ones(max(s.numel(), 1), dtype=torch.float64)
    else:
        energy = torch.cumsum(s * s, 0) / (s * s).sum()
    return Spectrum(Ez, sz, Ex, sx, U, s, Vh, energy)


def rank_k_factors(Z: torch.Tensor, X: torch.Tensor, k: int, spec: Spectrum | None = None):
    """(A (k', N), B (k', M), energy): Aᵀ B is the best rank-k approximation of S = Zᵀ X in
    Frobenius norm (k' = min(k, rank S), at least 1). Z: (R, N), X: (R, M); the two projections
    run in the signal's dtype."""
    sp = spectrum(Z, X) if spec is None else spec
    k = min(k, sp.s.numel())
    if k == 0:
        return Z.new_zeros(1, Z.shape[1]), X.new_zeros(1, X.shape[1]), sp.energy
    Wz = (sp.Ez @ (sp.U[:, :k] / sp.sz[:, None])) * sp.s[:k]  # (R, k)
    Wx = sp.Ex @ (sp.Vh[:k].t() / sp.sx[:, None])  # (R, k)
    return Wz.t().to(Z.dtype) @ Z, Wx.t().to(X.dtype) @ X, sp.energy


def active_bound(A: torch.Tensor, B: torch.Tensor, excluded: torch.Tensor, metric: str,
                 chunk: int = 1 << 22) -> torch.Tensor:
    """(len(excluded),) float32: at least the score the blocked GEMM of `search_pool` computes
    for each excluded pair of S_k = Aᵀ B. A: (k, N), B: (k, M); excluded: sorted flat indices.

    S_k at the pairs by SDDMM (`score_at`, in chunks of `chunk` pairs: bounded temporaries), plus
    a margin for both computations' rounding: a float32 sum of k products errs by at most
    γ_k Σ_r |a_rj b_ri| <= k u ‖a_j‖ ‖b_i‖ (any summation order), doubled and taken at the
    largest norms; u = 2⁻²⁴, or TF32's 2⁻¹¹ where CUDA GEMMs may use it."""
    k, M = A.shape[0], B.shape[1]
    out = torch.empty(excluded.numel(), device=excluded.device)
    if excluded.numel() == 0:
        return out
    At, Bt = A.t().contiguous(), B.t().contiguous()  # (N, k), (M, k)
    tf32 = A.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    u = 2.0 ** (-11 if tf32 else -24)
    margin = 4 * k * u * float(At.norm(dim=1).max()) * float(Bt.norm(dim=1).max())
    for p0 in range(0, excluded.numel(), chunk):
        keys = excluded[p0:p0 + chunk]
        j0, j1 = int(keys[0]) // M, int(keys[-1]) // M + 1  # the rows the chunk spans
        s = score_at(At[j0:j1], Bt, keys - j0 * M)
        out[p0:p0 + keys.numel()] = s.abs_() if metric == "abs_ip" else s
    return out.add_(margin)


def rescored_best(Z: torch.Tensor, X: torch.Tensor, keys: torch.Tensor, approx: torch.Tensor,
                  n: int, excluded: torch.Tensor, generator: torch.Generator, metric: str):
    """The n best of the candidates keys (sorted flat indices of inactive pairs, S_k at them:
    approx) -> (sorted idx (n,), scores (n,), random_filled). n candidates (one per grown pair,
    no ties): the rank-k top n is the answer and its scores are S_k's (growth reads only idx);
    otherwise the candidates are rescored exactly and the n best kept (`best_scored`)."""
    if keys.numel() == n:
        return keys, approx, 0
    scores = score_at_rows(Z, X, keys)
    if metric == "abs_ip":
        scores = scores.abs_()
    return best_scored(keys, scores, n, excluded, Z.shape[1] * X.shape[1], generator)


@BACKENDS.register("lowrank", "exact search on the best rank-k approximation of dZᵀX, the "
                   "c·n best candidates rescored exactly")
class LowRankIndex:
    """Rank-k candidates + exact rescoring behind the search contract (mode "pairs")."""

    mode = "pairs"

    def __init__(self, rank: int = 8, candidates: float = 1.5, seed: int = 0):
        check_rank(rank)
        check_candidates(candidates)
        self.rank, self.candidates, self.seed = rank, float(candidates), seed

    @torch.no_grad()
    def pairs(self, Z: torch.Tensor, X: torch.Tensor, n: int, excluded: torch.Tensor,
              generator: torch.Generator, metric: str = "abs_ip", spec: Spectrum | None = None):
        """Z: (R, N), X: (R, M), excluded: sorted int64 flat indices -> (sorted idx (n,),
        scores (n,), info) as `exact_top_pairs`, info reporting the work done. spec: S's
        `spectrum` if the caller has it (`auto` computes it to choose the rank)."""
        N, M = check_pairs_call(Z, X, n, excluded, metric, LOWRANK_METRICS,
                                "backend 'lowrank' supports")
        numel = N * M
        Z, X = Z.float().contiguous(), X.float().contiguous()
        A, B, energy = rank_k_factors(Z, X, self.rank, spec)
        m = min(max(n, math.ceil(self.candidates * n)), numel - excluded.numel())
        # In training the active pairs crowd the top of S_k (they were grown from it), so the
        # pool must exclude them as it fills; it checks only those whose S_k score can reach a
        # pass's start threshold (`active_bound`), a short list, not all nnz. Should rounding
        # beyond the bound's margin let one through, the search runs again excluding them all.
        bound = active_bound(A, B, excluded, metric)
        pool, sinfo = search_pool(A, B, m, excluded, metric, excluded_bound=bound)
        del bound
        keys, approx = pool.top(m)  # sorted flat indices, S_k at them; pool emptied
        if not bool(free_mask(keys, excluded).all()):
            del keys, approx
            pool, sinfo = search_pool(A, B, m, excluded, metric)
            keys, approx = pool.top(m)
            sinfo["bound_missed"] = True
        # pool.top(m) kept the pairs >= the m-th best of S_k: m of them, or more by ties
        scored = keys.numel() if keys.numel() != n else 0  # 0: S_k's top n taken as it is
        idx, val, filled = rescored_best(Z, X, keys, approx, n, excluded, generator, metric)
        del keys, approx
        k = A.shape[0]
        info = {"rank": k, "energy": float(energy[min(k, energy.numel()) - 1]),
                "candidates": self.candidates, "scored": scored,
                "pairs_computed": sinfo["pairs_computed"], "random_filled": filled,
                "excluded_checked": sinfo["excluded_checked"],
                "bound_missed": sinfo.get("bound_missed", False)}
        return idx, val, info

    # -- the per-query contract ---------------------------------------------------------------

    def build(self, base: torch.Tensor) -> None:
        self.base = base.float().contiguous()  # (n_base, d)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: the ⌈c · k⌉ best base vectors by the rank-k scores, rescored exactly; the
        k best, best first (ids -1 and scores -inf past the base's size)."""
        q = queries.float()
        A, B, _ = rank_k_factors(q.t().contiguous(), self.base.t().contiguous(), self.rank)
        n_b = self.base.shape[0]
        m = min(n_b, max(k, math.ceil(self.candidates * k)))
        cand = torch.topk(A.t() @ B, m, dim=1).indices  # (n_q, m): (n_q, n_b) scores, small cases
        ip = (q[:, None, :] * self.base[cand]).sum(2)  # (n_q, m) exact
        k_eff = min(k, m)
        scores, pos = torch.topk(ip, k_eff, dim=1)
        ids = cand.gather(1, pos)
        if k_eff < k:
            scores = torch.cat([scores, scores.new_full((q.shape[0], k - k_eff), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((q.shape[0], k - k_eff), -1)], 1)
        return scores, ids
