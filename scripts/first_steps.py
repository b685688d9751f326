"""Print a config's first training steps one by one: loss, the largest |logit| and the mean
square of the classifier's input, to see a divergence start (writes no files).

    python scripts/first_steps.py configs/scale_1m.yaml --steps 12 sparsity.method=static \\
        "model.kwargs={hidden: [262144, 262144]}" sparsity.density=0.0001526 sparsity.include=null

Builds the model, sparsifier and optimizer exactly as `sparsegrow train` does
(experiments.loop.build_model_and_sparsifier, build.build_optimizer, the lr schedule and the
per-group lr scales of train.lr_fan_in_base), on the first steps × batch_size training images.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sparsegrow.experiments.build import build_optimizer, lr_at
from sparsegrow.experiments.config import load_config
from sparsegrow.experiments.data import load_dataset, steps_per_epoch
from sparsegrow.experiments.loop import build_model_and_sparsifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="default: train.threads, else 1")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(args.threads or cfg.train.threads or 1)
    torch.manual_seed(cfg.seed)
    t = cfg.train
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=cfg.data.train_subset, seed=cfg.seed, test_subset=100)
    spe = steps_per_epoch(len(data.train_y), t.batch_size)
    model, sparsifier = build_model_and_sparsifier(cfg, data, spe, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model, sparsifier)
    sparsifier.attach(optimizer)
    readout = [m for m in model.modules() if len(list(m.children())) == 0 and
               any(p.requires_grad for p in m.parameters())][-1]  # the last layer with weights
    seen = {}
    readout.register_forward_hook(lambda m, inp, out: seen.__setitem__("h", inp[0].detach()))
    total = spe * t.epochs
    for step in range(min(args.steps, spe)):
        lr = lr_at(cfg, step, total, spe)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        lo, hi = step * t.batch_size, (step + 1) * t.batch_size
        x, y = data.train_x[lo:hi], data.train_y[lo:hi]
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        h = seen["h"]
        print(f"step {step}  loss {loss.item():.4g}  max|logit| {out.detach().abs().max().item():.3g}  "
              f"readout input: mean h² {h.pow(2).mean().item():.3g}, |h|² per example "
              f"{h.pow(2).sum(1).mean().item():.3g}  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
