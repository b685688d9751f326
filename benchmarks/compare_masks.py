"""Do two runs end with the same topology? Per layer: identical or not, and the overlap.

    python benchmarks/compare_masks.py runs/dist_accept/rigl-np1-float32 runs/dist_accept/rigl-np2-float32

Reads each run's checkpoint.pt (the Sparsifier's state) and summary.json; prints one markdown row
per pair: identical layers, Jaccard overlap of the active sets over all layers, test accuracy and
train time of both.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def active_sets(run: Path) -> dict[str, torch.Tensor]:
    params = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")["sparsifier"]["params"]
    return {k: (torch.nonzero(v["mask"].view(-1)).flatten() if "mask" in v else v["active"])
            for k, v in params.items()}


def main(argv: list[str]) -> None:
    if len(argv) % 2:
        raise SystemExit("give pairs of run directories")
    print("| run A | run B | identical layers | overlap (Jaccard) | acc A | acc B | train s A | train s B |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(argv[::2], argv[1::2]):
        a, b = Path(a), Path(b)
        ma, mb = active_sets(a), active_sets(b)
        same = sum(torch.equal(ma[k], mb[k]) for k in ma)
        inter = sum(int(torch.isin(ma[k], mb[k]).sum()) for k in ma)
        union = sum(ma[k].numel() + mb[k].numel() for k in ma) - inter
        sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
        print(f"| {a.name} | {b.name} | {same}/{len(ma)} | {inter / union:.4f} | "
              f"{100 * sa['test_acc']:.2f} | {100 * sb['test_acc']:.2f} | "
              f"{sa['train_time_s']:.1f} | {sb['train_time_s']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
