"""A tiny classifier trained sparse by a Hugging Face Trainer (a few seconds on a CPU).

    python examples/hf_trainer.py                      # RigL at density 0.1, 100 steps
    python examples/hf_trainer.py --method set --steps 400 --out /tmp/sg-hf

Any torch module whose forward returns {"loss": ...} trains in a Trainer; a transformers model
(e.g. BertForSequenceClassification(BertConfig(...))) goes in the same way. The callback
sparsifies every Linear weight when the Trainer is built, before train() builds the optimizer.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

from sparsegrow.integrations.huggingface import SparsegrowCallback


class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=128, classes=4):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))  # (B, classes)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Blobs(torch.utils.data.Dataset):
    """Four Gaussian blobs in 32 dimensions: (x, label) pairs as the Trainer's dicts."""

    def __init__(self, n=1024, seed=0):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, 32, generator=g) * 2
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, 32, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rigl")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10, help="optimizer steps between updates (ΔT)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="sparsegrow-hf-")
    callback = SparsegrowCallback(density=args.density, method=args.method, every=args.every,
                                  end=0.75, fraction=0.3, seed=0)
    trainer = Trainer(
        model=MLP(), train_dataset=Blobs(), data_collator=default_data_collator, callbacks=[callback],
        args=TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=64,
                               learning_rate=1e-3, logging_steps=25, save_steps=50, report_to=[],
                               use_cpu=True, disable_tqdm=True),
    )
    trainer.train()
    report = callback.sparsifier.report()
    print(f"density {report['global_density']:.4f}  ITOP {report['itop']:.3f}  "
          f"updates {report['n_updates']}  loss {trainer.state.log_history[-2]['loss']:.3f}  "
          f"checkpoints in {out}")
    return report


if __name__ == "__main__":
    main()
