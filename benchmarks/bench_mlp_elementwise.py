"""The elementwise passes around a truly sparse MLP's layers: before and after session 11's fusion.

    .venv/bin/python benchmarks/bench_mlp_elementwise.py                   # configs/scale_1m.yaml
    .venv/bin/python benchmarks/bench_mlp_elementwise.py --model configs/scale_sparse_65k.yaml --repeats 5

Two changes, timed together on a whole model built as `sparsegrow train` builds it (one training
batch, forward and backward timed apart, interleaved, median of --repeats):
- SparseLinear's bias is added in place to the kernel's fresh (N, B) output inside the autograd
  Function (its gradient a row sum of dY^T there), where `y + bias` outside allocated and faulted
  in another (B, N) array;
- models.MLP makes the row-major copy for a dense reader before the ReLU, so that ReLU's backward
  sees its saved output and the dense layer's gradient in one layout.
"Before" is a bench-local forward that composes the layers the old way (bias outside, ReLU then
copy); "now" is the model's own forward. Huge pages are on, as the CLI sets them.
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI; before torch's first allocation

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def forward_before(model, x: torch.Tensor) -> torch.Tensor:
    """models.MLP's forward as it was before session 11 (same numbers, more passes)."""
    from sparsegrow.experiments.models import _gemm_input
    from sparsegrow.layers.sparse_linear import SparseLinear

    x = x.flatten(1)
    for layer in model.hidden:
        inp = _gemm_input(layer, x)
        if isinstance(layer, SparseLinear):
            y = layer._matmul(inp, torch.float32)  # no bias: added outside, as before
            y = y + layer.bias if layer.bias is not None else y
        else:
            y = layer(inp)
        x = F.relu(y)
    return model.classifier(_gemm_input(model.classifier, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", metavar="CONFIG [OVERRIDE]", default=["configs/scale_1m.yaml"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sparsegrow.experiments.config import load_config
    from sparsegrow.experiments.data import load_dataset, steps_per_epoch
    from sparsegrow.experiments.loop import build_model_and_sparsifier

    config, overrides = args.model[0], args.model[1:]
    cfg = load_config(config, ["data.train_subset=1280", "sparsity.update_every=5", *overrides])
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=cfg.data.train_subset, seed=cfg.seed, test_subset=100)
    model, _ = build_model_and_sparsifier(cfg, data, steps_per_epoch(1280, cfg.train.batch_size),
                                          torch.device("cpu"))
    x, y = data.train_x[:cfg.train.batch_size], data.train_y[:cfg.train.batch_size]
    variants = {"before (bias outside, ReLU then copy)": lambda: forward_before(model, x),
                "now (bias fused, copy then ReLU)": lambda: model(x)}
    times = {name: ([], []) for name in variants}
    losses = {}
    for rep in range(args.repeats + 1):  # round 0 warms up
        for name, fwd in variants.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(fwd(), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            losses[name] = loss.item()
            if rep:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    a, b = losses.values()
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"the two forwards disagree: {losses}"
    print(f"{' '.join(args.model)}: one batch of {len(y)}, {torch.get_num_threads()} thread(s), "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}, median of {args.repeats} "
          f"(interleaved); losses {a:.6f} / {b:.6f}\n")
    print("| forward | forward s | backward s | step s |\n|---|---|---|---|")
    med = {}
    for name, (fw, bw) in times.items():
        med[name] = (statistics.median(fw), statistics.median(bw))
        print(f"| {name} | {med[name][0]:.3f} | {med[name][1]:.3f} | {sum(med[name]):.3f} |")
    (bf, bb), (nf, nb) = med.values()
    print(f"\nnow / before: forward {nf / bf:.2f}×, backward {nb / bb:.2f}×, step {(nf + nb) / (bf + bb):.2f}×")


if __name__ == "__main__":
    main()
