"""One training step of every WRN-10-1 and WRN-28-5 convolution: SparseConv2d vs masked-dense vs
dense nn.Conv2d (oneDNN), at densities 0.2, 0.1, 0.05, 0.01.

    PYTHONPATH=. python benchmarks/bench_sparse_conv.py                       # full grid
    PYTHONPATH=. python benchmarks/bench_sparse_conv.py --nets wrn-10-1 --repeats 5

A step is forward + backward (dX and dW) + SGD(momentum) step on a batch of B=128 at the spatial
size the layer sees in the WRN on 32x32 inputs (32, 16 or 8). Time: median of --repeats steps
after one warm-up, the three storages interleaved step by step so load on the machine hits them
alike; ratios are against dense nn.Conv2d measured in the same run. Dense and masked do not
depend on the density (a masked conv is a dense conv plus a mask on the gradient), so they are
measured once per shape.

Memory: `state` = bytes of the layer's persistent tensors (weights or values, their gradient,
the momentum buffer, the mask or the CSR indices); `step peak` = the rise of the resident set
during one step: the kernel's peak-RSS mark (VmHWM) is reset (/proc/self/clear_refs) before the
step and read after it, minus the RSS before it (median over the timed steps). It covers the
activations, unfolded patches, gradients and every temporary. glibc is told (mallopt) to serve
every block of 64 KiB or more by mmap and return it on free, so freed memory is not silently
reused from the heap and each configuration's peak is its own; `peak` = state + step peak.

--device cuda: layers and batch on the GPU, two warm-up steps, each timed step bracketed by
torch.cuda.synchronize(); `step peak` is the GPU allocator's peak during the step
(torch.cuda.max_memory_allocated after reset_peak_memory_stats) minus what was allocated before
it. --threads and the mallopt setting do not apply.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch
from torch import nn

from sparsegrow.layers.sparse_conv import SparseConv2d
from sparsegrow.topology import MaskedParam, sample_inactive

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402

B = 128
# (name, in, out, kernel, stride, input H = W); WRN-d-k: stem 3x3 to 16, stages of 16k, 32k, 64k
# channels at 32, 16, 8; the first conv of stages 2 and 3 has stride 2, a 1x1 stride shortcut
# where the shape changes. WRN-10-1 reads Fashion-MNIST (1 channel), WRN-28-5 CIFAR (3).
NETS = {
    "wrn-10-1": [("stem", 1, 16, 3, 1, 32), ("s1.conv", 16, 16, 3, 1, 32),
                 ("s2.conv1", 16, 32, 3, 2, 32), ("s2.conv2", 32, 32, 3, 1, 16),
                 ("s2.short", 16, 32, 1, 2, 32), ("s3.conv1", 32, 64, 3, 2, 16),
                 ("s3.conv2", 64, 64, 3, 1, 8), ("s3.short", 32, 64, 1, 2, 16)],
    "wrn-28-5": [("stem", 3, 16, 3, 1, 32), ("s1.conv1", 16, 80, 3, 1, 32),
                 ("s1.conv", 80, 80, 3, 1, 32), ("s1.short", 16, 80, 1, 1, 32),
                 ("s2.conv1", 80, 160, 3, 2, 32), ("s2.conv", 160, 160, 3, 1, 16),
                 ("s2.short", 80, 160, 1, 2, 32), ("s3.conv1", 160, 320, 3, 2, 16),
                 ("s3.conv", 320, 320, 3, 1, 8), ("s3.short", 160, 320, 1, 2, 16)],
}


def build(kind: str, c_in, c_out, k, stride, density, gen, dev=torch.device("cpu")):
    pad = k // 2
    if kind == "sparse":
        numel = c_out * c_in * k * k
        active = sample_inactive(numel, torch.empty(0, dtype=torch.long),
                                 max(1, round(density * numel)), gen)
        layer = SparseConv2d(c_in, c_out, k, active, bias=False, stride=stride, padding=pad,
                             generator=gen, device=dev)
        mask = None
    else:
        layer = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=False, device=dev)
        mask = None
        if kind == "masked":
            numel = layer.weight.numel()
            active = sample_inactive(numel, torch.empty(0, dtype=torch.long),
                                     max(1, round(density * numel)), gen)
            mask = MaskedParam("weight", layer, "weight", active)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    return layer, opt, mask


def step(layer, opt, mask, x):
    x.grad = None
    opt.zero_grad(set_to_none=False)
    layer(x).square().mean().backward()
    opt.step()
    if mask is not None:
        mask.enforce()  # what the Sparsifier does after every optimizer step


def state_bytes(layer, opt) -> int:
    seen, total = set(), 0
    tensors = list(layer.parameters()) + list(layer.buffers())
    tensors += [p.grad for p in layer.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def timed_step(layer, opt, mask, x) -> tuple[float, int]:
    """(seconds, peak RSS rise in bytes) of one step; on CUDA the GPU allocator's peak rise."""
    if x.is_cuda:
        with _device.GpuPeak(x.device) as p:  # synchronizes on entry and exit
            t0 = time.perf_counter()
            step(layer, opt, mask, x)
            torch.cuda.synchronize(x.device)
            t = time.perf_counter() - t0
        return t, p.bytes
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    step(layer, opt, mask, x)
    return time.perf_counter() - t0, _status("VmHWM") - rss0


