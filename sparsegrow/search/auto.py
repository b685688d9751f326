"""`search.backend: auto`: per layer and update, the cheapest backend expected to reach a quality.

Quality = Σ|G| of the chosen pairs / Σ|G| of the exact top n. The options, cheapest first:

  lowrank  exact search on S's best rank-k approximation, candidates rescored (`lowrank`). Its
           expected quality is the energy share of S's top k singular values, which auto reads
           off the R × R spectrum (O((N + M) R²), shared with the backend): the smallest k in
           `LOWRANK_RANKS` whose energy reaches the target. Energy is a floor for quality on every
           signal measured (tests/test_lowrank_search.py: real-profile, real + noise, skewed and
           plain Gaussian signals: quality >= energy).
  samplers a sampler with `c` candidates per grown connection costs about c · n draws, a sort
           and an SDDMM; its expected quality per c starts from the table measured on captured
           training signals (benchmarks/results/bench_sampled_grow.md) and is replaced by what the
           caller measured on this layer's previous update (`expected`, kept by `SearchGrow`).
  exact    quality 1; one N × M × R product (less what its norm bound skips, ignored here: the
           estimate is an upper bound).

The choice and its reason go to info (`auto_choice`, `auto_reason`).
"""
from __future__ import annotations

import torch

from .base import BACKENDS
from .exact import exact_top_pairs
from .lowrank import LOWRANK_METRICS, LowRankIndex, spectrum

# Rough constants (2 shared CPU cores under load, torch 2.13, float32; to calibrate on a quiet
# machine with benchmarks/bench_sampled_grow.py):
EXACT_MACS_PER_S = 3.5e10  # dense score GEMM of the exact search, multiply-adds per second
SAMPLED_S_PER_DRAW = 6e-8  # draw + sort + merge + SDDMM (R = 128) per drawn candidate
# lowrank per candidate (sort, exclusion, SDDMM), and its candidates count: 65536², density
# 0.001, 1.29 M candidates in 0.52 s at one thread, loaded (factors and the rank-k search
# included). One candidate per grown connection: the rank-k top n themselves (rescoring more
# bought 0.976 -> 0.988 quality at rank 4 for 30% more time).
LOWRANK_S_PER_CANDIDATE = 4e-7
LOWRANK_CANDIDATES = 1.0
LOWRANK_RANKS = (4, 8, 16, 32)
# Expected quality of the wedge sampler per candidates count. 4, 8, 16: measured on the
# real-profile 65536² signal at density 0.001 (benchmarks/results/bench_sampled_grow.md: 0.33,
# 0.45, 0.58); 32 and 64 are NOT measured, an extrapolation to calibrate. So at the default target
# 0.8 the samplers are not chosen unless a layer's own measured quality says otherwise.
EXPECTED_QUALITY = {4: 0.33, 8: 0.45, 16: 0.58, 32: 0.68, 64: 0.76}
CANDIDATES = tuple(EXPECTED_QUALITY)


def check_quality_target(q) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"quality_target must be in (0, 1] (Σ|G| chosen / Σ|G| exact), got {q!r}")


