"""Threshold compaction: the C kernel equals the torch fallback, in order, with the overflow contract."""
import pytest
import torch

from sparsegrow.search import compact


@pytest.mark.parametrize("use_abs", [True, False])
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (64, 100)])
def test_c_kernel_equals_torch_fallback(use_abs, shape, monkeypatch):
    g = torch.Generator().manual_seed(0)
    block = torch.randn(shape, generator=g)
    tau = 1.3
    out = {}
    for kind in ("c", "torch"):
        if kind == "torch":
            monkeypatch.setattr(compact, "_lib", lambda: None)
        oi, ov = torch.full((5000,), -1, dtype=torch.long), torch.zeros(5000)
        k = compact.compact_into(block, tau, use_abs, r0=3, ld=1000, out_idx=oi, out_val=ov, offset=2)
        out[kind] = (k, oi[2:2 + k].clone(), ov[2:2 + k].clone())
    if compact._native.errors.get("compact"):
        pytest.skip("no C compiler: only the fallback runs")
    assert out["c"][0] == out["torch"][0]
    assert torch.equal(out["c"][1], out["torch"][1]) and torch.equal(out["c"][2], out["torch"][2])
    scores = block.abs() if use_abs else block
    r, c = torch.nonzero(scores >= tau, as_tuple=True)
    assert torch.equal(out["c"][1], (r + 3) * 1000 + c)  # flat index (r0 + r) * ld + c, in order


def test_overflow_reports_the_needed_count():
    block = torch.ones(4, 8)
    oi, ov = torch.empty(10, dtype=torch.long), torch.empty(10)
    assert compact.compact_into(block, 0.5, True, 0, 8, oi, ov, 0) == -32
    assert compact.compact_into(block, 2.0, True, 0, 8, oi, ov, 0) == 0
