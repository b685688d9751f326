"""Run directories: atomic writes, the metrics log, and reading finished runs back.

A run directory holds config.yaml (the resolved config), metrics.jsonl (one JSON object per
epoch and per topology update, append-only), checkpoint.pt and, once finished, summary.json.
Every file but the log is replaced atomically (write a temporary file, fsync, os.replace), so an
interrupted run never leaves a half-written file; the checkpoint records the log's length, and a
resumed run truncates the log to it, dropping lines written after the last checkpoint.

Reading a file that is damaged (truncated, edited, not written by sparsegrow) raises
CorruptFileError: one line naming the file and what is wrong, never a half-read result.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch


class CorruptFileError(ValueError):
    """A run file that cannot be read; the message names the file."""


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


def read_json(path: Path) -> dict:
    """A JSON object from `path` (summary.json), or CorruptFileError."""
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: should hold a JSON object, holds {type(obj).__name__}")
    return obj


def _parse_lines(path: Path, data: bytes) -> list[dict]:
    records = []
    for i, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise CorruptFileError(f"{path}: line {i} is not valid JSON (not UTF-8 text)") from None
        if not isinstance(rec, dict):
            raise CorruptFileError(f"{path}: line {i} should be a JSON object, is {type(rec).__name__}")
        records.append(rec)
    return records


CHECKPOINT_KEYS = {"model", "optimizer", "sparsifier", "torch_rng", "epoch", "step", "train_time_s",
                   "phases", "log_len"}  # what every checkpoint holds; newer ones add to it


def load_checkpoint(path: Path, map_location) -> dict:
    """A training checkpoint, or CorruptFileError naming the file (truncated, not a checkpoint)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by damage
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CorruptFileError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {reason}); "
                               "delete it and train without --resume to start afresh") from None
    missing = sorted(CHECKPOINT_KEYS - set(ckpt)) if isinstance(ckpt, dict) else ["all keys"]
    if missing:
        raise CorruptFileError(f"{path}: not a sparsegrow checkpoint (missing {', '.join(missing)})")
    return ckpt


class MetricsLog:
    """Append-only JSON-lines log whose committed length is kept in the checkpoint.

    truncate_to: continue a log after a checkpoint that recorded this length; the committed part
    must be intact (CorruptFileError otherwise), what follows it is dropped.
    """

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < truncate_to:  # truncate() would pad with zero bytes
                raise CorruptFileError(f"{self.path}: {size} bytes, but the checkpoint recorded "
                                       f"{truncate_to}; the log was cut or replaced")
            with open(self.path, "rb") as f:
                _parse_lines(self.path, f.read(truncate_to))
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
    return _parse_lines(path, path.read_bytes())


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
    from .config import read_yaml

    run_dir = Path(run_dir)
    config = read_yaml(run_dir / "config.yaml")
    if not isinstance(config, dict):
        raise CorruptFileError(f"{run_dir / 'config.yaml'}: should hold a mapping, holds {type(config).__name__}")
    return {"dir": str(run_dir), "config": config, "summary": read_json(run_dir / "summary.json")}
