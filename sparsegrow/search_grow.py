"""Search grow (thesis ch. 3): grow the inactive connections of largest |gradient| by searching
two groups of vectors, the layer's output gradients and its inputs, without a dense gradient.

For z = x Wᵀ the gradient of a missing weight (j, i) is G_ji = Σ_b dZ[b, j] X[b, i], the inner
product of column j of dZ with column i of X. The best new connections are the top |G_ji| among
inactive pairs: a maximum-inner-product search between N and M vectors of dimension B (B·P for
Conv2d; or s, the sketch size). The Sparsifier's `signals.GrowSignals` captures the vectors (the
criterion's `needs_signal`: rows, sketched or not, accumulated or not) and reduces them across
ranks; `search.top_pairs` finds the pairs through the chosen backend (exact by default: the same
set as RigL's dense-gradient grow), and each select records per-layer instrumentation in
`ctx.stats`.

    Sparsifier(model, 0.1, method="search", schedule=...,
               grow_kwargs={"backend": "exact", "metric": "abs_ip", "k_similar": 0.15,
                            "bits": 1.0, "sketch_dim": 0, "accumulate": False})
"""
from __future__ import annotations

import inspect
import math
import time

import torch

from .grow import GROW, GrowContext, GrowCriterion
from .search import BACKENDS, METRICS, exact_top_pairs, top_pairs
from .search.exact import _scores
from .selection import require_finite, select_top_rows
from .search.base import require
from .signals import SignalSpec
from .search.auto import check_quality_target
from .search.sampled import check_candidates
from .topology import isin_sorted, sample_inactive
from .updater import METHODS, Method

MEASURES = ("auto", "exact", "sampled", "off")
_MEASURE_ROWS = 256
_ROW_BLOCK_BYTES = 1 << 24  # score block of select_rows (constant fan-in): 16 MiB  # rows of S sampled to estimate recall and quality where exact is too dear
_OPTIONAL = {"faiss": "faiss", "hnswlib": "hnswlib"}  # backend name prefix -> package


