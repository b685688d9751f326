"""One training step of a truly sparse Linear vs masked-dense vs dense nn.Linear.

    .venv/bin/python benchmarks/bench_sparse_step.py                       # full grid (~15 min)
    .venv/bin/python benchmarks/bench_sparse_step.py --widths 4096 --densities 0.01

For each width (N = M), density and storage it measures, in a fresh subprocess (so peak memory is
its own): one training step (forward, backward with dX, optimizer step; batch B=128) as the median
of --repeats, the resident memory it needs, and the cost of one topology update (magnitude drop
+ random grow of 30% of the nnz, with optimizer-state reset/re-index; plus exact search grow when
a 'search' grow criterion is registered) as a multiple of one step. Ratios are against dense
nn.Linear measured in the same run. Dense and masked are skipped where their (N, M) weight,
gradient and optimizer state would not fit (--max-dense-gib).

Memory: `peak` is the peak resident set (VmHWM) during the timed steps minus the resident set
before the layer was built, so it covers weights, indices, gradient, optimizer state, the batch's
activations and every transient. `nnz storage` = bytes of values + all indices the sparse layer
keeps (values 4 B, col/row_t/perm 4 B each per nnz as int32, 8 B where a layer needs int64
indices, plus the row/column pointers; see bench_bytes_per_connection.py for the breakdown).

--device cuda: everything lives on the GPU and every configuration runs in this one process (a
subprocess each would pay CUDA start-up every time); times are bracketed by
torch.cuda.synchronize(); `peak` is the GPU allocator's peak during the timed steps
(torch.cuda.max_memory_allocated after reset_peak_memory_stats) minus what was allocated before
the layer was built. --threads and --live-memory do not apply. Defaults there: --max-dense-gib
0.55 of the GPU's memory (65536² with Adam, 64 GiB of weight, gradient and moments, fits an
H200), --max-nnz 5e7 (sampling a larger active set, and its random regrowth, runs on the CPU
generator and takes longer than the rest of the run). A configuration that still runs out of GPU
memory is reported and skipped.
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

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402

B = 128
FUSED = False  # --fused
SEARCH_MAX_NUMEL = 1 << 28  # exact search grow scores all N*M pairs (blocked): up to 16384^2


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def one(kind: str, width: int, density: float, optim: str, repeats: int, threads: int,
        args_search: bool = True, device: str = "cpu") -> dict:
    import sparsegrow  # noqa: F401
    try:
        import sparsegrow.search_grow  # noqa: F401  (registers grow "search")
    except ImportError:
        pass
    from sparsegrow.drop import DROP
    from sparsegrow.grow import GROW, GrowContext
    from sparsegrow.signals import GrowSignals
    from sparsegrow.layers import sparse_linear as sl
    from sparsegrow.topology import MaskedParam, sample_inactive

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(threads)
    if width > 256:  # page in the code and thread pools of these ops before the baseline
        one(kind, 256, density, optim, 1, threads, args_search=False, device=device)
    gen = torch.Generator().manual_seed(0)  # random numbers from the CPU generator on any device
    n = m = width
    x = torch.randn(B, m, generator=gen).to(dev).requires_grad_()  # dX is computed, as for a hidden layer
    dy = torch.randn(B, n, generator=gen).to(dev)
    if cuda:
        _device.free_memory(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else rss_bytes()
    nnz = round(density * n * m)
    if kind == "sparse":
        active = sample_inactive(n * m, torch.empty(0, dtype=torch.long), nnz, gen)
        layer = sl.SparseLinear(m, n, active, generator=gen, device=dev)
        view = sl.SparseLinearParam("w", layer)
        del active
    else:
        layer = nn.Linear(m, n, device=dev)
        if kind == "masked":
            active = sample_inactive(n * m, torch.empty(0, dtype=torch.long), nnz, gen)
            view = MaskedParam("w", layer, "weight", active)
            del active
    fused = {"fused": True} if FUSED else {}  # fused: no per-step temporaries of the state's size
    if optim == "adam":
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3, **fused)
    else:
        optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9, **fused)

    def step():
        optimizer.zero_grad()
        x.grad = None
        layer(x).backward(dy)
        optimizer.step()
        if kind == "masked":
            view.enforce()

    step()
    step()  # warm-up: kernels built, optimizer state allocated
    times = []
    if cuda:
        built = torch.cuda.memory_allocated(dev)
        with _device.GpuPeak(dev) as gpu_peak:  # synchronizes; base: the memory before the layer
            for _ in range(repeats):
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
        peak = gpu_peak.bytes + gpu_peak.base - base
        maxrss = None
    else:
        built = rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = rss_bytes("VmHWM") - base
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out = {"kind": kind, "width": width, "density": density, "optim": optim,
           "step_s": statistics.median(times), "step_all_s": times, "peak_bytes": peak,
           "resident_bytes": built - base, "maxrss_bytes": maxrss}
    if cuda:
        out["device"] = device
    if kind == "sparse":
        out["nnz"] = layer.nnz()
        out["nnz_storage_bytes"] = sum(t.numel() * t.element_size() for t in
                                       (layer.values, layer.crow, layer.col, layer.ccol,
                                        layer.row_t, layer.perm))
    if kind in ("sparse", "masked"):
        drop_c = DROP.get("magnitude")()
        grows = {"random": GROW.get("random")()}
        if args_search and "search" in GROW.names() and n * m <= SEARCH_MAX_NUMEL:
            # exact search grow reads X and dZ captured by hooks during an armed step
            grows["search"] = GROW.get("search")(backend="exact", measure="off")
        update_times = {}
        for name, grow in grows.items():
            signals = GrowSignals(grow.needs_signal, [view]) if grow.needs_signal else None
            ts = []
            for _ in range(3):
                if signals is not None:
                    signals.arm(True)
                    step()  # the update step's forward/backward captures the signal
                _device.sync(dev)
                t0 = time.perf_counter()
                with torch.no_grad():
                    a = view.active()
                    k = int(0.3 * a.numel())
                    pos = drop_c.select(view.values(a), k, gen)
                    keep = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
                    keep[pos] = False
                    sig = signals.collect()[view.fqn] if signals is not None else None
                    g = grow.select(GrowContext(view, a[keep], 1, sig), k, gen)
                    view.update(a[pos], g, torch.zeros(k, device=dev), optimizer)
                _device.sync(dev)
                ts.append(time.perf_counter() - t0)
                if signals is not None:
                    signals.arm(False)
            if signals is not None:
                signals.remove()
            update_times[name] = statistics.median(ts)
        out["update_s"] = update_times
    return out


def fits_dense(width: int, max_gib: float, optim: str) -> bool:
    copies = 4 if optim == "adam" else 3  # weight, grad, moments
    return width * width * 4 * copies / 2**30 <= max_gib


def fits_sparse(width: int, density: float, max_gib: float) -> bool:
    return width * width * density * 64 / 2**30 <= max_gib  # ~28 B storage + grad/moments + transients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    ap.add_argument("--optim", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--max-dense-gib", type=float, default=None,
                    help="skip dense/masked above this weight+grad+state size (default 8; on "
                         "cuda 0.55 of the GPU's memory)")
    ap.add_argument("--max-sparse-gib", type=float, default=8.0)
    ap.add_argument("--max-nnz", type=float, default=None,
                    help="skip masked/sparse with more connections (default: none; on cuda 5e7)")
    ap.add_argument("--no-search", action="store_true", help="skip exact search grow")
    ap.add_argument("--fused", action="store_true", help="fused optimizer kernels (all storages)")
    ap.add_argument("--kinds", nargs="+", default=["dense", "masked", "sparse"])
    ap.add_argument("--live-memory", action="store_true",
                    help="run with MALLOC_MMAP_THRESHOLD_=65536 so freed buffers go back to the OS "
                         "and the resident set is the live memory (timings are then slower)")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "WIDTH", "DENSITY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global FUSED
    FUSED = args.fused
    dev = _device.resolve(args.device)
    cuda = dev.type == "cuda"
    if args.max_dense_gib is None:
        args.max_dense_gib = 0.55 * _device.total_gib(dev) if cuda else 8.0
    if args.max_nnz is None:
        args.max_nnz = 5e7 if cuda else float("inf")
    if args.one:
        kind, width, density = args.one
        print(json.dumps(one(kind, int(width), float(density), args.optim, args.repeats,
                             args.threads, not args.no_search, args.device)))
        return

    def run_cuda(kind, width, density):  # in this process: CUDA starts once
        if kind not in args.kinds:
            return None
        if kind != "dense" and density * width * width > args.max_nnz:
            print(f"(skipped {kind} {width}² at density {density}: "
                  f"{density * width * width:.2g} connections > --max-nnz {args.max_nnz:g})",
                  flush=True)
            return None
        try:
            return one(kind, width, density, args.optim, args.repeats, args.threads,
                       not args.no_search, args.device)
        except torch.cuda.OutOfMemoryError as e:
            print(f"(skipped {kind} {width}² at density {density}: out of GPU memory: "
                  f"{str(e).splitlines()[0][:160]})", flush=True)
            return None
        finally:
            _device.free_memory(dev)

    def run(kind, width, density):
        if cuda:
            return run_cuda(kind, width, density)
        cmd = [sys.executable, __file__, "--one", kind, str(width), str(density),
               "--optim", args.optim, "--repeats", str(args.repeats), "--threads", str(args.threads)]
        cmd += ["--no-search"] if args.no_search else []
        cmd += ["--fused"] if args.fused else []
        if kind not in args.kinds:
            return None
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if args.live_memory else None
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(res.stdout.strip().splitlines()[-1])

    from sparsegrow.layers import kernels
    if cuda:
        print(f"# bench_sparse_step: B={B}, optimizer={args.optim}"
              f"{' (fused)' if args.fused else ''}, {_device.describe(dev)}, "
              f"repeats={args.repeats} (median, after 2 warm-up steps), "
              f"kernels={kernels.get_backend()} (CUDA tensors: torch.sparse), "
              f"max dense {args.max_dense_gib:.0f} GiB, max nnz {args.max_nnz:g}; "
              "peak = GPU allocator peak (max_memory_allocated) over the memory before the layer")
    else:
        print(f"# bench_sparse_step: B={B}, optimizer={args.optim}"
              f"{' (fused)' if args.fused else ''}, "
              f"threads={args.threads}, live memory={args.live_memory}, "
              f"repeats={args.repeats} (median), torch {torch.__version__}, "
              f"kernels={kernels.get_backend()} (C available: {kernels._c_lib() is not None})")
    print()
    pk = "GPU peak" if cuda else "peak"
    print(f"| width | density | nnz | dense step | masked step | sparse step | dense/sparse | "
          f"masked/sparse | sparse {pk} | nnz storage | {pk}/storage | dense {pk} | masked {pk} | "
          "update (drop+random) / step, sparse | same, masked |")
    print("|" + "---|" * 15)
    results = []
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b is not None else "-"  # noqa: E731
    for width in args.widths:
        if cuda and not fits_dense(width, args.max_dense_gib, args.optim):
            print(f"(skipped dense and masked {width}²: weight, gradient and optimizer state "
                  f"over --max-dense-gib {args.max_dense_gib:.0f})", flush=True)
        if cuda:
            for density in args.densities:
                if not fits_sparse(width, density, args.max_sparse_gib):
                    print(f"(skipped sparse {width}² at density {density}: over "
                          f"--max-sparse-gib {args.max_sparse_gib:g})", flush=True)
        dense = run("dense", width, 1.0) if fits_dense(width, args.max_dense_gib, args.optim) else None
        if dense:
            results.append(dense)
        for density in args.densities:
            masked = (run("masked", width, density)
                      if fits_dense(width, args.max_dense_gib, args.optim) else None)
            sparse = (run("sparse", width, density)
                      if fits_sparse(width, density, args.max_sparse_gib) else None)
            results += [r for r in (masked, sparse) if r]
            ms = lambda r: f"{r['step_s'] * 1e3:.1f} ms" if r else "-"  # noqa: E731
            ratio = lambda a, b: f"{a['step_s'] / b['step_s']:.1f}x" if a and b else "-"  # noqa: E731
            upd = lambda r, g="random": (f"{r['update_s'][g] / r['step_s']:.1f}x "  # noqa: E731
                                         f"({r['update_s'][g] * 1e3:.0f} ms)"
                                         if r and g in r.get("update_s", {}) else "-")
            ps = f"{sparse['peak_bytes'] / sparse['nnz_storage_bytes']:.2f}" if sparse else "-"
            print(f"| {width} | {density} | {round(density * width * width)} | {ms(dense)} | "
                  f"{ms(masked)} | {ms(sparse)} | {ratio(dense, sparse)} | {ratio(masked, sparse)} | "
                  f"{mib(sparse['peak_bytes'] if sparse else None)} | "
                  f"{mib(sparse['nnz_storage_bytes'] if sparse else None)} | {ps} | "
                  f"{mib(dense['peak_bytes'] if dense else None)} | "
                  f"{mib(masked['peak_bytes'] if masked else None)} | {upd(sparse)} | {upd(masked)} |",
                  flush=True)
            if sparse and "search" in sparse.get("update_s", {}):
                print(f"|   | search grow | | | | | | | | | | | | {upd(sparse, 'search')} | "
                      f"{upd(masked, 'search')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
