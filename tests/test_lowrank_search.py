"""The `lowrank` search backend (issue 13): exact search on S's best rank-k approximation, the
c · n best candidates rescored exactly; and `auto`'s choice of it by S's spectrum.

Signal families for the quality claims (auto's docstring: quality >= energy on every one):
low-rank plus noise (the shape of real gradient signals), skewed Gaussian rows, plain Gaussian.
"""
import math

import pytest
import torch

from sparsegrow.search import exact_top_pairs, top_pairs
from sparsegrow.search.auto import choose
from sparsegrow.search.lowrank import rank_k_factors, spectrum
from sparsegrow.search_grow import SearchGrow, pair_scores
from sparsegrow.selection import NonFiniteScores, require_finite
from sparsegrow.topology import isin_sorted, sample_inactive


def signal(kind: str, N=300, M=400, R=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "lowrank+noise":  # rank 4 plus 10% noise, heavy and light units
        Z = torch.randn(R, 4, generator=g) @ torch.randn(4, N, generator=g)
        X = torch.randn(R, 4, generator=g) @ torch.randn(4, M, generator=g)
        Z = (Z + 0.1 * torch.randn(R, N, generator=g)) * torch.rand(N, generator=g) ** 2
        X = torch.relu(X + 0.1 * torch.randn(R, M, generator=g))
    elif kind == "skewed":
        Z = torch.randn(R, N, generator=g) * torch.rand(N, generator=g) ** 3
        X = torch.relu(torch.randn(R, M, generator=g)) * torch.rand(M, generator=g) ** 3
    else:
        Z, X = torch.randn(R, N, generator=g), torch.randn(R, M, generator=g)
    return Z, X


def active(N=300, M=400, density=0.05, seed=1):
    return sample_inactive(N * M, torch.empty(0, dtype=torch.long), int(density * N * M),
                           torch.Generator().manual_seed(seed))


def lowrank(Z, X, n, ex, seed=0, **options):
    return top_pairs(Z, X, n, ex, torch.Generator().manual_seed(seed), "lowrank",
                     backend_options=options)


def quality(Z, X, idx, ref):
    return float(pair_scores(Z, X, idx).sum() / pair_scores(Z, X, ref).sum())


@pytest.mark.parametrize("metric", ["abs_ip", "ip"])
@pytest.mark.parametrize("kind", ["lowrank+noise", "skewed", "gaussian"])
def test_exactly_n_distinct_inactive_sorted(kind, metric):
    Z, X = signal(kind)
    ex = active()
    for n, c in ((600, 1.5), (3000, 1.0)):
        idx, val, info = top_pairs(Z, X, n, ex, torch.Generator().manual_seed(0), "lowrank",
                                   metric, backend_options={"candidates": c})
        assert idx.numel() == n and idx.unique().numel() == n
        assert (idx[1:] > idx[:-1]).all()
        assert not isin_sorted(idx, ex).any()
        assert info["random_filled"] == 0
        s = (Z.t() @ X).reshape(-1)[idx]
        if c > 1:  # rescored: the returned scores are the exact ones
            assert info["scored"] >= n
            assert torch.allclose(val, s.abs() if metric == "abs_ip" else s, atol=1e-4)
        else:  # c = 1: the rank-k top n with S_k's scores, unrescored
            A, B, _ = rank_k_factors(Z, X, 8)
            sk = (A.t() @ B).reshape(-1)[idx]
            assert info["scored"] == 0
            assert torch.allclose(val, sk.abs() if metric == "abs_ip" else sk, atol=1e-4)


def crowded_active(Z, X, top=6000):
    """As training leaves it: the top of |S| (grown from it) and a random share (the rest)."""
    S = (Z.t() @ X).abs().reshape(-1)
    return torch.unique(torch.cat([torch.topk(S, top).indices, active()]))  # sorted


@pytest.mark.parametrize("metric", ["abs_ip", "ip"])
def test_active_pairs_crowding_the_top_are_excluded_in_the_pool(metric):
    # the active pairs hold the top of S; the pool checks only those whose S_k bound reaches the
    # search's threshold, not the random rest; still n inactive pairs, exact search's
    Z, X = signal("lowrank+noise")
    ex = crowded_active(Z, X)
    ref, _, _ = exact_top_pairs(Z, X, 600, ex, torch.Generator().manual_seed(0), metric)
    idx, _, info = top_pairs(Z, X, 600, ex, torch.Generator().manual_seed(0), "lowrank", metric,
                             backend_options={"rank": 32, "candidates": 1.5})
    assert 0 < info["excluded_checked"] < 0.7 and not info["bound_missed"]
    assert not isin_sorted(idx, ex).any() and idx.numel() == 600
    assert torch.equal(idx, ref)


def test_a_bound_below_the_search_scores_falls_back_to_excluding_all(monkeypatch):
    # a bound that misses (here: far too low, as rounding beyond the margin would be) lets
    # active pairs into the pool: they are caught and the search runs again excluding them all
    from sparsegrow.search import lowrank as lr
    Z, X = signal("lowrank+noise")
    ex = crowded_active(Z, X)
    ref, _, _ = exact_top_pairs(Z, X, 600, ex, torch.Generator().manual_seed(0))
    monkeypatch.setattr(lr, "active_bound",
                        lambda A, B, excluded, metric: torch.full((excluded.numel(),), -1.0))
    idx, _, info = lowrank(Z, X, 600, ex, rank=32, candidates=1.5)
    assert info["bound_missed"] and info["excluded_checked"] == 1.0
    assert torch.equal(idx, ref)


def test_active_bound_covers_the_search_scores():
    # bound >= |S_k| at every excluded pair as the GEMM computes it, by at most the margin
    from sparsegrow.search.lowrank import active_bound
    Z, X = signal("skewed")
    A, B, _ = rank_k_factors(Z, X, 8)
    ex = active(density=0.3)
    gemm = (A.t() @ B).reshape(-1)[ex]
    for metric, s in (("abs_ip", gemm.abs()), ("ip", gemm)):
        b = active_bound(A, B, ex, metric, chunk=1000)  # chunks spanning rows
        assert (b >= s).all()
        assert float((b - s).max()) <= 4 * 8 * 2.0 ** -24 * float(
            A.norm(dim=0).max() * B.norm(dim=0).max()) * 1.01 + 1e-6


@pytest.mark.parametrize("kind", ["lowrank+noise", "gaussian"])
def test_full_rank_equals_exact_search(kind):
    # rank >= rank(S) = R: S_k = S, so the candidates hold the exact top n and the rescored
    # selection equals exact search's (same tie-break generator)
    Z, X = signal(kind)
    ex = active()
    ref, _, _ = exact_top_pairs(Z, X, 900, ex, torch.Generator().manual_seed(0))
    idx, _, info = lowrank(Z, X, 900, ex, rank=32, candidates=1.2)
    assert info["rank"] == 32 and info["energy"] == pytest.approx(1.0)
    assert torch.equal(idx, ref)


def test_factors_are_the_truncated_svd():
    Z, X = (t.double() for t in signal("skewed", N=60, M=80, R=12))
    S = Z.t() @ X
    U, s, Vh = torch.linalg.svd(S)
    for k in (1, 3, 12):
        A, B, energy = rank_k_factors(Z, X, k)
        best = (U[:, :k] * s[:k]) @ Vh[:k]
        assert A.shape == (k, 60) and B.shape == (k, 80)
        assert torch.allclose(A.t() @ B, best, atol=1e-8 * float(s[0]))
        assert float(energy[k - 1]) == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()))


