"""Training step of a truly sparse MLP: torch.compile vs eager, through topology updates.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compile.py                    # defaults below
    PYTHONPATH=. .venv/bin/python benchmarks/bench_compile.py --width 4096 --density 0.01

The model is in -> width -> width -> out with ReLU, every Linear stored sparse (storage="sparse",
SET updates every --every steps). Eager and compiled copies start from the same seed, see the same
batches and make the same updates, and take their steps alternately (so machine load hits both
alike); each step is forward, backward, SGD step and `sparsifier.step()` (the update, on update
steps; the update itself runs eagerly in both). It reports the median step time of each (update
steps and plain steps separately), the ratio eager / compiled measured in this run, the one-off
compile time (first step; less when inductor's cache holds the graph from an earlier run), the
number of graphs dynamo compiled (1 = one graph, no recompiles) and the largest difference between
the two models' losses.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsegrow


def build(args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.inp, args.width), nn.ReLU(),
                          nn.Linear(args.width, args.width), nn.ReLU(),
                          nn.Linear(args.width, args.out))
    sp = sparsegrow.Sparsifier(model, density=args.density, method="set", storage="sparse", seed=0,
                               schedule=sparsegrow.UpdateSchedule(every=args.every,
                                                                  end=args.steps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp.attach(optimizer)
    return model, sp, optimizer


def run(args) -> dict:
    """Eager and compiled models stepped alternately, so machine load hits both alike."""
    from torch._dynamo.utils import counters

    runs = {}
    for mode in ("eager", "compiled"):
        model, sp, optimizer = build(args)
        fwd = (torch.compile(model, fullgraph=True, backend=args.backend) if mode == "compiled"
               else model)
        runs[mode] = dict(fwd=fwd, sp=sp, optimizer=optimizer, plain=[], update=[], losses=[])
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.inp, generator=gen)
        y = torch.randint(0, args.out, (args.batch,), generator=gen)
        for mode in (("eager", "compiled") if step % 2 else ("compiled", "eager")):
            r = runs[mode]
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(r["fwd"](x), y)
            r["optimizer"].zero_grad()
            loss.backward()
            r["optimizer"].step()
            updated = r["sp"].step() is not None
            dt = time.perf_counter() - t0
            r["losses"].append(loss.item())
            if step == 0:
                r["first"] = dt  # includes compilation when compiled
            elif step > 1:  # step 1: the compiled graph's first backward is warm-up too
                r["update" if updated else "plain"].append(dt)
    for r in runs.values():
        r["plain"], r["update"] = statistics.median(r["plain"]), statistics.median(r["update"])
    runs["compiled"]["graphs"] = counters["stats"]["unique_graphs"]
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inp", type=int, default=784)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--out", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sparsegrow.layers import kernels
    runs = run(args)
    eager, comp = runs["eager"], runs["compiled"]
    diff = max(abs(a - b) for a, b in zip(eager["losses"], comp["losses"]))
    print(f"# bench_compile: {args.inp}-{args.width}-{args.width}-{args.out} MLP, density "
          f"{args.density}, batch {args.batch}, {args.steps} steps, SET update every {args.every}, "
          f"threads {args.threads}, torch.compile backend {args.backend}, "
          f"torch {torch.__version__}, kernels {kernels.get_backend()} "
          f"(C available: {kernels._c_lib() is not None})")
    print()
    print("| | eager | compiled | eager / compiled |")
    print("|---|---|---|---|")
    for key, what in (("plain", "step (median)"), ("update", "update step (median)"),
                      ("first", "first step")):
        print(f"| {what} | {eager[key] * 1e3:.1f} ms | {comp[key] * 1e3:.1f} ms | "
              f"{eager[key] / comp[key]:.2f}x |")
    print()
    print(f"graphs compiled: {comp['graphs']}; max |loss eager - loss compiled| over the run: "
          f"{diff:.2e}")


if __name__ == "__main__":
    main()