def measure(shape, densities, repeats, gen, dev=torch.device("cpu")):
    name, c_in, c_out, k, stride, hw = shape
    x = torch.randn(B, c_in, hw, hw, generator=gen).to(dev).requires_grad_()
    configs = [("dense", None), ("masked", densities[0])] + [("sparse", d) for d in densities]
    built = {c: build(c[0], c_in, c_out, k, stride, c[1] if c[1] else 1.0, gen, dev)
             for c in configs}
    times = {c: [] for c in configs}
    peaks = {c: [] for c in configs}
    for _ in range(2 if dev.type == "cuda" else 1):
        for c in configs:  # warm-up (first-call costs, page-in; cuDNN/cuSPARSE handles)
            step(*built[c], x)
    for _ in range(repeats):  # interleaved
        for c in configs:
            t, peak = timed_step(*built[c], x)
            times[c].append(t)
            peaks[c].append(peak)
    rows = []
    for c in configs:
        layer, opt, _ = built[c]
        rows.append({"config": c, "time": statistics.median(times[c]),
                     "state": state_bytes(layer, opt), "step_peak": statistics.median(peaks[c])})
    del built
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1, 0.05, 0.01])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repeats-large", type=int, default=3,
                    help="repeats for shapes over 5 dense GFLOP per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    dev = _device.resolve(args.device)
    gen = torch.Generator().manual_seed(0)
    mib = 1 / 2**20
    if dev.type == "cuda":
        print(f"B={B}, {_device.describe(dev)}; time = median ms per step (fwd+bwd+SGD, "
              "synchronized, after 2 warm-up steps); x = time / dense; memory in MiB: state + "
              "step peak = peak, step peak = GPU allocator peak (max_memory_allocated) during the "
              "step over the memory allocated before it\n")
    else:
        torch.set_num_threads(args.threads)
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: see the docstring
        print(f"B={B}, threads={args.threads}, torch {torch.__version__}; time = median ms per "
              "step (fwd+bwd+SGD); x = time / dense; memory in MiB: state + step peak = peak\n")
    print("| net | layer (in→out, k, stride, H) | storage | density | ms/step | x dense | "
          f"state MiB | {'GPU ' if dev.type == 'cuda' else ''}step peak MiB | peak MiB | "
          "peak / dense |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for net in args.nets:
        for shape in NETS[net]:
            name, c_in, c_out, k, stride, hw = shape
            ho = (hw - 1) // stride + 1
            gflop = 2 * B * ho * ho * c_out * c_in * k * k / 1e9
            repeats = args.repeats_large if gflop > 5 else args.repeats
            rows = measure(shape, args.densities, repeats, gen, dev)
            dense = rows[0]
            d_peak = dense["state"] + dense["step_peak"]
            for r in rows:
                kind, density = r["config"]
                peak = r["state"] + r["step_peak"]
                dens = "1" if kind == "dense" else ("any" if kind == "masked" else f"{density:g}")
                print(f"| {net} | {name} ({c_in}→{c_out}, {k}x{k}, s{stride}, {hw}) | {kind} | "
                      f"{dens} | {r['time'] * 1e3:.1f} | {r['time'] / dense['time']:.2f} | "
                      f"{r['state'] * mib:.2f} | {r['step_peak'] * mib:.1f} | {peak * mib:.1f} | "
                      f"{peak / d_peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
