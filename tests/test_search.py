"""Search grow: exact search equals RigL's dense-gradient top-K; signals; sketch; the criterion."""
import math

import pytest
import torch
from torch import nn

import sparsegrow.search_grow  # noqa: F401  (registers grow "search" and method "search")
from sparsegrow.grow import GROW, GrowContext
from sparsegrow.schedules import UpdateSchedule
from sparsegrow.search import exact_top_pairs, top_pairs
from sparsegrow.search.base import TopPool
from sparsegrow.selection import select_top
from sparsegrow.signals import LayerSignal, sketch_rows
from sparsegrow.topology import isin_sorted, sample_inactive
from sparsegrow.updater import Sparsifier


def random_excluded(numel, share, seed):
    return sample_inactive(numel, torch.empty(0, dtype=torch.long), int(share * numel),
                           torch.Generator().manual_seed(seed))


def dense_top(scores, excluded, n, seed):
    s = scores.reshape(-1).clone().float()
    s[excluded] = -math.inf
    return select_top(s, n, torch.Generator().manual_seed(seed))


def captured(layer, x, seed=0):
    """Forward/backward through `layer` with a LayerSignal armed: (Z, X, dense weight grad)."""
    sig = LayerSignal(layer, layer.weight.shape, "w")
    sig.arm(True)
    y = layer(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    Z, X = sig.rows()
    sig.remove()
    return Z, X, layer.weight.grad.reshape(layer.weight.shape[0], -1)


@pytest.mark.parametrize("metric", ["abs_ip", "ip", "l2"])
@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("skew", [False, True])
def test_exact_equals_dense_top_k(metric, prune, skew):
    g = torch.Generator().manual_seed(3)
    Z, X = torch.randn(24, 60, generator=g), torch.randn(24, 90, generator=g)
    if skew:  # a few rows hold most of the mass: bound pruning skips work
        Z[:, :3] *= 30
    S = Z.t() @ X
    scores = {"abs_ip": S.abs(), "ip": S, "l2": -torch.cdist(Z.t(), X.t()).pow(2)}[metric]
    excluded = random_excluded(S.numel(), 0.2, 1)
    for n in (1, 37, 500):
        # block_bytes small: many row blocks, the running threshold and pool pruning are exercised
        idx, val, info = exact_top_pairs(Z, X, n, excluded, torch.Generator().manual_seed(5),
                                         metric, block_bytes=4 * 90 * 7, prune=prune)
        assert torch.equal(idx, dense_top(scores, excluded, n, 5))
        assert torch.allclose(val, scores.reshape(-1)[idx], rtol=1e-4, atol=1e-3)
    if skew and prune and metric != "l2":
        idx, _, info = exact_top_pairs(Z, X, 20, excluded, torch.Generator(), metric,
                                       block_bytes=4 * 90 * 7)
        assert info["pairs_computed"] < 0.5  # the bound skipped most of S


def test_seeded_threshold_holds_on_heavy_tailed_norms():
    """The seeded threshold lets ≥ n pairs through in one pass when a few rows and columns hold
    the top pairs (log-normal norms, rank 4, as lowrank searches): its sample is spread over the
    norm order. A plain random sample of rows and columns fell short (a second pass, from the
    floor) on 5 of these 20 signals."""
    from sparsegrow.search.exact import search_pool

    n, N = 5000, 4096
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        Z, X = (torch.randn(4, N, generator=g) * torch.exp(1.5 * torch.randn(N, generator=g))
                for _ in range(2))
        pool, info = search_pool(Z, X, n, torch.empty(0, dtype=torch.long), "abs_ip")
        assert info["passes"] == 1 and pool.size >= n, (seed, info)


@pytest.mark.parametrize("seed", range(4))
def test_few_pairs_grown_start_from_the_heavy_corner_in_one_pass(seed):
    """Growing so few pairs that no sample estimates a threshold (late updates at 10⁶² grow ~10⁴
    of 10¹²) once started from the floor and checked every active pair. The start is now the n-th
    best inactive |S| of the heaviest rows and columns: never above the true n-th best (one pass),
    far above the floor, with the active pairs that crowd the top of S excluded from it (had
    they counted, the start would exceed the true n-th best and the pass fall short)."""
    from sparsegrow.search.exact import _seed_thresholds, score_floor, search_pool
    from sparsegrow.search.lowrank import active_bound

    n, N = 30, 4096
    g = torch.Generator().manual_seed(seed)
    Z, X = (torch.randn(4, N, generator=g) * torch.exp(1.5 * torch.randn(N, generator=g))
            for _ in range(2))
    S = (Z.t() @ X).abs().reshape(-1)
    crowd = torch.topk(S, 3000).indices  # the top of S is active, as training leaves it
    excluded = torch.cat([crowd, random_excluded(S.numel(), 0.01, seed)]).unique()  # sorted
    free = S.clone()
    free[excluded] = -math.inf
    true_nth = float(torch.topk(free, n).values.min())

    floor = score_floor("abs_ip")
    starts = _seed_thresholds(Z, X, Z.norm(dim=0), X.norm(dim=0), n, excluded, "abs_ip", floor)
    assert len(starts) == 2 and starts[-1] == floor
    assert 0.5 * true_nth < starts[0] <= true_nth  # near, never above
    bound = active_bound(Z, X, excluded, "abs_ip")
    pool, info = search_pool(Z, X, n, excluded, "abs_ip", excluded_bound=bound)
    assert info["passes"] == 1 and info["excluded_checked"] < 0.5, info
    idx, _, _ = exact_top_pairs(Z, X, n, excluded, torch.Generator().manual_seed(1))
    assert torch.equal(idx, dense_top(S.reshape(N, N), excluded, n, 1))


def test_pass_that_falls_short_restarts_from_the_second_estimate(monkeypatch):
    """A first threshold aimed too high (5x fewer survivors than needed): the second pass starts
    from the estimate aimed at _RETRY * n, not from the floor (which computes 0.26 of the pairs
    here, against 0.11), and the result is still the exact top n."""
    from sparsegrow.search import exact

    monkeypatch.setattr(exact, "_MARGIN", 0.2)
    n, N = 5000, 4096
    g = torch.Generator().manual_seed(0)
    Z, X = (torch.randn(4, N, generator=g) * torch.exp(1.5 * torch.randn(N, generator=g))
            for _ in range(2))
    idx, _, info = exact_top_pairs(Z, X, n, torch.empty(0, dtype=torch.long),
                                   torch.Generator().manual_seed(1))
    assert info["passes"] == 2 and info["pairs_computed"] < 0.15, info
    S = (Z.t() @ X).abs()
    assert torch.equal(idx, dense_top(S, torch.empty(0, dtype=torch.long), n, 1))


def test_exact_search_matches_rigl_linear():
    torch.manual_seed(0)
    layer = nn.Linear(70, 50)
    Z, X, grad = captured(layer, torch.randn(16, 70))
    excluded = random_excluded(grad.numel(), 0.1, 2)
    idx, _, _ = exact_top_pairs(Z, X, 300, excluded, torch.Generator().manual_seed(9))
    assert torch.equal(idx, dense_top(grad.abs(), excluded, 300, 9))


@pytest.mark.parametrize("kw", [dict(padding=1, stride=1), dict(padding=0, stride=2, dilation=2),
                                dict(padding="same")])
def test_exact_search_matches_rigl_conv2d(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, **kw)
    Z, X, grad = captured(conv, torch.randn(4, 3, 9, 9))
    assert Z.shape[1] == 8 and X.shape[1] == 27 and torch.allclose(Z.t() @ X, grad, atol=1e-4)
    excluded = random_excluded(grad.numel(), 0.2, 2)
    idx, _, _ = exact_top_pairs(Z, X, 40, excluded, torch.Generator().manual_seed(9))
    assert torch.equal(idx, dense_top(grad.abs(), excluded, 40, 9))


def test_dead_units_are_filled_with_random_zero_score_pairs():
    Z, X = torch.randn(8, 20), torch.randn(8, 30)
    Z[:, 5:] = 0  # 15 dead output units: only 5 * 30 = 150 pairs have |G| > 0
    excluded = random_excluded(600, 0.1, 0)
    idx, _, info = exact_top_pairs(Z, X, 200, excluded, torch.Generator().manual_seed(0))
    positive = torch.nonzero((Z.t() @ X).abs().reshape(-1) > 0).squeeze(1)
    positive = positive[~isin_sorted(positive, excluded)]
    assert idx.unique().numel() == 200 and not isin_sorted(idx, excluded).any()
    assert isin_sorted(positive, idx).all() and info["zero_filled"] == 200 - positive.numel()


def test_pool_keeps_ties_and_excludes():
    pool = TopPool(2, torch.tensor([1]), 10, capacity=1)
    pool.add(torch.arange(6), torch.tensor([5.0, 9.0, 5.0, 1.0, 5.0, 0.0]))
    idx, val = pool.select(2, torch.Generator().manual_seed(0))
    assert idx.tolist() == dense_top(torch.tensor([5.0, 9, 5, 1, 5, 0]), torch.tensor([1]), 2, 0).tolist()
    assert 1 not in idx.tolist() and (val == 5).all()


def test_sketch_is_unbiased():
    """E[S_zᵀ S_x] = Σ_t Z_tᵀ X_t for the random-sign sketch accumulated over two steps."""
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(12, 4, generator=g), torch.randn(12, 5, generator=g)) for _ in range(2)]
    G = sum(Z.t() @ X for Z, X in steps)
    trials = 4000
    est = torch.empty(trials, 4, 5)
    gen = torch.Generator().manual_seed(1)
    for t in range(trials):
        out = None
        for Z, X in steps:
            out = sketch_rows(Z, X, 3, gen, out)
        est[t] = out[0].t() @ out[1]
    z = (est.mean(0) - G) / (est.std(0) / math.sqrt(trials))
    assert z.abs().max() < 4.0  # 20 entries, fixed seed: no systematic error
    assert (est.std(0) > 0.1).all()  # it is an estimate, not the exact product


