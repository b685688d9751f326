"""How a run's truly sparse layers spread their connections over units: per layer, the number of
connections per output unit (CSR row) and per input unit (column), against a uniform random
layout of the same count (what SET's draws give).

    python scripts/layer_degrees.py runs/scale_1m/search-auto/seed0/checkpoint.pt

Reads the checkpoint memory-mapped (a 10⁶-wide run's 1.3 GB file costs ~0.5 GB here). Per layer
and side: mean, max, the share of units with no connection, and the share of all connections
held by the 1% best-connected units (uniform: ~1.4% at 40 per unit).
"""
from __future__ import annotations

import argparse

import torch


def describe(degrees: torch.Tensor) -> str:
    d = degrees.float()
    top = torch.sort(d, descending=True).values[: max(1, d.numel() // 100)]
    return (f"mean {d.mean():.1f}, max {int(d.max())}, no connection {(d == 0).float().mean():.3f}, "
            f"top 1% of units hold {top.sum() / d.sum():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of the uniform reference")
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu", mmap=True, weights_only=False)
    model = ck["model"]
    print(f"step {ck.get('step')}")
    g = torch.Generator().manual_seed(args.seed)
    for name in sorted(k[: -len(".crow")] for k in model if k.endswith(".crow")):
        crow, col = model[f"{name}.crow"].long(), model[f"{name}.col"].long()
        n_out, nnz = crow.numel() - 1, col.numel()
        # the CSR does not store its input width: units past the last connected one go unseen
        n_in = int(col.max()) + 1
        rows, cols = crow[1:] - crow[:-1], torch.bincount(col, minlength=n_in)
        print(f"{name}: {n_out} x {n_in}, {nnz} connections")
        print(f"  per output unit: {describe(rows)}")
        print(f"    uniform:       {describe(torch.bincount(torch.randint(0, n_out, (nnz,), generator=g), minlength=n_out))}")
        print(f"  per input unit:  {describe(cols)}")
        print(f"    uniform:       {describe(torch.bincount(torch.randint(0, n_in, (nnz,), generator=g), minlength=n_in))}")


if __name__ == "__main__":
    main()
