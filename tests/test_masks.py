"""Masks live in the model: state_dict, load_state_dict and .to() carry the topology; squash()
leaves a plain dense model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.topology import MaskedParam

from test_sparsifier import ConvNet, batch, make, mlp


def _train(model, sp, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    for s in range(steps):
        x, y = batch(s)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mask_is_a_persistent_buffer_of_its_module(kind):
    model, sp = make("set", kind=kind, every=2, end=10)
    _train(model, sp, 5)
    sd = model.state_dict()
    for p in sp.params:
        assert isinstance(p, MaskedParam)
        key = p.fqn + "_mask"  # "fc.weight" -> "fc.weight_mask"
        assert sd[key].dtype == torch.bool
        assert torch.equal(torch.nonzero(sd[key].view(-1)).squeeze(1), p.active())


def test_to_moves_the_mask_with_the_model():
    model, sp = make("rigl", every=2, end=10)
    before = sp.masks()
    model.to(torch.float64)
    assert all(p.mask.dtype == torch.bool for p in sp.params)
    model.to("meta")  # a device move (no GPU here): the mask goes where the weights go
    assert all(p.mask.device.type == "meta" and p.param.device.type == "meta" for p in sp.params)
    model.to_empty(device="cpu")
    assert {f: a.device.type for f, a in sp.masks().items()} == {f: "cpu" for f in before}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_loading_a_model_state_restores_the_topology(kind):
    model_a, sp_a = make("set", kind=kind, every=2, end=10, seed=0)
    _train(model_a, sp_a, 6)
    sd = model_a.state_dict()
    # a different seed: another initial topology, replaced by the loaded one
    model_b, sp_b = make("set", kind=kind, every=2, end=10, seed=1)
    assert any(not torch.equal(sp_a.masks()[f], sp_b.masks()[f]) for f in sp_a.masks())
    # weights off the saved mask (e.g. edited by hand) are zeroed on load
    sd = {k: (v + 1 if k.endswith("weight") else v) for k, v in sd.items()}
    model_b.load_state_dict(sd)
    for p in sp_b.params:
        assert torch.equal(p.active(), sp_a.masks()[p.fqn])
        w = p.param.detach()
        assert torch.count_nonzero(w[~p.mask]) == 0
        assert torch.equal(w[p.mask], sd[p.fqn][p.mask])
    # and training continues on the loaded topology
    _train(model_b, sp_b, 3)
    assert sp_b.report()["nnz"] == sp_a.report()["nnz"]


def test_a_model_state_without_masks_still_loads():
    # checkpoints from before masks lived in the model: the Sparsifier's state restores them
    model_a, sp_a = make("set", every=2, end=10, seed=0)
    _train(model_a, sp_a, 4)
    old = {k: v for k, v in model_a.state_dict().items() if not k.endswith("_mask")}
    model_b, sp_b = make("set", every=2, end=10, seed=1)
    model_b.load_state_dict(old)
    sp_b.load_state_dict(sp_a.state_dict())
    assert all(torch.equal(sp_b.masks()[f], m) for f, m in sp_a.masks().items())


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_squash_leaves_a_plain_model_that_loads_into_a_fresh_dense_one(storage):
    torch.manual_seed(0)
    model = mlp()
    sp = sg.Sparsifier(model, 0.2, method="set", storage=storage,
                       schedule=sg.UpdateSchedule(every=2, end=10))
    _train(model, sp, 4)
    masks = sp.masks()
    x = batch(9)[0]
    with torch.no_grad():
        ref = model(x)
    out = sp.squash()
    assert out is model
    assert all(type(m) in (nn.Sequential, nn.Flatten, nn.Linear, nn.ReLU) for m in model.modules())
    assert not any(k.endswith("_mask") for k in model.state_dict())
    for p in model.parameters():
        assert not p._backward_hooks and not hasattr(p, "_sparsegrow_hook")
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())  # strict: same keys as a dense model
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)
    for fqn, active in masks.items():
        w = fresh.get_submodule(fqn.rpartition(".")[0]).weight.detach().view(-1)
        off = torch.ones_like(w, dtype=torch.bool)
        off[active] = False
        assert torch.count_nonzero(w[off]) == 0  # zeros in place (grown ones may be zero too)
    # no gradient hook is left: a dense step moves inactive weights
    loss = fresh(x).sum()
    loss.backward()
    assert all(torch.count_nonzero(m.weight.grad) > m.weight.count_nonzero()
               for m in fresh if isinstance(m, nn.Linear))
    with pytest.raises(RuntimeError, match="squashed"):
        sp.step()
