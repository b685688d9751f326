"""Sampled search grow (issue 13): candidate sampling with exact scoring at the candidates.

Each sampler draws pair (j, i) a Poisson(draws · P(j, i)) number of times (row j gets a Poisson
count, each of its draws from the sampler's P(i | j)); the statistical tests check those means
against the formulas on a tiny case with a fixed seed: every pair's count is within 5 standard
deviations (Poisson: sqrt(mean)) of draws · P, and the chi-square over all pairs is within 5
standard deviations of its degrees of freedom.
"""
import math

import pytest
import torch

from sparsegrow.search import exact_top_pairs, top_pairs
from sparsegrow.search import sampled as S
from sparsegrow.search.auto import choose
from sparsegrow.search_grow import SearchGrow
from sparsegrow.topology import isin_sorted, sample_inactive

SAMPLERS = ["norm", "wedge", "diamond"]


def data(N=40, M=60, R=12, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(R, N, generator=g) * torch.rand(N, generator=g) ** 2
    X = torch.relu(torch.randn(R, M, generator=g))
    ex = sample_inactive(N * M, torch.empty(0, dtype=torch.long), int(density * N * M), g)
    return Z, X, ex


@pytest.mark.parametrize("kernel", ["c", "torch"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exactly_n_distinct_inactive(sampler, kernel, monkeypatch):
    if kernel == "torch":
        monkeypatch.setattr(S, "_candidates_c", lambda *a: None)
    Z, X, ex = data()
    for n, cand in ((100, 4), (500, 0.2)):  # 0.2: too few candidates, the rest filled at random
        idx, val, info = top_pairs(Z, X, n, ex, torch.Generator().manual_seed(0),
                                   f"sample-{sampler}", backend_options={"candidates": cand})
        assert idx.numel() == n and idx.unique().numel() == n
        assert (idx[1:] > idx[:-1]).all()  # sorted
        assert not isin_sorted(idx, ex).any()  # never an active pair
        assert info["kernel"] == kernel
        if cand < 1:
            assert info["random_filled"] > 0


@pytest.mark.parametrize("sampler", ["norm", "wedge"])
def test_covering_every_pair_equals_exact(sampler):
    # nonnegative signals: wedge's P(j, i) > 0 wherever S_ji != 0; a huge count draws them all
    g = torch.Generator().manual_seed(1)
    Z, X = torch.rand(8, 12, generator=g) + 0.1, torch.rand(8, 15, generator=g) + 0.1
    ex = sample_inactive(180, torch.empty(0, dtype=torch.long), 30, g)
    ref, _, _ = exact_top_pairs(Z, X, 40, ex, torch.Generator().manual_seed(0))
    idx, _, info = top_pairs(Z, X, 40, ex, torch.Generator().manual_seed(0), f"sample-{sampler}",
                             backend_options={"candidates": 2000})
    assert info["scored"] == 150  # every inactive pair
    assert torch.equal(idx, ref)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_c_and_torch_paths_draw_the_same_pairs(sampler):
    Z, X, ex = data()
    plan = S.Plan(Z, X, 3000, sampler, torch.Generator().manual_seed(3))
    c = S._candidates_c(plan, Z, X, ex)
    if c is None:
        pytest.skip("no C compiler")
    t = S._candidates_torch(plan, Z, X, ex)
    assert torch.equal(c[0], t[0]) and c[2] == t[2]
    assert torch.allclose(c[1], t[1], atol=1e-5)


def expected_pair_probability(Z, X, sampler):
    """(N, M) P(j, i) of each sampler's draws, from its formula."""
    if sampler == "norm":
        p = Z.norm(dim=0)[:, None] ** 2 * X.norm(dim=0)[None, :] ** 2
    else:  # wedge and diamond draw Σ_r |Z_rj X_ri| (Cohen & Lewis)
        p = Z.abs().t() @ X.abs()
    return p / p.sum()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_pair_probabilities_match_formula(sampler):
    g = torch.Generator().manual_seed(0)
    Z, X = torch.randn(5, 6, generator=g), torch.randn(5, 7, generator=g)
    draws = 400_000
    plan = S.Plan(Z.double(), X.double(), draws, sampler, torch.Generator().manual_seed(7))
    j, i, w = plan.draw(Z.double(), X.double())
    counts = torch.bincount(j * 7 + i, minlength=42).double()
    mean = draws * expected_pair_probability(Z.double(), X.double(), sampler).reshape(-1)
    z = (counts - mean) / mean.sqrt()
    assert z.abs().max() < 5, z.abs().max()
    chi2 = float((z * z).sum())
    assert abs(chi2 - 42) < 5 * math.sqrt(2 * 42), chi2
    if sampler == "diamond":  # the summed estimates: E = draws · S_ji² / W, W = Σ_r ‖Z_r‖₁‖X_r‖₁
        est = torch.zeros(42, dtype=torch.float64).index_add_(0, j * 7 + i, w)
        W = float((Z.double().abs().sum(1) * X.double().abs().sum(1)).sum())
        target = draws * (Z.double().t() @ X.double()).reshape(-1) ** 2 / W
        # per-pair std of the sum: sqrt(draws · E[w² 1{pair}]), bounded via the empirical second moment
        sq = torch.zeros(42, dtype=torch.float64).index_add_(0, j * 7 + i, w * w)
        zd = (est - target) / sq.sqrt().clamp(min=1e-12)
        assert zd.abs().max() < 5, zd.abs().max()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seeded_and_deterministic(sampler):
    Z, X, ex = data()
    run = lambda s: top_pairs(Z, X, 100, ex, torch.Generator().manual_seed(s), f"sample-{sampler}")
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "8", True])
def test_bad_candidates_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="candidates must be a number > 0"):
        SearchGrow(backend="sample-wedge", candidates=bad)
    with pytest.raises(ValueError, match="candidates must be a number > 0"):
        S.WedgeSampledIndex(candidates=bad)


