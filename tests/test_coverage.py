"""Every method x storage on a small Transformer encoder classifier: it trains with the exact
density and zeros off the active set, or it is refused at construction naming the module."""
import math

import pytest
import torch
from torch import nn

import sparsegrow as sg
from sparsegrow import coverage, distributions


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):  # (B, T) -> (B, classes)
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)


def _sparsifier(model, method, storage):
    kwargs = {}
    if method == "search":
        kwargs["grow_kwargs"] = {"backend": "exact"}
    return sg.Sparsifier(model, 0.3, method=method, storage=storage, seed=0,
                         schedule=sg.UpdateSchedule(every=2, end=6, fraction=0.3), **kwargs)


# (method, storage) pairs refused at construction, and what the message must name
REFUSED = {
    ("search", "masked"): ("self_attn.in_proj_weight", "method='rigl' or 'set'"),
    **{(m, "sparse"): ("self_attn.out_proj.weight", "storage='masked'") for m in sg.METHODS.names()},
}


@pytest.mark.parametrize("storage", sg.STORAGES.names())
@pytest.mark.parametrize("method", sg.METHODS.names())
def test_transformer_every_method_and_storage_trains_or_is_refused(method, storage):
    torch.manual_seed(0)
    model = TinyTransformer()
    spec = sg.METHODS.get(method)
    if spec.make is not None:  # a sparsifier of its own kind (DST): refused at the attention
        with pytest.raises(ValueError, match="self_attn"):
            spec.make(model, seed=0)
        return
    if (method, storage) in REFUSED:
        name, alternative = REFUSED[(method, storage)]
        with pytest.raises(ValueError) as err:
            _sparsifier(model, method, storage)
        msg = str(err.value)
        assert name in msg and "encoder.layers.0.self_attn" in msg and alternative in msg
        assert "include=" in msg
        return
    sp = _sparsifier(model, method, storage)
    fqns = {p.fqn for p in sp.params}
    # no silent dense weight in a sparsified layer: QKV and out_proj are sparse too
    for i in range(2):
        assert {f"encoder.layers.{i}.self_attn.in_proj_weight",
                f"encoder.layers.{i}.self_attn.out_proj.weight"} <= fqns
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp.attach(opt)
    x, y = _data()
    counts = {p.fqn: p.nnz() for p in sp.params}
    total = sum(p.numel for p in sp.params)
    assert list(counts.values()) == sp.target_counts()
    if spec.fan_in == "free" and not spec.prune:  # GMP starts dense; constant fan-in rounds per unit
        assert sum(counts.values()) == round((1.0 if method == "dense" else 0.3) * total)
    updates = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates.append(sp.step())
    if spec.prune:
        assert any(u is not None and u["dropped"] > 0 for u in updates)
    elif sp.dynamic:
        assert any(u is not None and u["grown"] > 0 for u in updates)
    assert [p.nnz() for p in sp.params] == sp.target_counts()
    for p in sp.params:
        w = p.param.detach().view(-1)
        off = torch.ones(p.numel, dtype=torch.bool)
        off[p.active()] = False
        assert torch.count_nonzero(w[off]) == 0, p.fqn
    model.eval()  # the encoder's inference fast path reads the weights directly
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_outside_uses_names_attention_and_fast_path_weights():
    uses = coverage.outside_uses(TinyTransformer())
    assert uses["encoder.layers.1.self_attn.in_proj_weight"].always
    assert uses["encoder.layers.0.self_attn.out_proj.weight"].always
    assert not uses["encoder.layers.0.linear1.weight"].always
    assert "head.weight" not in uses and "embed.weight" not in uses


def test_feedforward_only_is_fine_for_search():
    # leaving the attention out with include= makes search grow work on the rest
    model = TinyTransformer()
    sp = sg.Sparsifier(model, 0.3, method="search", grow_kwargs={"backend": "exact"},
                       include=lambda m, n: isinstance(m, nn.Linear) and n == "weight"
                       and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear),
                       schedule=sg.UpdateSchedule(every=1, end=3, fraction=0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach(opt)
    x, y = _data()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert sp.step()["grown"] > 0
