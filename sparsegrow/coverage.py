"""Weights that are read outside their own module's forward, and what each storage/criterion needs.

Masked storage needs nothing of a module's forward: a gradient hook on the weight keeps inactive
weights at zero wherever the weight is used. Two things do need it:

  - truly sparse storage replaces an nn.Linear by a SparseLinear and an nn.Conv2d by a
    SparseConv2d (groups=1, zero padding; others are refused by SparseConv2d itself), neither of
    which has a `.weight`, so any other code reading `module.weight` fails (inside torch, far
    from the cause). Both are allowed wherever their own forward applies the weight;
  - search grow reads a layer's input X and output gradient dZ through a forward hook on the
    module, so the weight must be applied by that module's own forward as z = x Wᵀ (or a conv).

nn.MultiheadAttention applies `in_proj_weight` (QKV, (3E, E)), `q/k/v_proj_weight` and
`out_proj.weight` itself, in F.multi_head_attention_forward: `out_proj` is a Linear whose own
forward never runs. nn.TransformerEncoderLayer's inference fast path (eval mode, no grad) reads
`linear1.weight` / `linear2.weight` directly, although training runs the Linears' forwards.
`outside_uses(model)` lists these by fully qualified name; the Sparsifier refuses, at
construction and with one message, a combination that could not work.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_MHA_OWN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class OutsideUse:
    reader: str  # fqn of the module that reads the weight ("" for the model itself)
    how: str  # where, for the error message
    always: bool  # True: in every forward; False: only in an inference fast path


def outside_uses(model: nn.Module) -> dict[str, OutsideUse]:
    """{weight fqn: OutsideUse} for the weights of `model` read outside their module's forward."""
    out: dict[str, OutsideUse] = {}

    def add(prefix: str, name: str, use: OutsideUse) -> None:
        out[f"{prefix}.{name}" if prefix else name] = use

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            use = OutsideUse(name, "nn.MultiheadAttention's F.multi_head_attention_forward", True)
            for p in _MHA_OWN:
                if getattr(m, p) is not None:
                    add(name, p, use)
            add(name, "out_proj.weight", use)
        elif isinstance(m, nn.TransformerEncoderLayer):
            use = OutsideUse(name, "nn.TransformerEncoderLayer's inference fast path", False)
            for child in ("linear1", "linear2"):
                add(name, f"{child}.weight", use)
    return out


def is_attention_projection(module: nn.Module, name: str) -> bool:
    """nn.MultiheadAttention's own projection weights (QKV packed, or Q, K, V separately)."""
    return isinstance(module, nn.MultiheadAttention) and name in _MHA_OWN


def check(model: nn.Module, chosen: list[str], *, replaces_module: bool, needs_rows: bool,
          storage: str, method: str) -> None:
    """Refuse sparse weights the storage or the grow criterion cannot serve, naming them all."""
    uses = outside_uses(model)
    if replaces_module:
        bad = [f for f in chosen if f in uses]
        if bad:
            raise ValueError(
                f"storage={storage!r} replaces each nn.Linear / nn.Conv2d by a SparseLinear / "
                f"SparseConv2d without a dense .weight, but {_describe(bad, uses)}: use storage='masked', or leave them out "
                "with include=[...] (or an include filter)")
    if needs_rows:
        bad = [f for f in chosen if f in uses and uses[f].always]
        if bad:
            raise ValueError(
                f"method={method!r} grows from each layer's input and output gradient, captured "
                f"in the layer's own forward, but {_describe(bad, uses)} and never pass through "
                "a forward of their own: use method='rigl' or 'set' with storage='masked', or "
                "leave them out with include=[...] (or an include filter)")


def _describe(bad: list[str], uses: dict[str, OutsideUse]) -> str:
    by_reader: dict[tuple[str, str], list[str]] = {}
    for f in bad:
        by_reader.setdefault((uses[f].reader, uses[f].how), []).append(f)
    return "; ".join(f"{', '.join(fs)} {'is' if len(fs) == 1 else 'are'} read by "
                     f"{reader or 'the model'} ({how})" for (reader, how), fs in by_reader.items())
