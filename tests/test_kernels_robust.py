"""The C kernels under stress: concurrent first builds, and bad inputs that must be a ValueError,
not a crash. Anything that could crash the interpreter before validation existed runs in a
subprocess, so a regression shows as a failed test, not a dead test run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsegrow
from sparsegrow.layers import kernels
from test_sparse_linear import backends

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


# Appended to a script that defines `cases` (name -> call): one "name|Error|message" line each.
RUN_CASES = """
for name, call in cases.items():
    try:
        call()
        print(f"{name}|no error")
    except Exception as e:
        print(f"{name}|{type(e).__name__}|{e}")
"""


def assert_value_errors(script: str, expected: dict[str, str], exact_keys: bool = True) -> None:
    """Run `script` + RUN_CASES in a fresh process; every case must raise a ValueError whose
    message matches its pattern (and, exact_keys, the script must run exactly those cases)."""
    out = finish(python(script + RUN_CASES))
    got = dict(line.split("|", 1) for line in out.strip().splitlines())
    if exact_keys:
        assert got.keys() == expected.keys()
    for name, pattern in expected.items():
        kind, _, msg = got[name].partition("|")
        assert kind == "ValueError", f"{name}: {got[name]}"
        assert re.search(pattern, msg), f"{name}: {msg!r} does not match {pattern!r}"


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


# ---------------------------------------------------------------------------------------------
# bad input to a kernel: one ValueError naming the problem, on every backend

# 3 x 4 CSR with 4 nnz; each case breaks one thing. Run in a subprocess: before validation, a
# wild index made the C kernel read far outside its arrays.
BAD_INPUT_CASES = r"""
import torch
from sparsegrow.layers import kernels
kernels.set_backend(BACKEND)
ptr, idx = torch.tensor([0, 2, 2, 4]), torch.tensor([0, 3, 1, 2])
val, xt, a = torch.randn(4), torch.randn(4, 5), torch.randn(3, 5)
big = 1 << 40
cptr, cidx = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 2, 2, 0])  # the transposed view
def grads(perm):  # both gradients in one pass; the C kernel writes dW at perm's positions
    return kernels.csc_grads(ptr, idx, cptr, cidx, perm, val, a, xt)