def test_rank_deficient_and_zero_signals():
    Z, X = signal("gaussian", N=50, M=70, R=16)
    Z[8:] = 0  # rank 8
    sp = spectrum(Z, X)
    assert sp.s.numel() == 8 and float(sp.energy[-1]) == pytest.approx(1.0)
    A, B, _ = rank_k_factors(Z, X, 20)  # asked for more than the rank: the rank
    assert A.shape[0] == 8 and torch.allclose(A.t() @ B, Z.t() @ X, atol=1e-4)
    ex = active(50, 70)
    idx, _, _ = lowrank(torch.zeros(16, 50), X, 100, ex)  # S = 0: n inactive pairs anyway
    assert idx.numel() == 100 and idx.unique().numel() == 100 and not isin_sorted(idx, ex).any()


@pytest.mark.parametrize("kind", ["lowrank+noise", "skewed", "gaussian"])
def test_quality_at_least_energy(kind):
    # the rule auto relies on: the share of ‖S‖² in the top k singular values is a floor for the
    # quality of rank k (Σ|G| chosen / Σ|G| exact top n)
    Z, X = signal(kind, N=600, M=800)
    ex = active(600, 800, 0.02)
    ref, _, _ = exact_top_pairs(Z, X, 2000, ex, torch.Generator().manual_seed(0))
    for k in (2, 4, 8):
        for c in (1.0, 1.5):  # auto's count, the backend's default
            idx, _, info = lowrank(Z, X, 2000, ex, rank=k, candidates=c)
            assert quality(Z, X, idx, ref) >= info["energy"] - 0.02, (kind, k, c, info)