def test_signal_accumulates_every_armed_step():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    sig = LayerSignal(layer, layer.weight.shape, "w", accumulate=True)
    for _ in range(3):  # .grad is not zeroed: it holds Σ_t G_t
        sig.arm(True)
        layer(torch.randn(5, 6)).pow(2).sum().backward()
    sig.arm(False)  # accumulation survives the disarm until rows() is read
    with torch.no_grad():
        layer(torch.randn(5, 6))  # not captured: no gradient
    Z, X = sig.rows()
    assert Z.shape == (15, 4) and sig.last_steps == 3
    assert torch.allclose(Z.t() @ X, layer.weight.grad, atol=1e-5)
    assert not sig.has_rows()


def test_signal_not_captured_when_disarmed():
    layer = nn.Linear(6, 4)
    sig = LayerSignal(layer, layer.weight.shape, "w")
    layer(torch.randn(5, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="no layer input"):
        sig.rows()


def test_sketched_signal_reduces_rows_and_keeps_expectation():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    sig = LayerSignal(conv, conv.weight.shape, "c", sketch_dim=16)
    sig.arm(True)
    conv(torch.randn(2, 2, 8, 8)).sum().backward()
    Z, X = sig.rows()
    assert Z.shape == (16, 3) and X.shape == (16, 18)


@pytest.mark.parametrize("kwargs, match", [
    ({"k_similar": 0.0}, r"k_similar must be in \(0, 1\].*0.0"),
    ({"k_similar": 1.5}, r"k_similar must be in \(0, 1\].*1.5"),
    ({"backend": "annoy"}, r"unknown search backend 'annoy'; allowed: exact"),
    ({"metric": "cosine"}, r"unknown search metric 'cosine'; allowed: ip, abs_ip, l2"),
    ({"bits": 0}, r"bits must be in \(0, 64\]"),
    ({"sketch_dim": -1}, r"sketch_dim must be an integer >= 0"),
    ({"accumulate": "yes"}, r"accumulate must be True or False"),
    ({"measure": "always"}, r"unknown measure 'always'"),
])
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GROW.get("search")(**kwargs)


def test_missing_optional_package_names_the_extra(monkeypatch):
    import sparsegrow.search.base as base
    real = base.importlib.import_module

    def fake(name, *a):
        if name in ("faiss", "hnswlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)

    monkeypatch.setattr(base.importlib, "import_module", fake)
    for backend in ("faiss-hnsw", "hnswlib"):
        with pytest.raises(ImportError, match=r"pip install sparsegrow\[search\]"):
            GROW.get("search")(backend=backend)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(inplace=True), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 5))