def pair_scores(Z: torch.Tensor, X: torch.Tensor, idx: torch.Tensor, chunk: int = 1 << 15):
    """|G| at flat indices idx of G = Zᵀ X, without forming G: (len(idx),)."""
    M = X.shape[1]
    out = torch.empty(idx.numel(), device=Z.device)
    for c0 in range(0, idx.numel(), chunk):
        part = idx[c0:c0 + chunk]
        out[c0:c0 + chunk] = (Z[:, part // M] * X[:, part % M]).sum(0).abs()
    return out


def _draws_pairs(backend: str) -> bool:
    """The backend draws or picks pairs itself (sample-*, lowrank) rather than answering queries."""
    return getattr(BACKENDS.get(backend), "mode", "knn") == "pairs"


def _check_backend_options(backend: str, options: dict) -> None:
    """Refuse, at construction, options the backend does not take (each backend's knobs'
    values are checked by building it once; exact's options go to `exact_top_pairs`)."""
    if backend == "exact":
        names = list(inspect.signature(exact_top_pairs).parameters)
        allowed = names[names.index("metric") + 1:]
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ValueError(f"search backend 'exact' does not take option(s) {bad}; "
                             f"allowed: {', '.join(allowed)}")
        return
    try:
        BACKENDS.get(backend)(**options)
    except TypeError as e:  # an unexpected keyword: name it and what the backend takes
        params = [n for n, q in inspect.signature(BACKENDS.get(backend)).parameters.items()
                  if q.kind is q.KEYWORD_ONLY or q.kind is q.POSITIONAL_OR_KEYWORD]
        raise ValueError(f"search backend {backend!r}: {e}"
                         + (f"; allowed: {', '.join(params)}" if params else "")) from None


class SearchGrow(GrowCriterion):
    """The `search` grow criterion. Arguments (all validated here, at construction):

    backend     one of `search.BACKENDS` (exact, auto, lowrank, sample-norm, sample-wedge,
                sample-diamond, faiss-flat, faiss-ivf, faiss-hnsw, faiss-range, hnswlib, lsh)
    metric      ip | abs_ip | l2 (thesis; abs_ip = |G|, RigL's score, the default)
    k_similar   (0, 1]: share of the M candidates searched per query (approximate backends)
    bits        (0, 64]: LSH hash bits per vector dimension (backend lsh)
    sketch_dim  int >= 0: rows of the random-sign sketch of the batch (0: exact rows)
    accumulate  bool: sum the signal over every step of the window since the last update
    global_threshold  bool: share the candidate budget by a global threshold (the fix for
                per-query top-k); False is the thesis's per-query rule
    measure     auto | exact | sampled | off: how recall and quality are measured
    measure_max_numel  layers up to this size are measured exactly under "auto"
    backend_options    dict passed to the backend (e.g. {"rank": 8}, {"nprobe": 8})
    candidates  > 0: pairs scored per grown connection (backends that draw or pick pairs:
                sample-norm, sample-wedge, sample-diamond, lowrank)
    quality_target  (0, 1]: backend auto picks the cheapest backend expected to reach this
                quality (Σ|G| chosen / Σ|G| exact top n); the quality it measured on a layer's
                previous update replaces the expectation for that layer
    seed        seeds the sketches and the backends
    """

    def __init__(self, backend: str = "exact", metric: str = "abs_ip", k_similar: float = 0.15,
                 bits: float = 1.0, sketch_dim: int = 0, accumulate: bool = False,
                 global_threshold: bool = True, measure: str = "auto",
                 measure_max_numel: int = 1 << 24, backend_options: dict | None = None,
                 seed: int = 0, candidates: float | None = None, quality_target: float = 0.8):
        BACKENDS.get(backend)  # ValueError naming the allowed backends
        if metric not in METRICS:
            raise ValueError(f"unknown search metric {metric!r}; allowed: {', '.join(METRICS)}")
        if isinstance(k_similar, bool) or not isinstance(k_similar, (int, float)) \
                or not 0 < k_similar <= 1:
            raise ValueError(f"k_similar must be in (0, 1] (share of candidates per query), "
                             f"got {k_similar!r}")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 64:
            raise ValueError(f"bits must be in (0, 64] (LSH bits per vector dimension), got {bits!r}")
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 0:
            raise ValueError(f"sketch_dim must be an integer >= 0 (0: no sketch), got {sketch_dim!r}")
        for name, v in (("accumulate", accumulate), ("global_threshold", global_threshold)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
        if not isinstance(measure_max_numel, int) or measure_max_numel < 0:
            raise ValueError(f"measure_max_numel must be an integer >= 0, got {measure_max_numel!r}")
        if backend_options is not None and not isinstance(backend_options, dict):
            raise ValueError(f"backend_options must be a dict, got {backend_options!r}")
        if backend == "faiss-range" and metric == "l2":
            raise ValueError("backend 'faiss-range' supports metrics ip and abs_ip, not l2")
        for prefix, package in _OPTIONAL.items():
            if backend.startswith(prefix):
                require(package, backend)  # ImportError naming `pip install sparsegrow[search]`
        self.backend, self.metric, self.k_similar, self.bits = backend, metric, k_similar, bits
        self.sketch_dim, self.accumulate = sketch_dim, accumulate
        self.global_threshold, self.measure = global_threshold, measure
        self.measure_max_numel = measure_max_numel
        self.backend_options = dict(backend_options or {})
        if backend == "lsh":
            self.backend_options.setdefault("bits", bits)
        if backend != "exact":
            self.backend_options.setdefault("seed", seed)
        if candidates is not None:
            check_candidates(candidates)
            if not _draws_pairs(backend):  # silently it would be ignored
                raise ValueError(
                    f"candidates applies to the backends that draw or pick pairs "
                    f"({', '.join(filter(_draws_pairs, BACKENDS.names()))}), not {backend!r}"
                    + (" (auto chooses each sampler's candidates count itself)"
                       if backend == "auto" else ""))
            self.backend_options.setdefault("candidates", candidates)
        check_quality_target(quality_target)
        if backend == "auto":
            self.backend_options.setdefault("quality_target", quality_target)
        _check_backend_options(backend, self.backend_options)  # unknown knobs: now, not mid-run
        self.candidates, self.quality_target = candidates, quality_target
        self._seen: dict[str, dict] = {}  # auto: per layer, {candidates: measured quality}
        self.seed = seed
        self.needs_signal = SignalSpec("rows", sketch_dim=sketch_dim, accumulate=accumulate,
                                       seed=seed)
        # constant fan-in (SRigL's structure): exact search per output unit, see select_rows
        self.per_row = backend == "exact"

    # -- the criterion -------------------------------------------------------------------------

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        p = ctx.param
        if ctx.signal is None or ctx.signal.Z is None:
            raise RuntimeError(f"search grow: no (dZ, X) rows were handed over for {p.fqn}; the "
                               "Sparsifier captures them (build it with method='search')")
        sync = (lambda: torch.cuda.synchronize()) if ctx.excluded.is_cuda else (lambda: None)
        t0 = time.perf_counter()
        Z, X = ctx.signal.Z, ctx.signal.X  # (R, N), (R, M)
        N, M = p.shape[0], p.numel // p.shape[0]
        if Z.shape[1] != N or X.shape[1] != M:
            raise RuntimeError(f"search grow: {p.fqn} captured ({Z.shape[1]}, {X.shape[1]}) "
                               f"vectors for a ({N}, {M}) weight")
        excluded = ctx.excluded.to(Z.device)
        options = self.backend_options
        if self.backend == "auto":  # the layer's measured qualities replace the expectation
            options = {**options, "expected": self._seen.get(p.fqn)}
        idx, _, info = top_pairs(Z, X, n, excluded, generator, self.backend, self.metric,
                                 self.k_similar, self.global_threshold, self.seed, options)
        sync()
        stats = ctx.stats
        stats.update({"grow_time_s": time.perf_counter() - t0, "signal_rows": Z.shape[0],
                      "backend": self.backend})
        stats.update({f"search_{k}": v for k, v in info.items()})
        t1 = time.perf_counter()
        stats.update(self._measure(Z, X, idx, n, excluded, info.get("auto_choice")))
        sync()
        c = info.get("auto_candidates")
        if c is not None and stats.get("quality") is not None:  # auto ran a sampler: remember
            self._seen.setdefault(p.fqn, {})[float(c)] = stats["quality"]
        stats["measure_time_s"] = time.perf_counter() - t1
        return idx.to(ctx.excluded.device)

    def select_rows(self, ctx: GrowContext, k: int, generator: torch.Generator) -> torch.Tensor:
        """Constant fan-in: the k best eligible inputs of every output unit, (N * k,) sorted.

        Exact search by blocks of output units: S[jb] = score(Z[:, jb]ᵀ X) is (rows, M), at most
        `_ROW_BLOCK_BYTES` at a time, never the whole N × M gradient; excluded pairs are -inf."""
        p = ctx.param
        self._check_signal(ctx)
        t0 = time.perf_counter()
        Z, X = ctx.signal.Z, ctx.signal.X  # (R, N), (R, M)
        require_finite(Z, "search grow signal dZ")
        require_finite(X, "search grow signal X")
        N, M = Z.shape[1], X.shape[1]
        excluded = ctx.excluded.to(Z.device)
        per = max(1, _ROW_BLOCK_BYTES // (4 * M))
        out = []
        for r0 in range(0, N, per):
            r1 = min(N, r0 + per)
            S = _scores(Z[:, r0:r1].t() @ X, self.metric, Z[:, r0:r1], X)  # (r1 - r0, M)
            lo, hi = torch.searchsorted(excluded, torch.tensor([r0 * M, r1 * M], device=Z.device))
            S.view(-1)[excluded[lo:hi] - r0 * M] = float("-inf")
            cols = select_top_rows(S, k, generator)  # (r1 - r0, k)
            out.append((cols + M * torch.arange(r0, r1, device=Z.device)[:, None]).reshape(-1))
        idx = torch.cat(out)
        ctx.stats.update({"grow_time_s": time.perf_counter() - t0, "signal_rows": Z.shape[0],
                          "backend": self.backend, "recall": 1.0, "quality": 1.0,
                          "recall_sampled": False})  # exact per unit by construction
        return idx.to(ctx.excluded.device)

    def _check_signal(self, ctx: GrowContext) -> None:
        if ctx.signal is None or ctx.signal.Z is None:
            raise RuntimeError(f"search grow: no (dZ, X) rows were handed over for "
                               f"{ctx.param.fqn}; the Sparsifier captures them (build it with "
                               "method='search')")

    def _measure(self, Z, X, idx, n, excluded, auto_choice: str | None = None) -> dict:
        """Recall and quality of the chosen set (see `measure_grow`); on `_MEASURE_ROWS` random
        rows of G where exact search over all of G is dear. Exact search's own choice (the
        backend, or auto's pick) is quality 1 by construction: only random's is measured."""
        if self.measure == "off":
            return {}
        N, M = Z.shape[1], X.shape[1]
        sampled = N > _MEASURE_ROWS and (self.measure == "sampled" or (
            self.measure == "auto" and N * M > self.measure_max_numel))
        return measure_grow(Z, X, idx, n, excluded, _MEASURE_ROWS if sampled else None,
                            self.seed + 12345,
                            "exact" in (self.backend, auto_choice) and self.metric == "abs_ip")


def measure_grow(Z: torch.Tensor, X: torch.Tensor, idx: torch.Tensor, n: int,
                 excluded: torch.Tensor, rows: int | None = None, seed: int = 12345,
                 is_exact: bool = False) -> dict:
    """Recall of the grown set `idx` against the exact top-n of |G| = |Zᵀ X| over the inactive
    pairs, quality Σ|G| chosen / Σ|G| exact top-n, and random growth's quality on the same signal.

    rows: estimate on that many random rows of G (the row-subset estimate, for layers where exact
    search over all of G is dear): the k pairs of idx in those rows against the exact top k of
    those rows' inactive pairs (count-matched, so quality <= 1: measured against the expected
    round(n · rows / N) instead, a subset holding more or fewer of the heavy rows than average
    moved the estimate above 1). It judges the choice within rows, not how many pairs each row
    got beyond the subset; where the subset holds none of idx, recall and quality are None (no
    estimate), never 0. is_exact: idx is exact search's (recall 1 by construction; only
    random's quality is computed). Uses a private generator seeded `seed`."""
    N, M = Z.shape[1], X.shape[1]
    sampled = rows is not None and N > rows
    g = torch.Generator().manual_seed(seed)  # private: no shift of the caller's draws
    if sampled:
        pick = torch.sort(torch.randperm(N, generator=g)[:rows]).values.to(Z.device)
        where = torch.full((N,), -1, dtype=torch.long, device=Z.device)
        where[pick] = torch.arange(pick.numel(), device=Z.device)

        def restrict(flat):  # flat indices of G -> flat indices of G[pick], sorted
            r = where[flat // M]
            keep = r >= 0
            return torch.sort(r[keep] * M + flat[keep] % M).values

        Z, excluded, idx = Z[:, pick], restrict(excluded), restrict(idx)
        if idx.numel() == 0 and not is_exact:
            # none of the grown pairs lies in the subset (growth on a few heavy rows): it says
            # nothing about the choice; reporting 0 would call exact search's own choice bad
            return {"recall": None, "quality": None, "quality_random": None,
                    "recall_sampled": True}
        n = idx.numel() or max(1, round(n * pick.numel() / N))
        n = min(n, pick.numel() * M - excluded.numel())
    # Random growth on the same signal and rows, beside it (its quality is the floor).
    rand = sample_inactive(Z.shape[1] * M, excluded, n, g, Z.device)
    rand_q = float(pair_scores(Z, X, rand).sum())
    if is_exact and not sampled:
        best = float(pair_scores(Z, X, idx).sum())
        return {"recall": 1.0, "quality": 1.0, "recall_sampled": False,
                "quality_random": rand_q / best if best > 0 else 1.0}
    ref, ref_val, _ = exact_top_pairs(Z, X, n, excluded, g, "abs_ip")
    best = float(ref_val.sum())
    if is_exact:
        return {"recall": 1.0, "quality": 1.0, "recall_sampled": True,
                "quality_random": rand_q / best if best > 0 else 1.0}
    hit = int(isin_sorted(idx, ref).sum())
    chosen = float(pair_scores(Z, X, idx).sum())
    return {"recall": hit / max(ref.numel(), 1),
            "quality": chosen / best if best > 0 else 1.0,
            "quality_random": rand_q / best if best > 0 else 1.0,
            "recall_sampled": bool(sampled)}


GROW.add("search", SearchGrow,
         "grow the inactive connections of largest |dZᵀX| by vector search, no dense gradient "
         "(thesis ch. 3; exact by default = RigL's choice)")
METHODS.add("search", Method("magnitude", "search"),
            "search grow: magnitude drop, grow by searching layer inputs and output gradients")
