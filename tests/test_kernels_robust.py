"""The C kernels under stress: concurrent first builds, and bad inputs that must be a ValueError,
not a crash. Anything that could crash the interpreter before validation existed runs in a
subprocess, so a regression shows as a failed test, not a dead test run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsegrow
from sparsegrow.layers import kernels

REPO = Path(sparsegrow.__file__).resolve().parents[1]  # the checkout under test, not an install


def python(code: str, **env) -> subprocess.Popen:
    """Start `code` in a fresh interpreter that imports this checkout's sparsegrow."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SPARSEGROW_KERNELS="auto", **env)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-3000:]}"
    return out


# ---------------------------------------------------------------------------------------------
# first build: two processes, one empty cache


def test_two_processes_build_into_one_empty_cache_once(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the kernels fall back to torch")
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "slow-cc"  # logs each build and holds it open long enough to overlap
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nsleep 2\nexec "{cc}" "$@"\n')
    wrapper.chmod(0o755)
    cache = tmp_path / "cache"  # does not exist yet
    code = f"""
        import pathlib, time, torch
        from sparsegrow.layers import kernels
        # start the build in both processes at the same moment
        gate = pathlib.Path({str(tmp_path)!r})
        (gate / f"ready-{{__import__('os').getpid()}}").touch()
        while len(list(gate.glob("ready-*"))) < 2:
            time.sleep(0.01)
        kernels.set_backend("c")  # raises unless the C library loaded
        ptr, idx = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1])
        val, xt = torch.tensor([1.0, 2.0, 3.0]), torch.arange(6.0).reshape(3, 2)
        assert torch.equal(kernels.spmm(ptr, idx, val, xt, 2),
                           kernels.spmm_reference(ptr, idx, val, xt, 2))
        print("ok")
    """
    procs = [python(code, CC=str(wrapper), SPARSEGROW_CACHE=str(cache)) for _ in range(2)]
    for p in procs:
        assert finish(p).strip() == "ok"
    builds = [line for line in log.read_text().splitlines() if "kernels.c" in line]
    assert len(builds) == 1, f"the compiler ran {len(builds)} times for one library"
    assert len(list(cache.glob("kernels_*.so"))) == 1
