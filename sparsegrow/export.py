"""A trained sparse model as a compact file, and back for inference without the training machinery.

    sparsegrow.export_sparse(model, "model.safetensors", metadata={"config": ...})
    with torch.device("meta"):          # the architecture only: no dense weight is allocated
        skeleton = MyNet()
    model = sparsegrow.load_sparse("model.safetensors", skeleton)

The file is safetensors. Per sparse weight `<fqn>` (a masked weight, i.e. one whose module holds
`<name>_mask`, or a SparseLinear's / SparseConv2d's weight):
    <fqn>.values   (nnz,)  the active weights, in the order of the sorted flat indices
    <fqn>.indices  (nnz,)  their flat indices into the dense shape, int32 where they fit
Every other tensor of the model's state_dict is stored as is (masks and CSR buffers are not).
The header's metadata "sparsegrow" is JSON: {"format": 1, "sparse": {fqn: {"shape": [...]}},
"metadata": <the caller's dict>} (e.g. the run's config, to rebuild the architecture).

`load_sparse` fills a skeleton of the same architecture: a Linear whose weight is used by its own
forward becomes a SparseLinear (values + CSR), a Conv2d (groups=1, zero padding) a SparseConv2d;
every other sparse weight (grouped convolutions, attention projections) is written densely with
zeros in place into the plain module. No mask, hook or
Sparsifier is involved; the model is returned in eval mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .coverage import outside_uses
from .layers.sparse_conv import SparseConv2d
from .layers.sparse_linear import CSRModule, SparseLinear, _replace_module
from .topology import mask_buffer_name

FORMAT = 1


def sparse_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]]:
    """{fqn: (values (nnz,), sorted flat indices (nnz,), dense shape)} of every sparse weight."""
    out = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, CSRModule):
            out[prefix + "weight"] = (m.values.detach(), m.active(), m.shape)
            continue
        for p_name, p in m.named_parameters(recurse=False):
            mask = m._buffers.get(mask_buffer_name(p_name))
            if mask is not None:
                idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
                out[prefix + p_name] = (p.detach().reshape(-1)[idx], idx, p.shape)
    return out


def export_sparse(model: nn.Module, path: str | Path, metadata: dict | None = None) -> dict:
    """Write `model`'s weights to `path` (safetensors), sparse weights as values + indices.

    Returns {"bytes": file size, "nnz": active sparse weights, "numel": their dense size}.
    """
    from safetensors.torch import save_file

    sparse = sparse_weights(model)
    skip = set()
    tensors: dict[str, torch.Tensor] = {}
    for fqn, (values, idx, shape) in sparse.items():
        numel = int(torch.Size(shape).numel())
        index_dtype = torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64
        tensors[f"{fqn}.values"] = values.detach().cpu().contiguous().clone()
        tensors[f"{fqn}.indices"] = idx.cpu().to(index_dtype).contiguous()
        skip.add(fqn)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, CSRModule):
            skip.update(prefix + k for k in ("values", "crow", "col"))
        for p_name in m._parameters:
            skip.add(prefix + mask_buffer_name(p_name))
    for k, v in model.state_dict().items():
        if k not in skip:
            if k in tensors:
                raise ValueError(f"{k}: the state_dict key collides with a sparse weight's entry")
            tensors[k] = v.detach().cpu().contiguous().clone()
    header = {"format": FORMAT,
              "sparse": {f: {"shape": list(s)} for f, (_, _, s) in sparse.items()},
              "metadata": metadata or {}}
    path = Path(path)
    save_file(tensors, str(path), metadata={"sparsegrow": json.dumps(header)})
    return {"bytes": path.stat().st_size,
            "nnz": sum(v.numel() for v, _, _ in sparse.values()),
            "numel": sum(int(torch.Size(s).numel()) for _, _, s in sparse.values())}


def read_header(path: str | Path) -> dict:
    """The export's JSON header (format, sparse shapes, the caller's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "sparsegrow" not in meta:
        raise ValueError(f"{path}: not a sparsegrow export (no 'sparsegrow' header metadata)")
    header = json.loads(meta["sparsegrow"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {header.get('format')!r}, this version reads {FORMAT}")
    return header


def load_sparse(path: str | Path, model: nn.Module, device=None) -> nn.Module:
    """Fill `model` (the architecture, e.g. built on the meta device) from an export; see module doc."""
    from safetensors.torch import load_file

    header = read_header(path)
    tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    outside = outside_uses(model)
    state: dict[str, torch.Tensor] = {}
    for fqn, info in header["sparse"].items():
        shape = torch.Size(info["shape"])
        values = tensors.pop(f"{fqn}.values")
        idx = tensors.pop(f"{fqn}.indices").long()
        mod_name, _, p_name = fqn.rpartition(".")
        module = model.get_submodule(mod_name)
        own = p_name == "weight" and fqn not in outside and mod_name
        conv = (type(module) is nn.Conv2d and module.groups == 1
                and module.padding_mode == "zeros")
        if own and (type(module) is nn.Linear or conv):
            bias = tensors.pop(f"{mod_name}.bias", None)
            bias = bias if bias is not None else False
            if conv:
                layer = SparseConv2d(shape[1], shape[0], module.kernel_size, idx, values, bias,
                                     stride=module.stride, padding=module.padding,
                                     dilation=module.dilation, device=values.device)
            else:
                layer = SparseLinear(shape[1], shape[0], idx, values, bias, device=values.device)
            _replace_module(model, mod_name, layer)
            state.update({f"{mod_name}.{k}": v for k, v in layer.state_dict().items()})
        else:  # written densely, zeros in place: a plain module
            dense = values.new_zeros(shape)
            dense.view(-1)[idx] = values
            state[fqn] = dense
    state.update(tensors)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