def choose(N: int, M: int, R: int, n: int, quality_target: float, sampler: str,
           expected: dict | None = None, energy: torch.Tensor | None = None
           ) -> tuple[str, float | None, str]:
    """(backend, its knob or None, reason): the cheapest option expected to reach the target.
    The knob is lowrank's rank or a sampler's candidates count. energy: S's `Spectrum.energy`
    (None: lowrank is not an option, e.g. for metric l2)."""
    exact_s = N * M * R / EXACT_MACS_PER_S
    # why lowrank was passed over, for the reason of a fallback to exact
    no_lowrank = "lowrank: not for this metric"
    if energy is not None:
        ranks = [k for k in LOWRANK_RANKS if k < R]
        held = {k: float(energy[min(k, energy.numel()) - 1]) for k in ranks}
        no_lowrank = ("lowrank: " + (", ".join(f"rank {k} holds {e:.3f}" for k, e in held.items())
                                     + f" < {quality_target} of ‖S‖²" if ranks
                                     else f"no rank in {LOWRANK_RANKS} below the {R} signal rows"))
        for k in ranks:
            e = held[k]
            if e < quality_target:
                continue
            s = N * M * k / EXACT_MACS_PER_S + LOWRANK_CANDIDATES * n * LOWRANK_S_PER_CANDIDATE
            if s < exact_s:
                return ("lowrank", k, f"rank {k} holds {e:.3f} >= {quality_target} of ‖S‖², "
                                      f"est. <= {s:.3g} s < exact <= {exact_s:.3g} s (bounds: "
                                      "the norm-bound pruning is not counted)")
            no_lowrank = (f"lowrank: rank {k} holds {e:.3f} but est. {s:.3g} s >= exact "
                          f"<= {exact_s:.3g} s")
            break
    table = {**EXPECTED_QUALITY, **(expected or {})}
    for c in sorted(table):
        s = c * n * SAMPLED_S_PER_DRAW * max(R, 16) / 128
        if table[c] >= quality_target:
            if s < exact_s:
                return (f"sample-{sampler}", c,
                        f"expected quality {table[c]:.2f} >= {quality_target} with {c} candidates, "
                        f"est. {s:.3g} s < exact <= {exact_s:.3g} s")
            return ("exact", None, f"{no_lowrank}; sampling to quality {quality_target} ({c} "
                                   f"candidates, est. {s:.3g} s) costs more than exact (est. <= "
                                   f"{exact_s:.3g} s)")
    return ("exact", None, f"{no_lowrank}; no candidates count up to {max(table)} is expected to "
                           f"reach quality {quality_target}")


def check_sampler(sampler) -> None:
    if sampler not in ("norm", "wedge", "diamond"):
        raise ValueError(f"unknown auto sampler {sampler!r}; allowed: norm, wedge, diamond")


@torch.no_grad()
def auto_top_pairs(Z, X, n, excluded, generator, metric: str = "abs_ip",
                   quality_target: float = 0.8, sampler: str = "wedge",
                   expected: dict | None = None, seed: int = 0):
    check_quality_target(quality_target)
    check_sampler(sampler)
    spec = spectrum(Z.float(), X.float()) if metric in LOWRANK_METRICS else None
    backend, c, reason = choose(Z.shape[1], X.shape[1], Z.shape[0], n, quality_target, sampler,
                                expected, None if spec is None else spec.energy)
    auto = {"auto_choice": backend if c is None else f"{backend}:{c}", "auto_reason": reason}
    if backend == "exact":
        idx, val, info = exact_top_pairs(Z, X, n, excluded, generator, metric)
    elif backend == "lowrank":
        idx, val, info = LowRankIndex(rank=c, candidates=LOWRANK_CANDIDATES, seed=seed).pairs(
            Z, X, n, excluded, generator, metric, spec)
    else:
        idx, val, info = BACKENDS.get(backend)(candidates=c, seed=seed).pairs(
            Z, X, n, excluded, generator, metric)
        auto["auto_candidates"] = c  # SearchGrow learns this layer's sampler quality per count
    return idx, val, {**auto, **info}


@BACKENDS.register("auto", "per layer and update: the cheapest of lowrank, the samplers and "
                   "exact expected to reach quality_target")
class AutoIndex:
    """The per-query contract of `auto` is exact search's (sampling pays off only for growth)."""

    mode = "auto"

    def __init__(self, quality_target: float = 0.8, sampler: str = "wedge",
                 expected: dict | None = None, seed: int = 0):
        check_quality_target(quality_target)
        check_sampler(sampler)
        self.inner = BACKENDS.get("exact")()

    def build(self, base):
        self.inner.build(base)

    def search(self, queries, k):
        return self.inner.search(queries, k)

