"""Cost of `Sparsifier.step()` on steps without a topology update, relative to a training step.

    PYTHONPATH=. python benchmarks/bench_step_overhead.py --methods static set rigl --repeats 30

LeNet-300-100 (784-300-100-10, masked storage, density 0.02, ERK), batch 128, SGD with momentum
0.9 and weight decay 5e-4, 1 thread, synthetic data (the cost does not depend on the values).
Per method, blocks of `--block` training steps with and without `sparsifier.step()` alternate
(ABAB in even repeats, BABA in odd ones) in the same process, so slow phases of a shared machine
hit both; update steps are not timed. Prints the median per-step time of each, their ratio, the
median of the paired ratios, and the median time inside `sparsifier.step()` itself as a share of
a training step without it (the most direct and least noisy of the three).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def run(method: str, repeats: int, block: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = lenet_300_100()
    dynamic = sg.METHODS.get(method).drop is not None
    # one update at step 10**6: every timed step is a step without an update
    sched = sg.UpdateSchedule(every=10**6, end=2 * 10**6) if dynamic else None
    sp = sg.Sparsifier(model, 0.02, method=method, schedule=sched, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sp.attach(opt)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(8)]

    def train_block(with_step: bool) -> tuple[float, float]:
        in_step = 0.0
        t0 = time.perf_counter()
        for k in range(block):
            x, y = data[k % len(data)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if with_step:
                s0 = time.perf_counter()
                assert sp.step() is None
                in_step += time.perf_counter() - s0
        return (time.perf_counter() - t0) / block, in_step / block

    train_block(True)  # warm up both paths
    train_block(False)
    with_t, without_t, step_t = [], [], []
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for with_step in order:
            t, s = train_block(with_step)
            if with_step:
                with_t.append(t)
                step_t.append(s)
            else:
                without_t.append(t)
    base = statistics.median(without_t)
    return {
        "with_ms": 1e3 * statistics.median(with_t), "without_ms": 1e3 * base,
        "ratio": statistics.median(with_t) / base,
        "paired": statistics.median(a / b for a, b in zip(with_t, without_t)),
        "step_ms": 1e3 * statistics.median(step_t),
        "step_share": statistics.median(step_t) / base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["static", "set", "rigl"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"sparsegrow from {sg.__file__}; torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}, {args.repeats} repeats x {args.block} steps per side")
    print("\n| method | step with sparsifier.step() (ms) | without (ms) | ratio of medians "
          "| median of paired ratios | sparsifier.step() (ms) | step() / train step |")
    print("|---|---|---|---|---|---|---|")
    for m in args.methods:
        r = run(m, args.repeats, args.block, args.batch)
        print(f"| {m} | {r['with_ms']:.3f} | {r['without_ms']:.3f} | {r['ratio']:.4f} "
              f"| {r['paired']:.4f} | {r['step_ms']:.4f} | {100 * r['step_share']:.2f}% |",
              flush=True)


if __name__ == "__main__":
    main()
