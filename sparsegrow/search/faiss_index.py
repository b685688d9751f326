"""faiss indexes behind the common contract: flat inner product, IVF, HNSW, and range search.

faiss (Johnson, Douze, Jégou 2019) is the library the thesis used. It is optional:
`pip install sparsegrow[search]`. Vectors cross to numpy float32 on the CPU and results come back
to the caller's device. faiss's "distance" for METRIC_INNER_PRODUCT is the inner product itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import BACKENDS, require


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class FaissIndex:
    """kind: "flat" (exact per query), "ivf" (inverted lists), "hnsw" (graph)."""

    def __init__(self, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                 hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 40, seed: int = 0):
        self.faiss = require("faiss", f"faiss-{kind}")
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown faiss index kind {kind!r}; allowed: flat, ivf, hnsw")
        self.kind, self.nlist, self.nprobe = kind, nlist, nprobe
        self.hnsw_m, self.ef_search, self.ef_construction, self.seed = (
            hnsw_m, ef_search, ef_construction, seed)
        self.index = None

    def build(self, base: torch.Tensor) -> None:
        faiss = self.faiss
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.device = base.device
        xb = _np(base)
        n, d = xb.shape
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, ip)
            index.hnsw.efConstruction = self.ef_construction
        else:
            nlist = self.nlist or max(1, min(int(round(math.sqrt(n))), n // 39 or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
            index.cp.seed = self.seed
            index.train(xb)
            index.nprobe = self.nprobe or max(1, math.ceil(nlist / 4))
        index.add(xb)
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        D, I = self.index.search(_np(queries), k)
        return torch.from_numpy(D).to(self.device), torch.from_numpy(I).long().to(self.device)

    def range_search(self, queries: torch.Tensor, threshold: float):
        """Every base vector with inner product > threshold, per query (CSR-like lims)."""
        lims, D, I = self.index.range_search(_np(queries), float(threshold))
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return to(lims.astype(np.int64)), to(D), to(I.astype(np.int64))


@BACKENDS.register("faiss-flat", "faiss IndexFlatIP: exact per-query top-k (the thesis's search)")
def faiss_flat(**kw):
    return FaissIndex("flat", **kw)


@BACKENDS.register("faiss-ivf", "faiss IndexIVFFlat: inverted lists, nprobe of nlist probed")
def faiss_ivf(**kw):
    return FaissIndex("ivf", **kw)


@BACKENDS.register("faiss-hnsw", "faiss IndexHNSWFlat: graph search (efSearch >= k)")
def faiss_hnsw(**kw):
    return FaissIndex("hnsw", **kw)


@BACKENDS.register("faiss-range", "faiss IndexFlatIP range search above a global threshold")
def faiss_range(**kw):
    index = FaissIndex("flat", **kw)
    index.mode = "range"
    return index
