"""How well does each growth signal find the connections of largest gradient over a ΔT window?

    python benchmarks/bench_sketch.py --windows 5

RigL and exact search grow read one batch, the update step's. Accumulating a random-sign sketch
of dZ and X over the ΔT steps of the window (`signal.sketch_dim=s, signal.accumulate=true`)
estimates the gradient summed over the window without bias; s = 1 is GSE's single-row estimate
(GraEst, Heddes et al.). On LeNet-300-100 (static, density 0.02, trained 300 steps on
Fashion-MNIST), for each window of ΔT = 100 steps this script computes the target, the top-n
inactive connections of |Σ_t G_t| (n = 30% of the nnz), and reports the recall and quality
(Σ|G_window| chosen / Σ|G_window| of the target) of the top-n chosen from each signal.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import sparsegrow as sg
from sparsegrow.experiments.data import load_dataset
from sparsegrow.experiments.models import build_model
from sparsegrow.selection import select_top
from sparsegrow.signals import sketch_rows


def top_inactive(scores: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    s = scores.reshape(-1).clone()
    s[mask.reshape(-1)] = float("-inf")
    return select_top(s, n, torch.Generator().manual_seed(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--sketch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--layer", default="hidden.0.weight")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_dataset("fashion_mnist")
    model = build_model("lenet300100", data.input_shape, data.num_classes)
    sp = sg.Sparsifier(model, 0.02, method="static")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    param = next(p for p in sp.params if p.fqn == args.layer)
    lin = param.module
    cap = {}
    lin.register_forward_hook(lambda m, a, out: cap.update(x=a[0].detach().flatten(1), z=out))
    gen = torch.Generator().manual_seed(0)
    batches = iter(())

    def step():
        nonlocal batches
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = data.train_batches(128, gen)
            xb, yb = next(batches)
        out = model(xb)
        cap["z"].retain_grad()
        loss = F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        return cap["z"].grad.detach(), cap["x"]  # dZ (B, N), X (B, M)

    for _ in range(300):
        step()
    mask = param.mask
    n = round(0.3 * int(mask.sum()))
    names = ["update-step batch (RigL / exact search)"] + [
        f"sketch s={s} accumulated" + (" (GSE GraEst form)" if s == 1 else "") for s in args.sketch]
    recall = {k: [] for k in names}
    quality = {k: [] for k in names}
    for w in range(args.windows):
        g_sum = torch.zeros(param.shape)
        sketches = {s: None for s in args.sketch}
        sk_gen = torch.Generator().manual_seed(1000 + w)
        for t in range(args.every):
            dz, x = step()
            g_sum += dz.t() @ x
            for s in args.sketch:
                sketches[s] = sketch_rows(dz, x, s, sk_gen, sketches[s])
        g_last = dz.t() @ x
        target = top_inactive(g_sum.abs(), mask, n)
        best = float(g_sum.abs().reshape(-1)[target].sum())
        estimates = [g_last] + [sketches[s][0].t() @ sketches[s][1] for s in args.sketch]
        for name, est in zip(names, estimates):
            chosen = top_inactive(est.abs(), mask, n)
            recall[name].append(float(torch.isin(chosen, target).float().mean()))
            quality[name].append(float(g_sum.abs().reshape(-1)[chosen].sum()) / best)
    print(f"layer {args.layer} {tuple(param.shape)}, density {float(mask.float().mean()):.3f}, "
          f"n = {n}, ΔT = {args.every}, {args.windows} windows (median)\n")
    print("| signal | recall vs top-n of the window's gradient | quality |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(recall[name]):.3f} | {statistics.median(quality[name]):.3f} |")


if __name__ == "__main__":
    main()