def test_more_rank_and_candidates_do_not_hurt_on_a_low_rank_signal():
    Z, X = signal("lowrank+noise", N=600, M=800)
    ex = active(600, 800, 0.02)
    ref, _, _ = exact_top_pairs(Z, X, 2000, ex, torch.Generator().manual_seed(0))
    q = {(k, c): quality(Z, X, lowrank(Z, X, 2000, ex, rank=k, candidates=c)[0], ref)
         for k in (1, 4) for c in (1.0, 2.0)}
    assert q[(4, 2.0)] >= q[(4, 1.0)] - 1e-6 and q[(4, 1.0)] > q[(1, 1.0)]
    assert q[(4, 2.0)] > 0.99


def test_seeded_and_deterministic():
    Z, X = signal("skewed")
    ex = active()
    a, b = lowrank(Z, X, 700, ex, seed=3)[0], lowrank(Z, X, 700, ex, seed=3)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "rank must be an int >= 1"), ({"rank": "8"}, "rank must be an int >= 1"),
    ({"rank": True}, "rank must be an int >= 1"), ({"rank": 2.5}, "rank must be an int >= 1"),
    ({"candidates": 0}, "candidates must be a number > 0"),
    ({"candidates": float("nan")}, "candidates must be a number > 0"),
])
def test_bad_knobs_are_clear_errors(options, match):
    Z, X = signal("skewed")
    with pytest.raises(ValueError, match=match):
        lowrank(Z, X, 10, active(), **options)


def test_l2_is_refused_and_auto_skips_lowrank_for_it():
    Z, X = signal("lowrank+noise")
    ex = active()
    with pytest.raises(ValueError, match="backend 'lowrank' supports metrics ip, abs_ip, not 'l2'"):
        top_pairs(Z, X, 10, ex, torch.Generator(), "lowrank", metric="l2")
    _, _, info = top_pairs(Z, X, 10, ex, torch.Generator(), "auto", metric="l2")
    assert info["auto_choice"] == "exact"


def test_search_grow_passes_candidates_to_lowrank():
    crit = SearchGrow(backend="lowrank", candidates=3.0, backend_options={"rank": 4})
    assert crit.backend_options["candidates"] == 3.0 and crit.backend_options["rank"] == 4
    with pytest.raises(ValueError, match="rank must be an int"):  # at construction
        SearchGrow(backend="lowrank", backend_options={"rank": -1})


# -- auto ---------------------------------------------------------------------------------------

def test_auto_picks_the_smallest_rank_whose_energy_reaches_the_target():
    energy = torch.tensor([0.5, 0.7, 0.75, 0.81, 0.86, 0.9, 0.92, 0.95] + [1.0] * 120,
                          dtype=torch.float64)
    backend, k, reason = choose(65536, 65536, 128, 1_290_000, 0.8, "wedge", energy=energy)
    assert (backend, k) == ("lowrank", 4) and "0.810 >= 0.8" in reason
    assert choose(65536, 65536, 128, 1_290_000, 0.9, "wedge", energy=energy)[:2] == ("lowrank", 8)
    flat = torch.linspace(1 / 128, 1, 128, dtype=torch.float64)  # no rank <= 32 reaches 0.8
    backend, _, reason = choose(65536, 65536, 128, 1_290_000, 0.8, "wedge", energy=flat)
    # a fallback to exact says why lowrank was passed over, then why no sampler
    assert backend == "exact" and reason.startswith("lowrank: rank 4 holds 0.031, rank 8 holds")
    assert "rank 32 holds 0.250 < 0.8 of ‖S‖²; no candidates count" in reason
    backend, _, reason = choose(300, 784, 128, 7000, 0.8, "wedge", energy=energy)  # tiny layer
    assert backend == "exact" and reason.startswith("lowrank: rank 4 holds 0.810 but est.")
    assert choose(300, 784, 128, 7000, 0.8, "wedge")[2].startswith("lowrank: not for this metric")


