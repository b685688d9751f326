"""`sparsegrow export RUN_DIR --out FILE`: a finished (or checkpointed) run as a compact model file.

The run's config.yaml rebuilds the model and Sparsifier exactly as training did (build.py), the
checkpoint's model and sparsifier states fill them, and `sparsegrow.export_sparse` writes the
file. Its header carries the resolved config and the data shape, so `load_exported_run` rebuilds
the architecture on the meta device and `sparsegrow.load_sparse` fills it for inference.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sparsegrow import export_sparse, load_sparse
from sparsegrow.export import read_header, sparse_weights

from .build import build_sparsifier
from .config import ConfigError, dump_config, load_config
from .data import load_dataset, steps_per_epoch
from .models import build_model


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Export run_dir's checkpoint to `out`; returns export_sparse's sizes plus the dense size."""
    run_dir = Path(run_dir)
    for need in ("config.yaml", "checkpoint.pt"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir / need} not found: export reads a run directory "
                                    "written by `sparsegrow train`")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.sparsity.method == "dst":
        raise ConfigError("export handles Sparsifier runs (masks or SparseLinear); method 'dst' "
                          "keeps learned thresholds instead")
    data = load_dataset(cfg.data.dataset, root=cfg.data.root, pad_to=cfg.data.pad_to,
                        train_subset=cfg.data.train_subset, seed=cfg.seed,
                        test_subset=cfg.data.test_subset)
    spe = steps_per_epoch(len(data.train_y), cfg.train.batch_size)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, **cfg.model.kwargs)
    sparsifier = build_sparsifier(cfg, model, spe)  # sparse storage: replaces its Linears
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    sparsifier.load_state_dict(ckpt["sparsifier"])
    meta = {"config": dump_config(cfg), "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "epoch": ckpt["epoch"], "step": ckpt["step"]}
    info = export_sparse(model.eval(), out, metadata=meta)
    # the same model's dense state_dict: sparse weights at full size, masks and CSR left out
    sparse = sparse_weights(model)
    skip = {k for k in model.state_dict() if k.endswith("_mask") or
            k.rpartition(".")[0] + ".weight" in sparse and k.rpartition(".")[2] in ("values", "crow", "col")}
    info["dense_bytes"] = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                              if k not in skip and k not in sparse) + \
        sum(s.numel() * v.element_size() for v, _, s in sparse.values())
    return info


def load_exported_run(path: str | Path) -> torch.nn.Module:
    """The model of an export written by `export_run`, for inference (no Sparsifier, no data)."""
    meta = read_header(path)["metadata"]
    if "config" not in meta:
        raise ValueError(f"{path}: no run config in the export's header (not written by "
                         "`sparsegrow export`); use sparsegrow.load_sparse with the architecture")
    raw = yaml.safe_load(meta["config"])
    m = raw["model"]
    with torch.device("meta"):
        skeleton = build_model(m["name"], tuple(meta["input_shape"]), meta["num_classes"],
                               **(m.get("kwargs") or {}))
    return load_sparse(path, skeleton)