cases = {
    "col >= n_cols": lambda: kernels.spmm(ptr, torch.tensor([0, big, 1, 2]), val, xt, 3),
    "col < 0": lambda: kernels.spmm(ptr, torch.tensor([0, 3, -big, 2]), val, xt, 3),
    "int32 idx": lambda: kernels.spmm(ptr, idx.int(), val, xt, 3),
    "int32 ptr": lambda: kernels.sddmm(ptr.int(), idx, a, xt),
    "int16 both": lambda: kernels.sddmm(ptr.short(), idx.short(), a, xt),
    "int32 col >= n_cols": lambda: kernels.spmm(ptr.int(), torch.tensor([0, 7, 1, 2]).int(),
                                                val, xt, 3),
    "int32 col < 0": lambda: kernels.sddmm(ptr.int(), torch.tensor([0, 3, -5, 2]).int(), a, xt),
    "int32 ptr[-1] != nnz": lambda: kernels.spmm(torch.tensor([0, 2, 2, 9]).int(), idx.int(),
                                                 val, xt, 3),
    "int32 ptr decreasing": lambda: kernels.sddmm(torch.tensor([0, 3, 1, 4]).int(), idx.int(),
                                                  a, xt),
    "ptr[-1] != nnz": lambda: kernels.spmm(torch.tensor([0, 2, 2, big]), idx, val, xt, 3),
    "ptr decreasing": lambda: kernels.sddmm(torch.tensor([0, 3, 1, 4]), idx, a, xt),
    "ptr length": lambda: kernels.spmm(ptr, idx, val, xt, 5),
    "val length": lambda: kernels.spmm(ptr, idx, val[:3], xt, 3),
    "idx strided": lambda: kernels.spmm(ptr, torch.tensor([0, 9, 3, 9, 1, 9, 2, 9])[::2], val,
                                        xt, 3),
    "dtype mix": lambda: kernels.spmm(ptr, idx, val.double(), xt, 3),
    "sddmm col >= n_cols": lambda: kernels.sddmm(ptr, torch.tensor([0, 3, 1, big]), a, xt),
    "sddmm a rows": lambda: kernels.sddmm(ptr, idx, torch.randn(7, 5), xt),
    "sddmm B": lambda: kernels.sddmm(ptr, idx, a, torch.randn(4, 6)),
    "unsorted seq": lambda: kernels.searchsorted_sorted(torch.tensor([5, 1, 9]), torch.tensor([2])),
    "perm >= nnz": lambda: grads(torch.tensor([3, 0, big, 1])),
    "perm < 0": lambda: grads(torch.tensor([3, 0, 2, -1])),
    "perm length": lambda: grads(torch.tensor([3, 0, 2])),
    "perm repeats": lambda: grads(torch.tensor([3, 0, 3, 1])),
    "perm dtype": lambda: grads(torch.tensor([3, 0, 2, 1]).int()),
    "csc_grads rows": lambda: kernels.csc_grads(ptr, idx, cptr, cidx, torch.arange(4), val,
                                                torch.randn(5, 5), xt),
}
"""

EXPECTED = {
    "col >= n_cols": r"column index 1099511627776 is out of range \[0, 4\)",
    "col < 0": r"column index -1099511627776 is out of range",
    "int32 idx": r"ptr is torch.int64 but idx is torch.int32; they must match",
    "int32 ptr": r"ptr is torch.int32 but idx is torch.int64; they must match",
    "int16 both": r"ptr \(row pointer\) must be a 1-D int32 or int64 tensor, got torch.int16",
    "int32 col >= n_cols": r"column index 7 is out of range \[0, 4\)",
    "int32 col < 0": r"column index -5 is out of range \[0, 4\)",
    "int32 ptr[-1] != nnz": r"ptr must run from 0 to nnz = 4 .* ptr\[-1\] = 9",
    "int32 ptr decreasing": r"ptr must be non-decreasing, but ptr\[2\] = 1 < ptr\[1\] = 3",
    "ptr[-1] != nnz": r"ptr must run from 0 to nnz = 4 .* ptr\[-1\] = 1099511627776",
    "ptr decreasing": r"ptr must be non-decreasing, but ptr\[2\] = 1 < ptr\[1\] = 3",
    "ptr length": r"ptr has 4 entries; a matrix of 5 rows needs n_rows \+ 1 = 6",
    "val length": r"val \(3,\) must be \(nnz,\) = \(4,\)",
    "idx strided": r"idx \(column indices\) must be contiguous",
    "perm >= nnz": r"perm holds position 1099511627776, out of range \[0, 4\)",
    "perm < 0": r"perm holds position -1, out of range \[0, 4\)",
    "perm length": r"perm has 3 entries, the pattern 4",
    "perm repeats": r"perm is not a permutation of \[0, 4\): position 2 appears 0 times",
    "perm dtype": r"perm is torch.int32 on cpu but idx torch.int64 on cpu; they must match",
    "csc_grads rows": r"must be \(3, B\) and \(4, B\)",
    "dtype mix": r"xt is torch.float32 .* but val is torch.float64",
    "sddmm col >= n_cols": r"sddmm: column index 1099511627776 is out of range \[0, 4\)",
    "sddmm a rows": r"ptr has 4 entries; a matrix of 7 rows",
    "sddmm B": r"must share B",
    "unsorted seq": r"seq must be sorted",
}


@pytest.mark.parametrize("backend", backends())
def test_bad_kernel_input_is_a_value_error(backend):
    assert_value_errors(BAD_INPUT_CASES.replace("BACKEND", repr(backend)), EXPECTED)


LAYER_CASES = r"""
import copy, torch
from sparsegrow.layers import kernels, sparse_linear as sl
kernels.set_backend(BACKEND)
active = torch.tensor([0, 5, 9, 14, 22, 31, 40, 47])  # 6 x 8
def fresh():
    return sl.SparseLinear(8, 6, active, generator=torch.Generator().manual_seed(0))
def fwd_bwd(layer):
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
def col_in_place():
    layer = fresh(); fwd_bwd(layer)
    layer.col[3] = 1 << 30  # after a first call: the cached validation must notice (int32)
    fwd_bwd(layer)
def col_int64():  # the layer's indices are int32: crow and col must agree
    layer = fresh(); layer.col = layer.col.long(); fwd_bwd(layer)
def crow_in_place():
    layer = fresh(); fwd_bwd(layer)
    layer.crow[-1] = 1 << 30
    fwd_bwd(layer)
def perm_in_place():  # where backward writes dW (one pass over the columns)
    layer = fresh(); fwd_bwd(layer)
    layer.perm[2] = 1 << 20
    fwd_bwd(layer)
def row_t_in_place():  # the transposed view, read by backward only
    layer = fresh(); fwd_bwd(layer)
    layer.row_t[0] = -(1 << 30)
    fwd_bwd(layer)
def checkpoint():
    sd = copy.deepcopy(fresh().state_dict())
    sd["crow"][2] = 100
    fresh().load_state_dict(sd)
cases = dict(col_in_place=col_in_place, col_int64=col_int64, crow_in_place=crow_in_place,
             row_t_in_place=row_t_in_place, perm_in_place=perm_in_place, checkpoint=checkpoint)