def test_auto_runs_lowrank_on_a_large_low_rank_signal_and_says_why():
    # at density 0.001 exact's N·M·R estimate exceeds lowrank's c·n candidates
    Z, X = signal("lowrank+noise", N=4096, M=4096, R=128)
    ex = active(4096, 4096, 0.001)
    n = 5000
    idx, _, info = top_pairs(Z, X, n, ex, torch.Generator().manual_seed(0), "auto")
    assert info["auto_choice"] == "lowrank:4" and "rank 4 holds" in info["auto_reason"]
    assert idx.numel() == n and not isin_sorted(idx, ex).any()
    assert "auto_candidates" not in info  # only samplers feed SearchGrow's per-layer table


# -- what the backend's speed rests on -------------------------------------------------------------

def test_exact_search_without_exclusions_equals_dense_selection():
    # the pool must own the scores it keeps: exact search reuses its survivor buffers, and with
    # nothing to exclude the pool once held views of them (overwritten by the next flush)
    Z, X = signal("skewed", N=900, M=1000)
    none = torch.empty(0, dtype=torch.long)
    # no seeded threshold, no bound, 3-row blocks: every pair survives, 3000 per block, and the
    # buffer flushes several times between the pool's prunes
    idx, val, _ = exact_top_pairs(Z, X, 5000, none, torch.Generator().manual_seed(0),
                                  block_bytes=3 * 1000 * 4, prune=False, seed_threshold=False)
    S = (Z.t() @ X).abs().reshape(-1)
    assert torch.equal(idx, torch.sort(torch.topk(S, 5000).indices).values)
    assert torch.allclose(val, S[idx], atol=1e-5)


def test_require_finite_fast_path_keeps_its_verdicts():
    big = torch.full((4, 4), 3e38)  # finite, but the sum overflows to inf
    require_finite(big, "big")  # no error: the elementwise check decides
    for bad in (float("nan"), math.inf, -math.inf):
        t = torch.ones(4, 4)
        t[1, 2] = bad
        with pytest.raises(NonFiniteScores, match="t: "):
            require_finite(t, "t")


def test_row_subset_estimate_gives_exact_search_quality_one():
    # exact search's pairs within any rows are those rows' exact top-k: the count-matched
    # estimate must say 1 (measured against round(n · rows / N) it said 0.80 here)
    from sparsegrow.search_grow import measure_grow
    Z, X = signal("skewed", N=2000, M=300)
    ex = active(2000, 300, 0.02)
    idx, _, _ = exact_top_pairs(Z, X, 3000, ex, torch.Generator().manual_seed(0))
    for seed in range(4):
        est = measure_grow(Z, X, idx, 3000, ex, rows=100, seed=seed)
        assert est["recall_sampled"] and est["quality"] == pytest.approx(1.0, abs=1e-6)
        assert est["recall"] == pytest.approx(1.0) and est["quality_random"] < 0.5
    low, _, _ = lowrank(Z, X, 3000, ex, rank=2, candidates=1.0)
    full = measure_grow(Z, X, low, 3000, ex)
    part = measure_grow(Z, X, low, 3000, ex, rows=500, seed=1)
    assert not full["recall_sampled"] and part["quality"] <= 1.0
    assert part["quality"] == pytest.approx(full["quality"], abs=0.05)


