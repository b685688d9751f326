"""The fused Conv2d sketch equals the unfolding path: same buckets, signs and sums."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparsegrow import conv_sketch, signals
from sparsegrow.signals import LayerSignal

pytestmark = pytest.mark.skipif(conv_sketch._lib() is None, reason="no C compiler")


def _capture(conv, x, sketch_dim, fused, monkeypatch, seed=0):
    if not fused:
        monkeypatch.setattr(signals, "conv_sketch_applies", lambda x, dz: False)
    sig = LayerSignal(conv, conv.weight.shape, "conv", sketch_dim=sketch_dim,
                      generator=torch.Generator().manual_seed(seed))
    sig.arm(True)
    out = conv(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    Z, X = sig.rows()
    monkeypatch.undo()
    return Z, X


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 5), cout=st.integers(1, 6), k=st.sampled_from([1, 2, 3, 5]),
       stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
       hw=st.integers(5, 11), batch=st.integers(1, 4), s=st.integers(1, 9))
def test_fused_sketch_equals_unfolded(cin, cout, k, stride, pad, dil, hw, batch, s):
    mp = pytest.MonkeyPatch()
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil)
    if (hw + 2 * pad - dil * (k - 1) - 1) < 0:
        return
    x = torch.randn(batch, cin, hw, hw)
    rows_out = conv(x).numel() // cout
    if rows_out <= s:  # the signal keeps raw rows when they are fewer than the sketch
        return
    Zf, Xf = _capture(conv, x, s, True, mp)
    Zu, Xu = _capture(conv, x, s, False, mp)
    assert Zf.shape == Zu.shape == (s, cout) and Xf.shape == Xu.shape == (s, cin * k * k)
    torch.testing.assert_close(Zf, Zu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Xf, Xu, rtol=1e-5, atol=1e-5)


def test_fused_sketch_chunks_like_unfolding(monkeypatch):
    # 32x32 outputs: 64 samples per 65536-row chunk, so batch 130 spans three chunks and the
    # generator must be drawn chunk by chunk in both paths.
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(130, 2, 32, 32)
    Zf, Xf = _capture(conv, x, 16, True, monkeypatch)
    Zu, Xu = _capture(conv, x, 16, False, monkeypatch)
    torch.testing.assert_close(Zf, Zu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Xf, Xu, rtol=1e-4, atol=1e-4)


def test_fused_sketch_estimates_the_weight_gradient(monkeypatch):
    # The sketch's Zᵀ X is an unbiased estimate of the weight gradient: averaged over seeds it
    # comes close to the true gradient read from autograd.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(4, 3, 8, 8)
    w = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (conv(x) * w).sum().backward()
    G = conv.weight.grad.reshape(4, -1)
    est = torch.zeros_like(G)
    for seed in range(200):
        conv.weight.grad = None
        Z, X = _capture(conv, x, 32, True, monkeypatch, seed=seed)
        est += Z.T @ X / 200
    assert torch.linalg.norm(est - G) < 0.25 * torch.linalg.norm(G)


def test_conv_sketch_into_rejects_other_dtypes():
    conv = nn.Conv2d(1, 1, 3)
    x, dz = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 3, 3)
    out = (torch.zeros(2, 1), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="float32"):
        conv_sketch.conv_sketch_into(conv, (0, 0), x, dz, torch.zeros(9, dtype=torch.int64),
                                     torch.ones(9, dtype=torch.float64), out)
