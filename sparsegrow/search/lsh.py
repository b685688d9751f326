"""Sign-random-projection LSH for inner products, with the thesis's `bits` parameter.

Vectors are hashed to n_bits = round(bits * d) signs of random projections (Charikar 2002);
the Hamming similarity of two codes estimates their angle. Inner products are reduced to angles by
Simple-LSH (Neyshabur & Srebro 2015): base vectors v -> [v / U, sqrt(1 - ‖v / U‖²)] with U the
largest base norm, queries u -> [u / ‖u‖, 0]; then the angle ranks each query's neighbours by
⟨u, v⟩. Each query keeps its k best codes, re-ranked by the exact inner product. Codes are ±1
floats compared by a blocked GEMM (any device), so the cost is n_bits / d of an exact search plus
the re-ranking: with bits >= 1 it is never cheaper than exact search in torch; it is here to
reproduce the thesis and to measure recall.
"""
from __future__ import annotations

import math

import torch

from .base import BACKENDS


@BACKENDS.register("lsh", "sign-random-projection LSH (Simple-LSH for inner product), bits * d bits")
class LSHIndex:
    def __init__(self, bits: float = 1.0, seed: int = 0, block_bytes: int = 32 << 20):
        if not isinstance(bits, (int, float)) or not 0 < bits <= 64:
            raise ValueError(f"lsh bits must be in (0, 64] (hash bits per vector dimension), got {bits!r}")
        self.bits, self.seed, self.block_bytes = float(bits), seed, block_bytes

    def build(self, base: torch.Tensor) -> None:
        base = base.float()
        n, d = base.shape
        self.base = base
        self.n_bits = max(1, int(round(self.bits * d)))
        g = torch.Generator().manual_seed(self.seed)
        self.planes = torch.randn(d + 1, self.n_bits, generator=g).to(base.device)
        scaled = base / base.norm(dim=1).max().clamp(min=1e-30)
        tail = (1 - (scaled * scaled).sum(1, keepdim=True)).clamp(min=0).sqrt()
        self.codes = torch.sign(torch.cat([scaled, tail], 1) @ self.planes)  # (n, n_bits) ±1

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        qn = q / q.norm(dim=1, keepdim=True).clamp(min=1e-30)
        qcodes = torch.sign(torch.cat([qn, qn.new_zeros(len(q), 1)], 1) @ self.planes)
        k_eff = min(k, self.n)
        rows = max(1, self.block_bytes // (4 * max(self.n, k_eff * q.shape[1])))
        scores, ids = [], []
        for q0 in range(0, len(q), rows):
            sim = qcodes[q0:q0 + rows] @ self.codes.t()  # (rows, n): n_bits - 2 * Hamming
            cand = torch.topk(sim, k_eff, dim=1).indices  # (rows, k)
            ip = torch.einsum("qd,qkd->qk", q[q0:q0 + rows], self.base[cand])
            ip, order = torch.sort(ip, dim=1, descending=True)
            scores.append(ip)
            ids.append(torch.gather(cand, 1, order))
        scores, ids = torch.cat(scores), torch.cat(ids)
        if k_eff < k:
            scores = torch.cat([scores, scores.new_full((len(q), k - k_eff), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((len(q), k - k_eff), -1)], 1)
        return scores, ids

    @property
    def n(self) -> int:
        return self.base.shape[0]
