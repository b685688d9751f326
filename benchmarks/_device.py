"""What the benchmarks share (imported from the script's folder): --device support and timing.

cpu: nothing changes. cuda: one clear error line and exit 2 when CUDA is absent; timings are
bracketed by torch.cuda.synchronize(); memory is the GPU allocator's peak
(torch.cuda.max_memory_allocated after reset_peak_memory_stats) minus what was allocated before.
"""
from __future__ import annotations

import gc
import sys
import time

import torch


def resolve(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda but CUDA is not available here (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda}); use --device cpu", file=sys.stderr)
        sys.exit(2)
    return dev


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def total_gib(dev: torch.device) -> float:
    return torch.cuda.get_device_properties(dev).total_memory / 2**30


def describe(dev: torch.device) -> str:
    """Device name, memory, torch and CUDA versions (for the header of a cuda run)."""
    return (f"device cuda: {torch.cuda.get_device_name(dev)} ({total_gib(dev):.0f} GiB), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


class GpuPeak:
    """with GpuPeak(dev) as p: ...  then p.bytes = peak allocated during the block minus the
    memory allocated when it began."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def __enter__(self):
        torch.cuda.synchronize(self.dev)
        torch.cuda.reset_peak_memory_stats(self.dev)
        self.base = torch.cuda.memory_allocated(self.dev)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.dev)
        self.bytes = torch.cuda.max_memory_allocated(self.dev) - self.base
        return False


def median_time(fn, repeats: int, dev: torch.device = torch.device("cpu")) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call (first kernel builds,
    allocator), each call bracketed by sync(dev)."""
    import statistics
    import time

    fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class MemPeak:
    """with MemPeak(dev) as p: ...  then p.bytes = the block's peak memory minus the memory in use
    when it began: on cuda the allocator's (GpuPeak), on CPU the process's resident set (Linux:
    the VmHWM high-water mark, reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.gpu = GpuPeak(dev) if dev.type == "cuda" else None

    def __enter__(self):
        if self.gpu is not None:
            self.gpu.__enter__()
            return self
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.gpu is not None:
            self.gpu.__exit__(*exc)
            self.bytes = self.gpu.bytes
        else:
            self.bytes = _status_bytes("VmHWM") - self.base
        return False


def interleaved(methods: list[str], repeats: int, dev: torch.device, run):
    """Every method once per round, in turn, for `repeats` rounds (on cuda a warm-up round first,
    not counted). run(method, generator) -> (idx, info), with a generator seeded 2 at every call.
    -> (times s, extra MiB (MemPeak): lists per method; the last round's idx and info per method)."""
    times = {m: [] for m in methods}
    extra = {m: [] for m in methods}
    out, info = {}, {}
    warm = dev.type == "cuda"
    for r in range(repeats + warm):
        for m in methods:
            gen = torch.Generator().manual_seed(2)
            sync(dev)
            with MemPeak(dev) as peak:
                t0 = time.perf_counter()
                idx, inf = run(m, gen)
                sync(dev)
                dt = time.perf_counter() - t0
            if not warm or r > 0:
                times[m].append(dt)
                extra[m].append(peak.bytes / 2**20)
            out[m], info[m] = idx, inf
            del idx, inf  # at 10⁶² a method's pairs are ~100 MB: one copy at a time
    return times, extra, out, info
