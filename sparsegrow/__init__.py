"""sparsegrow: train sparse neural networks from scratch.

Every chosen layer is sparse from the first step to the last; the topology evolves by dropping
weak connections and growing promising ones (SET, RigL, search-based growth, DST).
"""
from .distributions import DISTRIBUTIONS, layer_counts, layer_densities
from .drop import DROP
from .grow import GROW, GrowContext
from .optim_state import register_optimizer
from .schedules import UpdateSchedule
from .topology import MaskedParam, SparseParam
from .updater import METHODS, STORAGES, Sparsifier, sparsify
from . import search_grow  # registers grow criterion and method "search"
from .dst import DSTSparsifier, build_dst
from .layers.dst import DSTConv2d, DSTLinear
from .layers.sparse_linear import SparseLinear, to_masked, to_sparse  # registers storage "sparse"
from .layers.sparse_conv import SparseConv2d
from .export import export_sparse, load_sparse
from .fan_in import active_fan_in, fan_in_lr_scales, split_param_groups

__all__ = [
    "DISTRIBUTIONS", "DROP", "active_fan_in", "fan_in_lr_scales", "split_param_groups", "DSTConv2d", "DSTLinear", "DSTSparsifier", "GROW", "METHODS", "STORAGES", "GrowContext", "MaskedParam",
    "SparseConv2d", "SparseLinear", "SparseParam", "Sparsifier", "UpdateSchedule", "build_dst", "export_sparse", "layer_counts", "load_sparse", "layer_densities", "register_optimizer", "sparsify", "to_masked", "to_sparse",
]
__version__ = "0.1.0"
