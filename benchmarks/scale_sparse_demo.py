"""Scale demonstration: an MLP 784-65536-65536-10 on Fashion-MNIST, trained truly sparse.

    .venv/bin/python benchmarks/scale_sparse_demo.py --epochs 2 --grow random

The dense 65536 x 65536 layer alone would need 16 GiB (64 GiB with gradient and Adam moments);
truly sparse at global density 0.001 (ERK) the model holds ~4.3 M connections. The model is built
on the meta device (no memory), then `sparsify(..., storage="sparse")` replaces every Linear by a
SparseLinear. Until the Sparsifier samples active sets on the CPU for meta weights (a two-line
change proposed for updater.py), this script does that substitution itself (see `_cpu_sampler`).
The same run as a config for `sparsegrow train` is docs/scale_sparse_65k.yaml.

Prints test accuracy per epoch, time per epoch and the peak resident memory (VmHWM).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from unittest import mock

import torch
import torch.nn.functional as F

import sparsegrow
from sparsegrow import updater
from sparsegrow.experiments.data import load_dataset
from sparsegrow.experiments.models import build_model
from sparsegrow.layers import sparse_linear  # noqa: F401  (registers storage "sparse")
from sparsegrow.topology import sample_inactive


def vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # GiB
    return float("nan")


def _cpu_sampler(numel, excluded, k, generator, device=None):
    if device is not None and torch.device(device).type == "meta":
        device = "cpu"
    return sample_inactive(numel, excluded, k, generator, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[65536, 65536])
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--grow", default="random", help="random (SET) or search")
    ap.add_argument("--grow-kwargs", default="{}", help='JSON, e.g. {"backend": "faiss-hnsw"}')
    ap.add_argument("--update-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_dataset("fashion_mnist", train_subset=args.train_subset, seed=args.seed)
    with torch.device("meta"):
        model = build_model("mlp", data.input_shape, data.num_classes, hidden=tuple(args.hidden))
    spe = -(-len(data.train_y) // args.batch_size)
    total = spe * args.epochs
    schedule = sparsegrow.UpdateSchedule(every=args.update_every, end=int(0.75 * total),
                                         fraction=0.3, decay="cosine")
    t0 = time.perf_counter()
    with mock.patch.object(updater, "sample_inactive", _cpu_sampler):
        if args.grow == "search":
            importlib.import_module("sparsegrow.search_grow")  # registers grow "search"
        sp = sparsegrow.sparsify(model, args.density, method="set", grow=args.grow,
                                 grow_kwargs=json.loads(args.grow_kwargs), storage="sparse",
                                 schedule=schedule, allow_regrow=False, seed=args.seed)
    for p in sp.params:  # sparse-aware init (the Sparsifier's sparse_init is masked-only today)
        p.scale_init_to_active_fan_in()
    build_s = time.perf_counter() - t0
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left on meta"
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=2e-4)
    sp.attach(optimizer)
    nnz = sum(p.nnz() for p in sp.params)
    numel = sum(p.numel for p in sp.params)
    print(f"model {[784, *args.hidden, 10]}, nnz {nnz} of {numel} ({nnz / numel:.5f}), "
          f"layer densities {sp.report()['layers']}, built in {build_s:.1f} s, "
          f"RSS {vm('VmRSS'):.2f} GiB", flush=True)

    def evaluate():
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for xb, yb in data.test_batches(1000):
                correct += (model(xb).argmax(1) == yb).sum().item()
                n += len(yb)
        model.train()
        return correct / n

    step, epochs = 0, []
    for epoch in range(args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        loss_sum = seen = 0
        for xb, yb in data.train_batches(args.batch_size, gen):
            for g in optimizer.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)).item())
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sp.step()
            step += 1
            loss_sum += loss.item() * len(yb)
            seen += len(yb)
        epoch_s = time.perf_counter() - t0
        acc = evaluate()
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "test_acc": acc,
               "epoch_s": epoch_s, "update_s_total": sp.update_time_s, "n_updates": sp.n_updates,
               "peak_rss_gib": vm("VmHWM"), "density": sp.report()["global_density"]}
        epochs.append(rec)
        print(json.dumps(rec), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "nnz": nnz, "numel": numel, "epochs": epochs}, f, indent=1)


if __name__ == "__main__":
    main()
