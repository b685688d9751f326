"""hnswlib (Malkov & Yashunin 2018) behind the common contract. Optional: pip install sparsegrow[search]."""
from __future__ import annotations

import numpy as np
import torch

from .base import BACKENDS, require


@BACKENDS.register("hnswlib", "hnswlib HNSW graph, inner-product space (ef >= k)")
class HnswlibIndex:
    def __init__(self, hnsw_m: int = 16, ef_construction: int = 100, ef_search: int = 64,
                 seed: int = 0):
        self.hnswlib = require("hnswlib", "hnswlib")
        self.hnsw_m, self.ef_construction, self.ef_search, self.seed = (
            hnsw_m, ef_construction, ef_search, seed)

    def build(self, base: torch.Tensor) -> None:
        xb = np.ascontiguousarray(base.detach().float().cpu().numpy())
        self.device = base.device
        index = self.hnswlib.Index(space="ip", dim=xb.shape[1])
        index.init_index(max_elements=xb.shape[0], ef_construction=self.ef_construction,
                         M=self.hnsw_m, random_seed=self.seed)
        index.set_num_threads(torch.get_num_threads())
        index.add_items(xb)
        self.index, self.n = index, xb.shape[0]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_eff = min(k, self.n)
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        # In inner-product space the graph may reach fewer than k vectors from some query;
        # hnswlib then refuses the whole batch. Widen ef, then ask for fewer (padded with -1).
        tries = [(max(self.ef_search, k_eff), k_eff), (max(self.ef_search, 4 * k_eff), k_eff)]
        while tries[-1][1] > 1:
            tries.append((self.n, tries[-1][1] // 2))
        for ef, k_eff in tries:
            self.index.set_ef(ef)
            try:
                labels, dist = self.index.knn_query(q, k=k_eff)
                break
            except RuntimeError:
                if k_eff == 1:
                    raise
        scores = torch.from_numpy(1.0 - dist).float()  # hnswlib's ip distance is 1 - <q, v>
        ids = torch.from_numpy(labels.astype(np.int64))
        if k_eff < k:
            scores = torch.cat([scores, torch.full((len(q), k - k_eff), -float("inf"))], 1)
            ids = torch.cat([ids, torch.full((len(q), k - k_eff), -1, dtype=torch.long)], 1)
        return scores.to(self.device), ids.to(self.device)
