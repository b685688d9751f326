"""Run directories: atomic writes, the metrics log, and reading finished runs back.

A run directory holds config.yaml (the resolved config), metrics.jsonl (one JSON object per
epoch and per topology update, append-only), checkpoint.pt and, once finished, summary.json.
Every file but the log is replaced atomically (write a temporary file, fsync, os.replace), so an
interrupted run never leaves a half-written file; the checkpoint records the log's length, and a
resumed run truncates the log to it, dropping lines written after the last checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


class MetricsLog:
    """Append-only JSON-lines log whose committed length is kept in the checkpoint."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if self.path.exists() else "w+b"
        self._f = open(self.path, mode)
        self._f.truncate(truncate_to or 0)
        self._f.seek(0, os.SEEK_END)

    def write(self, record: dict) -> None:
        self._f.write((json.dumps(record, sort_keys=True) + "\n").encode())

    def commit(self) -> int:
        """Flush to disk; returns the length to record in the checkpoint."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_runs(paths) -> list[Path]:
    """Every directory holding a summary.json at or below the given paths, sorted."""
    found = set()
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.add(p)
        elif p.is_dir():
            found.update(s.parent for s in p.rglob("summary.json"))
        else:
            raise FileNotFoundError(f"{str(p)!r} is neither a run directory nor a folder of runs")
    return sorted(found)


def load_run(run_dir: Path) -> dict:
    import yaml

    run_dir = Path(run_dir)
    return {
        "dir": str(run_dir),
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }
