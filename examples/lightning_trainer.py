"""A tiny classifier trained sparse by Lightning (a few seconds on a CPU).

    python examples/lightning_trainer.py                       # RigL at density 0.1, 100 steps
    python examples/lightning_trainer.py --method set --accumulate 2 --out /tmp/sg-pl

The callback sparsifies every Linear weight in setup(), before configure_optimizers, and steps
once per optimizer step (accumulate_grad_batches micro-batches).
"""
from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as L
import torch
from torch import nn

from sparsegrow.integrations.lightning import SparsegrowCallback


class MLP(L.LightningModule):
    def __init__(self, d_in=32, hidden=128, classes=4, lr=1e-3):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def blobs(n=1024, seed=0) -> torch.utils.data.TensorDataset:
    """Four Gaussian blobs in 32 dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 32, generator=g) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, 32, generator=g), y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rigl")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10, help="optimizer steps between updates (ΔT)")
    ap.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    ap.add_argument("--out", default=None, help="logs and checkpoints (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="sparsegrow-pl-")
    callback = SparsegrowCallback(density=args.density, method=args.method, every=args.every,
                                  end=0.75, fraction=0.3, seed=0)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, default_root_dir=out,
                        accumulate_grad_batches=args.accumulate, callbacks=[callback],
                        logger=L.loggers.CSVLogger(out, name="log"), log_every_n_steps=25,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(blobs(), batch_size=64 // args.accumulate, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer.fit(MLP(), loader)
    report = callback.sparsifier.report()
    print(f"density {report['global_density']:.4f}  ITOP {report['itop']:.3f}  "
          f"updates {report['n_updates']}  loss {float(trainer.callback_metrics['train_loss']):.3f}  "
          f"logs and checkpoints in {out}")
    return report


if __name__ == "__main__":
    main()