def test_row_subset_holding_no_grown_pair_gives_no_estimate_not_zero():
    # growth on one heavy row: a subset without that row says nothing about the choice (it
    # said quality 0 for exact search's own pairs on a 2^20-wide layer)
    from sparsegrow.search_grow import measure_grow
    Z, X = signal("gaussian", N=2000, M=300)
    Z[:, 1:] *= 1e-3  # row 0 holds every top pair
    ex = torch.empty(0, dtype=torch.long)
    idx, _, _ = exact_top_pairs(Z, X, 200, ex, torch.Generator().manual_seed(0))
    assert (idx // 300 == 0).all()
    seeds = [s for s in range(20) if 0 not in torch.randperm(2000, generator=torch.Generator()
                                                              .manual_seed(s))[:100]]
    est = measure_grow(Z, X, idx, 200, ex, rows=100, seed=seeds[0])
    assert est["quality"] is None and est["recall"] is None and est["recall_sampled"]
    # exact search's own choice (exact, or auto's pick) is 1 by construction, subset or not
    assert measure_grow(Z, X, idx, 200, ex, rows=100, seed=seeds[0], is_exact=True)["quality"] == 1
    g = SearchGrow(backend="auto", measure="sampled")
    assert g._measure(Z, X, idx, 200, ex, auto_choice="exact")["quality"] == 1.0


@pytest.mark.parametrize("overrides, backend", [
    ([], "exact"),
    (["sparsity.method=search"], "exact"),  # masked storage: exact stays the default
    (["sparsity.storage=sparse"], "exact"),  # not grown by search
    (["sparsity.storage=sparse", "sparsity.method=search"], "auto"),
    (["sparsity.storage=sparse", "sparsity.method=set", "sparsity.grow=search"], "auto"),
    (["sparsity.storage=sparse", "sparsity.method=search", "search.backend=lowrank"], "lowrank"),
])
def test_auto_is_the_config_default_for_truly_sparse_search(overrides, backend):
    from sparsegrow.experiments.config import load_config
    assert load_config(None, overrides).search.backend == backend


def test_blocked_scoring_equals_whole_transposes():
    # score_at_rows transposes tiles of a large signal (memory at 10⁶²): same scores as the
    # whole transposes, for every tile shape (blocks of 2..50 rows of Zᵀ / Xᵀ)
    from sparsegrow.search.sampled import score_at, score_at_rows
    Z, X = signal("skewed", N=70, M=90, R=8)
    keys = torch.sort(torch.randperm(70 * 90, generator=torch.Generator().manual_seed(0))[:900]).values
    ref = score_at(Z.t().contiguous(), X.t().contiguous(), keys)
    for width in (2, 7, 50):
        got = score_at_rows(Z, X, keys, block_bytes=4 * 8 * width, whole_bytes=0)
        assert torch.allclose(got, ref, atol=1e-6)


def test_pool_top_cuts_before_sorting_and_keeps_ties():
    from sparsegrow.search.base import TopPool
    pool = TopPool(3, torch.empty(0, dtype=torch.long), 100)
    pool.add(torch.tensor([50, 7, 9, 3, 80]), torch.tensor([1.0, 5.0, 2.0, 2.0, 0.5]))
    idx, val = pool.top(3)
    assert idx.tolist() == [3, 7, 9] and val.tolist() == [2.0, 5.0, 2.0]
    idx, val = pool.top(1)  # emptied by the first call
    assert idx.numel() == 0 and pool.size == 0


@pytest.mark.parametrize("backend", ["lowrank", "auto"])
def test_no_n_by_m_allocation_at_a_million_squared(backend):
    # 2^20 x 2^20 (4 TiB as a dense float32 S): every tensor stays O(n + R · width) or the
    # search's fixed 64 MiB score block, never N × M; the growth is exact in count and inactive
    from test_sparse_linear import MaxNumel
    N = M = 1 << 20
    R, nnz, n = 8, 1 << 18, 1 << 16
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(R, 4, generator=g) @ torch.randn(4, N, generator=g)  # rank 4: auto -> lowrank
    X = torch.relu(torch.randn(R, 4, generator=g) @ torch.randn(4, M, generator=g))
    ex = sample_inactive(N * M, torch.empty(0, dtype=torch.long), nnz, g)
    bound = max(64 << 20, 8 * 4 * R * max(N, M))
    with MaxNumel() as mode:
        idx, _, info = top_pairs(Z, X, n, ex, torch.Generator().manual_seed(1), backend)
    assert mode.max_bytes <= bound, f"{mode.max_op} made a tensor of {mode.max_bytes} bytes"
    assert idx.numel() == n and idx.unique().numel() == n and not isin_sorted(idx, ex).any()
    if backend == "auto":
        assert info["auto_choice"].startswith("lowrank")


def test_seeded_threshold_holds_when_few_pairs_are_grown():
    # p = 1.5 n / N·M = 2e-5: a 512² sample held ~5 pairs above, the search started from the
    # floor and pooled everything until its first flush (1 GB more at 10⁶²); the sample now
    # grows until ~200 lie above, and about 1.5 n pairs are ever offered to the pool
    from sparsegrow.search.exact import search_pool
    Z, X = signal("gaussian", N=1 << 14, M=1 << 14, R=8)
    n = 3500
    pool, info = search_pool(Z, X, n, torch.empty(0, dtype=torch.long), prune=False)
    assert n <= pool.offered < 2 * n, pool.offered
