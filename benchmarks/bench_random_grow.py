"""Random growth (SET's rule, `topology.sample_inactive`) on a large layer: the code before
session 8 (filter the raw draws by binary search in the active set, unique, sort the picks) vs
now (sort and deduplicate the draws first, so the binary searches run on sorted queries; keep the
picks in order by a mask), interleaved A/B.

    .venv/bin/python benchmarks/bench_random_grow.py --n 1000000 --nnz 40000000 --fraction 0.3 --threads 2

The active set is nnz uniform random positions of an n × n layer (10⁶ × 10⁶ at ε = 20: 40 M);
one update grows fraction × nnz. Checks both return the same connections from the same seed
(the generator's draws are consumed alike), then prints each one's median over --repeats and
the ratio.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sparsegrow.topology import isin_sorted, sample_inactive


def before(numel: int, excluded: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """sample_inactive's rejection path as it was (session 7), the baseline."""
    n_free = numel - excluded.numel()
    cand = torch.empty(0, dtype=torch.long)
    while cand.numel() < k:
        draw = math.ceil((k - cand.numel()) * numel / n_free * 1.2) + 64
        new = torch.randint(0, numel, (draw,), generator=generator)
        new = new[~isin_sorted(new, excluded)]
        cand = torch.unique(torch.cat([cand, new]))
    pick = cand[torch.randperm(cand.numel(), generator=generator)[:k]]
    return torch.sort(pick).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nnz", type=int, default=40_000_000)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numel = args.n * args.n
    excluded = torch.unique(torch.randint(0, numel, (args.nnz,),
                                          generator=torch.Generator().manual_seed(0)))
    k = int(args.fraction * excluded.numel())
    a = before(numel, excluded, k, torch.Generator().manual_seed(1))
    b = sample_inactive(numel, excluded, k, torch.Generator().manual_seed(1))
    assert torch.equal(a, b), "the two paths grew different connections"
    del a, b
    times = {"before": [], "now": []}
    for r in range(args.repeats):
        for name, fn in (("before", before), ("now", sample_inactive))[::1 if r % 2 == 0 else -1]:
            g = torch.Generator().manual_seed(2 + r)
            t = time.perf_counter()
            fn(numel, excluded, k, g)
            times[name].append(time.perf_counter() - t)
    b_s, n_s = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"{args.n}² layer, {excluded.numel()} active, grow {k} ({args.threads} threads, "
          f"median of {args.repeats}): before {b_s:.2f} s, now {n_s:.2f} s, ratio {n_s / b_s:.2f}×")


if __name__ == "__main__":
    main()
