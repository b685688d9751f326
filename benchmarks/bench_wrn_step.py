"""Whole training steps of the thesis configs' WRN-10-1 (configs/thesis/wrn_fmnist.yaml: search grow
after every step on the 256-row sketch), masked vs truly sparse storage, interleaved A/B.

    PYTHONPATH=. python benchmarks/bench_wrn_step.py --densities 0.2 0.1 --steps 5 --rounds 3

One step = forward, backward (with the sketch capture), SGD step and the Sparsifier's update, on
a synthetic (128, 1, 32, 32) batch (the data do not change the cost). Both models are built as the
CLI builds them (truly sparse: on the meta device). Rounds alternate masked and sparse; the table
gives the median over rounds of the mean step time, and the ratio sparse / masked.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsegrow.experiments.build import build_optimizer, build_sparsifier
from sparsegrow.experiments.config import load_config
from sparsegrow.experiments.loop import materialise_dense
from sparsegrow.experiments.models import build_model

CONFIG = "configs/thesis/wrn_fmnist.yaml"


def build(storage: str, density: float, device: torch.device):
    cfg = load_config(CONFIG, [f"sparsity.storage={storage}", f"sparsity.density={density}"])
    if storage == "sparse":
        with torch.device("meta"):
            model = build_model("wrn", (1, 32, 32), 10, depth=10, width=1)
        sp = build_sparsifier(cfg, model, 80)
        materialise_dense(model)
    else:
        model = build_model("wrn", (1, 32, 32), 10, depth=10, width=1)
        sp = build_sparsifier(cfg, model, 80)
    model.to(device)
    opt = build_optimizer(cfg, model, sp)
    sp.attach(opt)
    return model, sp, opt


def timed_steps(parts, x, y, steps: int, device) -> float:
    model, sp, opt = parts
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    sync()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (128,), generator=g).to(device)
    print(f"# bench_wrn_step: WRN-10-1, B=128, {CONFIG}, device {device}, threads {args.threads}, "
          f"torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps, masked/sparse interleaved")
    print("| density | masked s/step | sparse s/step | sparse / masked | per round (masked; sparse) |")
    print("|---|---|---|---|---|")
    for d in args.densities:
        parts = {s: build(s, d, device) for s in ("masked", "sparse")}
        for s in parts:  # warm-up: first update, kernel builds, allocator
            timed_steps(parts[s], x, y, 2, device)
        times = {"masked": [], "sparse": []}
        for _ in range(args.rounds):
            for s in ("masked", "sparse"):
                times[s].append(timed_steps(parts[s], x, y, args.steps, device))
        m, sp = statistics.median(times["masked"]), statistics.median(times["sparse"])
        rounds = "; ".join(f"{a:.2f}, {b:.2f}" for a, b in zip(times["masked"], times["sparse"]))
        print(f"| {d:g} | {m:.3f} | {sp:.3f} | {sp / m:.2f}x | {rounds} |", flush=True)


if __name__ == "__main__":
    main()