"""

LAYER_EXPECTED = {
    "col_in_place": r"column index 1073741824 is out of range \[0, 8\)",
    "col_int64": r"ptr is torch.int32 but idx is torch.int64; they must match",
    "crow_in_place": r"ptr must run from 0 to nnz = 8 .* ptr\[-1\] = 1073741824",
    "row_t_in_place": r"column index -1073741824 is out of range \[0, 6\)",
    "perm_in_place": r"perm holds position 1048576, out of range \[0, 8\)",
    "checkpoint": r"checkpoint CSR is invalid: ptr must be non-decreasing",
}


@pytest.mark.parametrize("backend", backends())
def test_corrupted_sparse_linear_indices_are_a_value_error(backend):
    assert_value_errors(LAYER_CASES.replace("BACKEND", repr(backend)), LAYER_EXPECTED)


def test_full_index_check_runs_once_per_topology(monkeypatch):
    """The O(nnz) range check (torch.aminmax over the indices) runs when a topology is set,
    never in a training step on an unchanged topology."""
    from sparsegrow.layers import sparse_linear as sl
    from sparsegrow.topology import sample_inactive

    calls = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or aminmax(*a, **k))
    gen = torch.Generator().manual_seed(0)
    active = sample_inactive(40 * 30, torch.empty(0, dtype=torch.long), 200, gen)
    layer = sl.SparseLinear(30, 40, active, generator=gen)
    # (crow, col), the transposed (ccol, row_t), perm, and col before the CSC view is built
    assert len(calls) == 4
    p = sl.SparseLinearParam("w", layer)
    for step in range(6):
        calls.clear()
        layer(torch.randn(4, 30, requires_grad=True)).sum().backward()
        assert not calls, f"step {step}: the indices were range-checked again"
        if step == 2:
            a = p.active()
            grow = sample_inactive(1200, a, 10, gen)
            p.update(a[:10], grow, torch.zeros(10))
            assert len(calls) == 4


# ---------------------------------------------------------------------------------------------
# the other C kernels: compaction (exact search) and the fused conv sketch


def test_compact_into_rejects_outputs_it_would_overrun():
    from sparsegrow.search import compact

    block = torch.ones(4, 8)
    oi, ov = torch.empty(64, dtype=torch.long), torch.empty(64)
    with pytest.raises(ValueError, match="one length"):
        compact.compact_into(block, 0.5, True, 0, 8, oi, ov[:16], 0)  # C would write 32 floats
    with pytest.raises(ValueError, match="int64"):
        compact.compact_into(block, 0.5, True, 0, 8, oi.int(), ov, 0)
    with pytest.raises(ValueError, match=r"offset 65 is outside \[0, 64\]"):
        compact.compact_into(block, 0.5, True, 0, 8, oi, ov, 65)
    # float64 scores are not what C writes: the torch fallback fills them, correctly
    ov64 = torch.zeros(64, dtype=torch.float64)
    block[1, 2] = 3.0
    assert compact.compact_into(block, 2.0, True, 0, 8, oi, ov64, 5) == 1
    assert int(oi[5]) == 10 and float(ov64[5]) == 3.0


CONV_CASES = r"""
import torch
from torch import nn
from sparsegrow import conv_sketch
conv = nn.Conv2d(2, 3, 3, padding=1)
x, dz = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5)
rows = 2 * 5 * 5
bucket, sign = torch.randint(0, 4, (rows,)), torch.ones(rows)
out = (torch.zeros(4, 3), torch.zeros(4, 18))
bad = bucket.clone(); bad[7] = 1 << 40
cases = {
    "bucket range": lambda: conv_sketch.conv_sketch_into(conv, (1, 1), x, dz, bad, sign, out),
    "bucket length": lambda: conv_sketch.conv_sketch_into(conv, (1, 1), x, dz, bucket[:10], sign,
                                                          out),
    "out shape": lambda: conv_sketch.conv_sketch_into(conv, (1, 1), x, dz, bucket, sign,
                                                      (torch.zeros(4, 3), torch.zeros(4, 5))),
    "batch": lambda: conv_sketch.conv_sketch_into(conv, (1, 1), x[:1], dz, bucket, sign, out),
}
"""


def test_conv_sketch_into_rejects_what_it_would_overrun():
    from sparsegrow import conv_sketch

    if conv_sketch._lib() is None:
        pytest.skip("no C compiler")
    assert_value_errors(CONV_CASES, {
        "bucket range": r"bucket indices must lie in \[0, 4\)",
        "bucket length": r"one entry per row \(B\*Ho\*Wo = 50,\)",
        "out shape": r"S_x \(4, 18\)", "batch": r"x \(B, C, H, W\) and dz"}, exact_keys=False)


def test_compiled_layer_validates_like_eager():
    """Under torch.compile the kernels run through the custom ops: the same checks apply."""
    from sparsegrow.layers import sparse_linear as sl

    layer = sl.SparseLinear(8, 6, torch.tensor([0, 5, 9, 14, 22, 31, 40, 47]),
                            generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(compiled(x), layer(x))
    layer.col[3] = 1 << 30
    with pytest.raises(ValueError, match=r"column index 1073741824 is out of range \[0, 8\)"):
        compiled(x)
