"""What the per-update reduction of the growth signal costs across ranks (torch.distributed, gloo).

    python benchmarks/bench_dist_signal.py --width 16384 --density 0.01 --batch 128 --repeats 5

On `--nproc` gloo processes on this machine, one truly sparse width×width layer (SparseLinear,
built on the meta device: no dense weight) captures one update step's signal from a local batch
of `--batch` rows, and `GrowSignals.collect()` reduces it: raw (dZ, X) rows are all-gathered
(exact: the global batch's rows), random-sign sketches of s rows are all-reduced (summed). The
topology agreement check (one all-reduce of a hash per layer) is timed too. The baseline is the
same collect() in one process (no communication) and the layer's forward + backward on the update
step, measured in the same run; `--dense` adds RigL's dense-gradient all-reduce on a masked layer of
the same shape (width² floats per rank). Prints a markdown table: bytes sent per rank, seconds
(medians), and the reduction's time over the layer's forward + backward.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsegrow as sg


def build(width, density, storage, grow, grow_kwargs, distributed):
    with torch.device("meta" if storage == "sparse" else "cpu"):
        model = nn.Sequential(nn.Linear(width, width, bias=False))
    return model, sg.Sparsifier(model, density, method=grow, storage=storage,
                                distribution="uniform", grow_kwargs=grow_kwargs,
                                schedule=sg.UpdateSchedule(every=1, end=10 ** 6),
                                distributed=distributed)


def measure(args, variant, distributed):
    storage, grow, kw = {**VARIANTS, **DENSE}[variant]
    model, sp = build(args.width, args.density, storage, grow, kw, distributed)
    rank = dist.get_rank() if distributed else 0
    g = torch.Generator().manual_seed(rank)
    times, comm, steps = [], [], []
    for _ in range(args.repeats):
        sp.signals.arm(True)
        x = torch.randn(args.batch, args.width, generator=g)
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        steps.append(time.perf_counter() - t0)
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        sp.signals.collect()
        times.append(time.perf_counter() - t0)
        comm.append(sp.signals.last_comm["bytes"])
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        sp.dist.check_topology(sp.updated, "bench")
    check = (time.perf_counter() - t0) / args.repeats
    return {"collect_s": statistics.median(times), "bytes": comm[-1], "check_s": check,
            "step_s": statistics.median(steps)}


VARIANTS = {
    "rows (all-gather)": ("sparse", "search", {"backend": "exact", "measure": "off"}),
    "sketch s=64 (all-reduce)": ("sparse", "search",
                                 {"backend": "exact", "measure": "off", "sketch_dim": 64}),
    "sketch s=16 (all-reduce)": ("sparse", "search",
                                 {"backend": "exact", "measure": "off", "sketch_dim": 16}),
}
DENSE = {"dense gradient, masked (all-reduce)": ("masked", "rigl", None)}


def _worker(rank, world, init, args, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    res = {v: measure(args, v, True) for v in args.variants}
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=128, help="rows per rank")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense", action="store_true", help="also RigL's dense-gradient all-reduce")
    args = p.parse_args(argv)
    args.variants = list(VARIANTS) + (list(DENSE) if args.dense else [])
    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_worker, args=(args.nproc, f"tcp://127.0.0.1:{port}", args, out),
                 nprocs=args.nproc, join=True)
        multi = torch.load(out)
    single = {v: measure(args, v, False) for v in args.variants}
    print(f"width {args.width}, density {args.density}, {args.batch} rows per rank, "
          f"{args.nproc} gloo processes x {args.threads} thread(s), torch {torch.__version__}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print(f"| signal | bytes sent per rank | collect, {args.nproc} ranks | collect, 1 process | "
          "layer fwd+bwd (rank 0) | collect / fwd+bwd | topology check |")
    print("|---|---|---|---|---|---|---|")
    for v in args.variants:
        m, s = multi[v], single[v]
        print(f"| {v} | {m['bytes'] / 2**20:.1f} MiB | {m['collect_s'] * 1e3:.1f} ms | "
              f"{s['collect_s'] * 1e3:.1f} ms | {m['step_s'] * 1e3:.1f} ms | "
              f"{m['collect_s'] / m['step_s']:.2f} | {m['check_s'] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
