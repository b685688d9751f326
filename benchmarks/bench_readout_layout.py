"""A dense readout (nn.Linear K -> 10) after a truly sparse layer: its input's layout, timed.

    .venv/bin/python benchmarks/bench_readout_layout.py
    .venv/bin/python benchmarks/bench_readout_layout.py --widths 4096 65536 1000000 --threads 2

A truly sparse layer returns its (B, K) output as the transpose of a contiguous (K, B) array (the
next sparse layer reads it without a copy). A dense nn.Linear given that view runs MKL's GEMM on
a transposed operand, which at a wide K is far slower than on a row-major one. For each width K
this times forward + backward (dW, dX) of nn.Linear(K, 10) at batch B on (a) the transposed view
and (b) a row-major copy made first (the copy is timed with it: what models.MLP now does),
interleaved, the median of --repeats, and prints the ratio view / row-major.

--model CONFIG [overrides]: the same A/B on a whole model built as `sparsegrow train` builds it
(one training batch, forward and backward timed apart): models.MLP's row-major input for dense
layers against the view passed as it is, interleaved, e.g.

    .venv/bin/python benchmarks/bench_readout_layout.py --model configs/scale_1m.yaml --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 65536, 1_000_000])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", nargs="+", metavar="CONFIG [OVERRIDE]", default=None,
                    help="A/B a whole model from a config (and overrides) instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return model_ab(args.model[0], args.model[1:], args.repeats)
    print(f"nn.Linear(K, {args.classes}), B={args.batch}, {args.threads} thread(s), forward + "
          f"backward, median of {args.repeats} (interleaved)\n")
    print("| K | transposed view: fwd / bwd s | row-major copy first: fwd / bwd s | view / row-major |")
    print("|---|---|---|---|")
    for k in args.widths:
        lin = nn.Linear(k, args.classes)
        xt = torch.randn(k, args.batch)  # the sparse layer's (K, B) output
        dy = torch.randn(args.batch, args.classes)
        times = {"view": ([], []), "row-major": ([], [])}
        for rep in range(args.repeats + 1):  # round 0 warms up
            for name, (fw, bw) in times.items():
                x = xt.t().detach().requires_grad_()  # (B, K), strides (1, B)
                lin.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                out = lin(x.contiguous() if name == "row-major" else x)
                t1 = time.perf_counter()
                out.backward(dy)
                t2 = time.perf_counter()
                if rep:
                    fw.append(t1 - t0)
                    bw.append(t2 - t1)
        med = {n: (statistics.median(f), statistics.median(b)) for n, (f, b) in times.items()}
        (vf, vb), (rf, rb) = med["view"], med["row-major"]
        print(f"| {k} | {vf:.3f} / {vb:.3f} | {rf:.3f} / {rb:.3f} | {(vf + vb) / (rf + rb):.1f}× |",
              flush=True)


def model_ab(config: str, overrides: list[str], repeats: int) -> None:
    import torch.nn.functional as F

    import sparsegrow.experiments.models as models
    from sparsegrow.experiments.config import load_config
    from sparsegrow.experiments.data import load_dataset, steps_per_epoch
    from sparsegrow.experiments.loop import build_model_and_sparsifier

    cfg = load_config(config, ["data.train_subset=1280", "sparsity.update_every=5", *overrides])
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=cfg.data.train_subset, seed=cfg.seed, test_subset=100)
    model, _ = build_model_and_sparsifier(cfg, data, steps_per_epoch(1280, cfg.train.batch_size),
                                          torch.device("cpu"))
    x, y = data.train_x[:cfg.train.batch_size], data.train_y[:cfg.train.batch_size]
    row_major = models._gemm_input
    variants = {"view as it is": lambda layer, x: x, "row-major for dense layers": row_major}
    times = {name: ([], []) for name in variants}
    try:
        for rep in range(repeats + 1):  # round 0 warms up
            for name, fn in variants.items():
                models._gemm_input = fn
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                if rep:
                    times[name][0].append(t1 - t0)
                    times[name][1].append(t2 - t1)
    finally:
        models._gemm_input = row_major
    print(f"{config} {' '.join(overrides)}: one batch of {len(y)}, {torch.get_num_threads()} "
          f"thread(s), median of {repeats} (interleaved)\n")
    print("| dense layers' input | forward s | backward s |\n|---|---|---|")
    for name, (fw, bw) in times.items():
        print(f"| {name} | {statistics.median(fw):.3f} | {statistics.median(bw):.3f} |")


if __name__ == "__main__":
    main()
