"""Transparent huge pages for torch's CPU allocations: a truly sparse step with and without.

    .venv/bin/python benchmarks/bench_huge_pages.py                      # one 10⁶² layer, 40 M connections
    .venv/bin/python benchmarks/bench_huge_pages.py --model configs/scale_1m.yaml --rounds 2 --steps 3

The truly sparse kernels gather one random row of B numbers per connection from a (width, B)
activation array (512 MB at width 10⁶, B = 128): with 4 KiB pages nearly every gather is a TLB
miss, and on a virtual machine a miss walks two page tables. torch's CPU allocator asks the kernel
for transparent huge pages (2 MiB, madvise) on allocations of 2 MiB or more when the environment
variable THP_MEM_ALLOC_ENABLE=1 is set before its first allocation; `sparsegrow` (the CLI) sets
it unless it is already set. Where the kernel's THP mode is `never` the variable does nothing.

Each measurement is a fresh process (the variable is read once per process), alternating off / on
and swapping the order every round so that the machine's drift hits both alike; each process
times --steps steps after one warm-up step. Default: forward + backward of one SparseLinear
(--width², --nnz uniform connections, batch --batch). --model CONFIG [overrides]: a whole
training step (forward, backward, optimizer step) of the model `sparsegrow train` builds from the
config, on real training batches. Prints the median step time of each, the ratio off / on, and
each process's peak RSS and the most bytes it held in huge pages mid-step (after a forward).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


_HUGE_MAX = [0.0]  # the most bytes in huge pages seen after a forward (GiB)


def _note_huge() -> None:
    """Read this process's anonymous huge-page bytes now (mid-step, temporaries alive)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    _HUGE_MAX[0] = max(_HUGE_MAX[0], int(line.split()[1]) / 2**20)
    except OSError:
        _HUGE_MAX[0] = float("nan")


def _proc_memory() -> dict:
    """Peak RSS and the most bytes in anonymous huge pages seen mid-step, GiB."""
    return {"huge_gib": _HUGE_MAX[0],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB


def _child_layer(args) -> list[float]:
    import torch

    from sparsegrow.layers.sparse_linear import SparseLinear
    from sparsegrow.topology import sample_inactive

    n, gen = args.width, torch.Generator().manual_seed(0)
    flat = sample_inactive(n * n, torch.empty(0, dtype=torch.long), args.nnz, gen)  # uniform
    layer = SparseLinear(n, n, flat, bias=False)
    del flat
    x = torch.randn(args.batch, n, generator=gen).requires_grad_()
    dy = torch.randn(args.batch, n, generator=gen)
    times = []
    for _ in range(args.steps + 1):
        x.grad, layer.values.grad = None, None
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        _note_huge()  # not timed
        t2 = time.perf_counter()
        y.backward(dy)
        times.append(time.perf_counter() - t2 + t1 - t0)
        del y
    return times[1:]


def _child_model(args) -> list[float]:
    import torch
    import torch.nn.functional as F

    from sparsegrow.experiments.build import build_optimizer
    from sparsegrow.experiments.config import load_config
    from sparsegrow.experiments.data import load_dataset, steps_per_epoch
    from sparsegrow.experiments.loop import build_model_and_sparsifier

    config, overrides = args.model[0], args.model[1:]
    # the schedule must fire within the few steps built for (no update is run here)
    cfg = load_config(config, ["sparsity.update_every=1", *overrides])
    torch.manual_seed(cfg.seed)
    bs = cfg.train.batch_size
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=bs * (args.steps + 1), seed=cfg.seed, test_subset=100)
    model, sparsifier = build_model_and_sparsifier(
        cfg, data, steps_per_epoch(len(data.train_y), bs), torch.device("cpu"))
    optimizer = build_optimizer(cfg, model, sparsifier)
    times = []
    for s in range(args.steps + 1):
        x, y = data.train_x[s * bs:(s + 1) * bs], data.train_y[s * bs:(s + 1) * bs]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        _note_huge()  # not timed
        t2 = time.perf_counter()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t2 + t1 - t0)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1_000_000)
    ap.add_argument("--nnz", type=int, default=40_000_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", nargs="+", metavar="CONFIG [OVERRIDE]", default=None,
                    help="time a whole training step of this config's model instead")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["0", "1"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        times = _child_model(args) if args.model else _child_layer(args)
        print(json.dumps({"times": times, **_proc_memory()}))
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        mode = "unknown (no /sys/kernel/mm/transparent_hugepage)"
    print(f"kernel THP mode: {mode}", flush=True)
    results: dict[str, list[dict]] = {"0": [], "1": []}
    for rnd in range(args.rounds):
        for setting in (("0", "1") if rnd % 2 == 0 else ("1", "0")):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", setting],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"child (THP_MEM_ALLOC_ENABLE={setting}) failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[setting].append(res)
            print(f"round {rnd} THP_MEM_ALLOC_ENABLE={setting}: steps "
                  f"{' '.join(f'{t:.2f}' for t in res['times'])} s, peak RSS "
                  f"{res['peak_rss_gib']:.2f} GiB, in huge pages mid-step {res['huge_gib']:.2f} GiB", flush=True)
    what = (f"{' '.join(args.model)}: training step" if args.model
            else f"{args.width}² layer, {args.nnz} connections, B={args.batch}: forward + backward")
    print(f"\n{what}, {args.threads} thread(s), median of {args.rounds} processes × {args.steps} "
          f"steps per setting (alternating):\n")
    print("| THP_MEM_ALLOC_ENABLE | step s (median) | peak RSS GiB (max) |\n|---|---|---|")
    med = {}
    for setting, label in (("0", "0 (4 KiB pages)"), ("1", "1 (huge pages)")):
        med[setting] = statistics.median(t for r in results[setting] for t in r["times"])
        rss = max(r["peak_rss_gib"] for r in results[setting])
        print(f"| {label} | {med[setting]:.3f} | {rss:.2f} |")
    print(f"\noff / on: {med['0'] / med['1']:.2f}×")


if __name__ == "__main__":
    main()
