"""Multi-process (data-parallel) runs: `torchrun --nproc_per_node N -m sparsegrow train CONFIG` or
`sparsegrow train CONFIG --nproc N`, which starts the same through torch's own launcher.

Every rank runs the same config. The global batch (`train.batch_size`) is split across ranks in
rank order, so the data order is that of a 1-process run; DistributedDataParallel averages the
gradients, the Sparsifier reduces its growth signal and checks that the ranks' topologies agree.
Only rank 0 writes run files and shows progress; every rank reads the checkpoint on --resume.
Backends: gloo on CPU (`train.device=cpu`), nccl on CUDA (`train.device=cuda`: rank r uses GPU
LOCAL_RANK).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env(device: str) -> World:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else a
    1-process World. Returns the world; device "cuda" binds this rank to GPU LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local)


def shutdown(world: World) -> None:
    """Leave the process group together: a rank that tears gloo down while another is still
    evaluating or writing aborts ("terminate called without an active exception"). The gloo
    barrier alone still raced under load (a rank that returned from it destroyed the group while
    its peer was still receiving the barrier's last message): a barrier on the rendezvous store,
    which gloo does not carry, follows it, so no rank leaves before every rank is done with gloo."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        _store_barrier(world, "sparsegrow/shutdown")
        dist.destroy_process_group()


def _store_barrier(world: World, key: str, timeout_s: float = 300.0) -> None:
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    t0 = time.monotonic()
    while store.add(key, 0) < world.size:
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"rank {world.rank}: the other ranks did not reach the shutdown "
                               f"barrier within {timeout_s:.0f} s")
        time.sleep(0.01)


def local_share(x: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous share of a global batch (rank order): (B / size, ...)."""
    if not world.distributed:
        return x
    return x.tensor_split(world.size)[world.rank]


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over ranks of a few Python numbers (e.g. loss sums, correct counts)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m sparsegrow <argv>` on `nproc` local processes through torch.distributed.run
    (torchrun's own launcher, standalone rendezvous); returns its exit status."""
    from torch.distributed import run

    args = ["--standalone", "--nproc_per_node", str(nproc), "-m", "sparsegrow", *argv]
    try:
        run.main(args)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError: the failing rank's error was already printed
        print(f"sparsegrow: error: a rank failed ({type(e).__name__})", file=sys.stderr)
        return 1
    return 0
