"""Maximum-inner-product search backends behind one contract; exact search is the oracle.

`BACKENDS` lists every backend (`names()` feeds the contract tests); `top_pairs` runs the growth
search through any of them. faiss and hnswlib are optional extras: `pip install sparsegrow[search]`.
"""
from . import auto, exact, faiss_index, hnsw, lowrank, lsh, sampled  # noqa: F401  (register)
from .base import BACKENDS, METRICS, TopPool
from .exact import ExactIndex, exact_top_pairs
from .pairs import top_pairs, uses_k_similar

__all__ = ["BACKENDS", "METRICS", "ExactIndex", "TopPool", "exact_top_pairs", "top_pairs", "uses_k_similar"]
