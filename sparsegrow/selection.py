"""Top-k selection with ties broken by a seeded generator.

Magnitude drop and gradient grow both pick the k largest scores. Plain `torch.topk` leaves ties
to the kernel (and many scores tie: freshly grown weights are all zero, dead units give zero
gradients), so the k-th value's ties are chosen here uniformly at random with the caller's
generator: the same seed gives the same selection on any device.

A NaN or +inf score would make the selection short (NaN compares false with everything), so a
layer would drop and grow different counts and its density would drift: such scores raise
`NonFiniteScores`, and the Sparsifier skips that layer's update. -inf stays the marker of an
ineligible entry.
"""
from __future__ import annotations

import torch


class NonFiniteScores(ValueError):
    """A drop or grow score is NaN or infinite (diverged weights or gradients)."""


def require_finite(t: torch.Tensor, what: str) -> None:
    """Raise NonFiniteScores naming `what` unless every entry of `t` is finite."""
    # One sum first (a NaN or inf entry makes it non-finite; finite entries rarely overflow it):
    # the elementwise check, 5x dearer on a 128 x 65,536 signal, only when it is not finite.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteScores(f"{what}: {n_nan} NaN and {n_inf} infinite of {t.numel()} values")


def randperm(n: int, generator: torch.Generator, device) -> torch.Tensor:
    # Random numbers always come from the (CPU) generator so CPU and CUDA runs agree.
    return torch.randperm(n, generator=generator).to(device)


def select_top(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of the k largest entries of the 1-D `scores`, sorted ascending.

    Entries equal to the k-th largest value are sampled uniformly with `generator`.
    Entries of -inf are never selected; asking for more than the finite count is an error.
    A NaN or +inf entry raises NonFiniteScores.
    """
    n = scores.numel()
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if scores.dtype != torch.bool:
        bad = torch.isnan(scores) | (scores == float("inf"))
        if bool(bad.any()):
            raise NonFiniteScores(f"{int(bad.sum())} of {n} scores are NaN or +inf")
    finite = n if scores.dtype == torch.bool else int(torch.isfinite(scores).sum())
    if k > finite:
        raise ValueError(f"cannot select {k} entries: only {finite} are eligible")
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > kth).squeeze(1)
    tied = torch.nonzero(scores == kth).squeeze(1)
    need = k - above.numel()
    pick = tied[randperm(tied.numel(), generator, tied.device)[:need]]
    if need == tied.numel():  # every tie taken: the positions >= kth, already in order
        return torch.nonzero(scores >= kth).squeeze(1)
    return torch.sort(torch.cat([above, pick])).values


def select_top_rows(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Positions (rows, k) of the k largest entries in each row of `scores` (rows, m), each row
    sorted ascending; ties broken uniformly at random with `generator` (constant fan-in).

    -inf entries are never selected (a row with fewer than k finite entries is an error); a NaN
    or +inf entry raises NonFiniteScores.
    """
    rows, m = scores.shape
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.long, device=scores.device)
    bad = torch.isnan(scores) | (scores == float("inf"))
    if bool(bad.any()):
        raise NonFiniteScores(f"{int(bad.sum())} of {scores.numel()} scores are NaN or +inf")
    if bool((torch.isfinite(scores).sum(1) < k).any()):
        raise ValueError(f"cannot select {k} entries per row: a row has fewer eligible")
    # shuffle each row, then a stable sort by score: equal scores keep their random order
    shuffle = torch.rand(rows, m, generator=generator).argsort(1).to(scores.device)  # (rows, m)
    order = torch.sort(scores.gather(1, shuffle), dim=1, descending=True, stable=True).indices
    return torch.sort(shuffle.gather(1, order[:, :k]), dim=1).values