def train(method, steps=12, grow_kwargs=None, seed=0):
    model = mlp(seed)
    sp = Sparsifier(model, 0.2, method=method, distribution="uniform", seed=seed,
                    schedule=UpdateSchedule(every=3, end=steps, fraction=0.3),
                    grow_kwargs=grow_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x, y = torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
        before = {k: v.clone() for k, v in sp.masks().items()}
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = sp.step()
        if stats:
            history.append((before, sp.masks(), stats))
    return sp, history


def test_search_method_equals_rigl_and_keeps_density():
    sp_s, hist_s = train("search")
    sp_r, hist_r = train("rigl")
    assert len(hist_s) == 3
    for (before, after, stats), (_, after_r, _) in zip(hist_s, hist_r):
        for fqn in after:
            assert after[fqn].numel() == before[fqn].numel()  # exact density
            assert torch.equal(after[fqn], after_r[fqn])  # the same choice as RigL
        assert stats["grown"] > 0
    layer_stats = hist_s[-1][2]["layers"]
    assert set(layer_stats) == set(sp_s.masks())
    assert all(s["recall"] == 1.0 and s["grow_time_s"] > 0 for s in layer_stats.values())


@pytest.mark.parametrize("grow_kwargs", [
    {"backend": "lsh", "bits": 2.0, "k_similar": 0.2},
    {"backend": "exact", "sketch_dim": 8},
    {"backend": "exact", "metric": "l2"},
])
def test_search_variants_never_grow_active_connections(grow_kwargs):
    sp, hist = train("search", grow_kwargs=grow_kwargs)
    for before, after, stats in hist:
        for fqn in after:
            assert after[fqn].numel() == before[fqn].numel()
    for s in hist[-1][2]["layers"].values():
        assert 0.0 <= s["recall"] <= 1.0 and 0.0 <= s["quality"] <= 1.0 + 1e-6


def test_criterion_select_excludes_and_reports():
    layer = nn.Linear(40, 30)
    crit = GROW.get("search")(backend="lsh", k_similar=0.5, measure="sampled")
    from sparsegrow.signals import GrowSignals
    from sparsegrow.topology import MaskedParam
    p = MaskedParam("w", layer, "weight", random_excluded(1200, 0.3, 0))
    signals = GrowSignals(crit.needs_signal, [p])
    signals.arm(True)
    layer(torch.randn(8, 40)).sum().backward()
    ctx = GrowContext(p, p.active(), 1, signals.collect()["w"])
    idx = crit.select(ctx, 100, torch.Generator())
    assert idx.numel() == 100 and not isin_sorted(idx, p.active()).any()
    assert torch.equal(idx, torch.sort(idx).values)
    assert ctx.stats["recall_sampled"] is False  # 30 rows <= 256: measured exactly


def test_top_pairs_global_threshold_beats_per_query_on_skewed_rows():
    g = torch.Generator().manual_seed(0)
    Z, X = torch.randn(32, 200, generator=g), torch.randn(32, 300, generator=g)
    Z[:, :4] *= 30  # 2% of the rows hold most of the mass
    excluded = random_excluded(60000, 0.1, 1)
    ref, _, _ = exact_top_pairs(Z, X, 600, excluded, torch.Generator())
    recall = {}
    for gt in (False, True):
        idx, _, _ = top_pairs(Z, X, 600, excluded, torch.Generator(), "lsh", k_similar=0.1,
                              global_threshold=gt)
        recall[gt] = float(isin_sorted(idx, ref).float().mean())
    assert recall[False] < 0.5 < 0.9 < recall[True]
