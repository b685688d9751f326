"""The Sparsifier's view of torch.distributed: reduce growth signals, check that ranks agree.

Data-parallel training keeps one model per rank; DistributedDataParallel all-reduces the (masked)
weight gradients, so weights stay equal, but everything growth reads is each rank's local batch.
The contract that keeps every rank on one topology:

- the growth signal is reduced across ranks before each update (`GrowSignals.collect`): sums of
  gradients and of random-sign sketches are summed (all-reduce; exact under summation), raw
  (dZ, X) rows are gathered (all-gather; the rows of all ranks, as if one process saw the
  global batch);
- every random choice of the topology (drop/grow ties, SET's draws, the initial pattern) comes
  from the Sparsifier's generator, seeded identically on every rank;
- after construction and after every update, a hash of each layer's active indices is
  all-reduced (max and min); any difference raises `TopologyMismatch` naming the layer.

`Collective(None)` outside an initialised process group (or with one process) does nothing, so
single-process code pays nothing. The backend is torch.distributed's: gloo (CPU tensors) or nccl
(CUDA tensors); no transport of our own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class TopologyMismatch(RuntimeError):
    """Ranks hold different active sets: they would silently train different networks."""


_K1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 (splitmix64's constants) as signed int64
_K2 = -7723592293110705685  # 0x94D049BB133111EB


def topology_hash(active: torch.Tensor) -> int:
    """An order-sensitive 64-bit hash of sorted flat indices (nnz,): equal sets, equal hashes.

    Each (position, index) pair is mixed (multiply, xor-shift, multiply; wrapping int64) and the
    mixes are summed: 4 passes over nnz, in place (~40 ms for 2.7 M indices on one core)."""
    if active.numel() == 0:
        return 0
    x = active.to(torch.int64) * _K1
    x += torch.arange(1, active.numel() + 1, device=active.device, dtype=torch.int64) * _K2
    x ^= x >> 29
    x *= _K1
    return int(x.sum()) ^ int(active.numel())


class Collective:
    """The process group the Sparsifier reduces over; a no-op for a single process.

    group: a torch.distributed ProcessGroup, or None for the default group when one is
    initialised. `enabled=False` forces single-process behaviour (e.g. independent runs per rank).
    """

    def __init__(self, group=None, enabled: bool = True):
        self.active = enabled and dist.is_available() and dist.is_initialized()
        self.group = group
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        if self.world_size == 1:
            self.active = False
        self.bytes = 0  # bytes this rank sent in collectives since the last `take_bytes()`
        self.device = torch.device("cpu")
        if self.active and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def take_bytes(self) -> int:
        b, self.bytes = self.bytes, 0
        return b

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place (one flat all-reduce per dtype and device)."""
        if not self.active or not tensors:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts]).to(self._comm(ts[0].device))
            self.bytes += flat.numel() * flat.element_size()
            dist.all_reduce(flat, group=self.group)
            off = 0
            for t in ts:
                t.copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate (R_r, D) tensors of every rank along rows, in rank order: (Σ R_r, D).

        Ranks may hold different row counts (a short last batch): counts are gathered first and
        each rank pads to the largest."""
        if not self.active:
            return t
        dev = self._comm(t.device)
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([t.shape[0]], device=dev), group=self.group)
        counts = [int(c) for c in counts]
        top = max(counts)
        pad = t.new_zeros((top,) + tuple(t.shape[1:]), device=dev)
        pad[: t.shape[0]] = t
        out = [torch.empty_like(pad) for _ in range(self.world_size)]
        self.bytes += pad.numel() * pad.element_size()
        dist.all_gather(out, pad, group=self.group)
        return torch.cat([o[:c] for o, c in zip(out, counts)]).to(t.device)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_topology(self, params, when: str) -> None:
        """Raise TopologyMismatch naming the first layer whose active set differs across ranks."""
        if not self.active:
            return
        h = torch.tensor([topology_hash(p.active()) for p in params], dtype=torch.int64,
                         device=self.device)
        both = torch.cat([h, -h])  # max of -h is -min(h): one all-reduce gives max and min
        self.bytes += both.numel() * 8
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = both[: h.numel()], -both[h.numel():]
        differ = torch.nonzero((hi != h) | (lo != h)).flatten().tolist()
        if differ:
            names = ", ".join(params[i].fqn for i in differ)
            raise TopologyMismatch(
                f"ranks hold different topologies {when} in {names} (rank {self.rank} of "
                f"{self.world_size}); every rank must build the Sparsifier with the same seed, "
                "model and arguments, and nothing else may change the masks")

    def _comm(self, device: torch.device) -> torch.device:
        # gloo reduces CPU tensors, nccl CUDA tensors: move only when the backend needs it.
        return self.device if self.device.type != device.type else device