def test_bad_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="quality_target must be in"):
        SearchGrow(backend="auto", quality_target=1.5)
    with pytest.raises(ValueError, match="power must be 1 or 2"):
        S.NormSampledIndex(power=3)
    Z, X, ex = data()
    with pytest.raises(ValueError, match="sampled backends support metrics ip, abs_ip"):
        top_pairs(Z, X, 10, ex, torch.Generator(), "sample-norm", metric="l2")
    with pytest.raises(ValueError, match="unknown auto sampler"):
        top_pairs(Z, X, 10, ex, torch.Generator(), "auto", backend_options={"sampler": "x"})


@pytest.mark.parametrize("backend, options, match", [
    ("auto", {"rank": 8}, "'auto'.*rank.*allowed: quality_target, sampler, expected, seed"),
    ("lowrank", {"nprobe": 8}, "'lowrank'.*nprobe.*allowed: rank, candidates, seed"),
    ("sample-wedge", {"rank": 8}, "'sample-wedge'.*rank"),
    ("lsh", {"rank": 8}, "'lsh'.*rank"),
    ("exact", {"rank": 8}, r"'exact' does not take option\(s\) \['rank'\]; allowed: block_bytes"),
])
def test_unknown_backend_options_are_refused_at_construction(backend, options, match):
    """A knob the backend does not take is an error when the criterion is built, not a
    TypeError at the first topology update (or, worse, silently ignored)."""
    with pytest.raises(ValueError, match=match):
        SearchGrow(backend=backend, backend_options=options)


@pytest.mark.parametrize("backend", ["auto", "exact", "lsh"])
def test_candidates_for_a_backend_that_does_not_draw_pairs_is_refused(backend):
    with pytest.raises(ValueError, match=f"candidates applies to .*sample-wedge.*not '{backend}'"):
        SearchGrow(backend=backend, candidates=8)
    SearchGrow(backend="lowrank", candidates=8)  # draws pairs: taken


def test_auto_chooses_by_cost_and_records_why():
    assert choose(300, 784, 128, 7000, 0.8, "wedge")[0] == "exact"  # tiny: exact is cheap
    # with the measured table no candidates count reaches 0.8 at 65536²: exact, saying why
    backend, c, reason = choose(65536, 65536, 128, 1_290_000, 0.8, "wedge")
    assert backend == "exact" and "no candidates count" in reason
    backend, c, reason = choose(65536, 65536, 128, 1_290_000, 0.5, "wedge")
    assert backend == "sample-wedge" and c == 16 and "expected quality" in reason
    # a measured quality below the target on this layer moves to more candidates or exact
    worse = {k: 0.1 for k in (4, 8, 16, 32, 64)}
    assert choose(65536, 65536, 128, 1_290_000, 0.8, "wedge", worse)[0] == "exact"


def test_search_grow_records_stats(monkeypatch):
    from types import SimpleNamespace
    from sparsegrow.grow import GrowContext
    Z, X, ex = data(N=300, M=200, R=16)
    crit = SearchGrow(backend="sample-wedge", candidates=8)
    param = SimpleNamespace(fqn="fc.weight", shape=(300, 200), numel=60000)
    ctx = GrowContext(param=param, excluded=ex, step=0, signal=SimpleNamespace(Z=Z, X=X))
    idx = crit.select(ctx, 500, torch.Generator().manual_seed(0))
    assert idx.numel() == 500
    st = ctx.stats
    for key in ("grow_time_s", "search_scored", "quality", "recall", "quality_random"):
        assert key in st, key
    assert st["quality"] > st["quality_random"]


@pytest.mark.parametrize("backend", ["auto", "lowrank", "sample-norm", "sample-wedge",
                                     "sample-diamond"])
def test_search_growth_on_a_meta_built_million_wide_model_allocates_no_n_by_m(backend):
    """The whole path (a model built on the meta device, truly sparse storage, the signal
    captured in training, the search, the measurement, the update) on two 2^20-wide layers
    (4 TiB each as dense float32): no tensor beyond the search's 64 MiB score block or
    O(R · width); the grown count is exact and the layers stay valid."""
    from test_sparse_linear import MaxNumel
    import sparsegrow as sg
    from torch import nn
    W, nnz, B = 1 << 20, 1 << 17, 4
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(W, W, bias=False), nn.ReLU(), nn.Linear(W, W, bias=False))
    sp = sg.Sparsifier(model, nnz / W ** 2, method="search", storage="sparse",
                       distribution="uniform", sparse_init=True, seed=0,
                       schedule=sg.UpdateSchedule(every=1, end=10, fraction=0.3),
                       grow_kwargs={"backend": backend, "measure": "sampled", "seed": 0})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach(opt)
    before = [p.active() for p in sp.params]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, W, generator=g)
    with MaxNumel() as mode:
        model(x).square().sum().backward()
        opt.step()
        stats = sp.step()
    bound = max(64 << 20, 8 * 4 * B * W)
    assert mode.max_bytes <= bound, f"{mode.max_op} made a tensor of {mode.max_bytes} bytes"
    assert stats and set(stats["layers"]) == {"0.weight", "2.weight"}
    for p, a0 in zip(sp.params, before):
        a = p.active()
        assert a.numel() == a0.numel() and a.unique().numel() == a.numel()
        layer = stats["layers"][p.fqn]
        assert layer["grown"] == layer["dropped"] > 0
        # a subset of 256 rows may hold none of the grown pairs: then no estimate, never 0
        assert layer["quality"] is None or 0.0 < layer["quality"] <= 1.0 + 1e-6
        assert (~torch.isin(a, a0)).sum() > 0  # something new was grown
