"""Several processes under `torchrun`: the process group, data sharding, DDP and who writes.

`imm train` runs unchanged under `torchrun --nproc_per_node N` (the launcher sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). Outside torchrun nothing here does anything.

- Backend: nccl on CUDA (process r uses cuda:LOCAL_RANK), gloo on CPU.
- `--batch-size` is the GLOBAL batch (segments per optimizer step over all processes): every process
  draws the same global batch from the same seeded generators and keeps its own contiguous share of
  episodes (rank r takes episodes [r*E/N, (r+1)*E/N)). So each process trains on different episodes,
  and an N-process run is the same computation as a 1-process run with the same flags (same
  episodes, gradients averaged), up to float summation order. A run can resume on another number of
  processes and go on with the same data stream.
- One DDP forward per step: the whole episode (all segments, the memory state carried through them)
  is one `EpisodeLoss` module call, so DDP sees a single forward and a single backward and averages
  the gradients once. The memory state is created inside that call (the memory's `init_state`), per
  sequence, and is never communicated.
- Only rank 0 prints, logs metrics and writes checkpoints (from the unwrapped model); every rank
  evaluates (same episodes, same figures) so they stay in step without extra communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from imm_cli.errors import InputError


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return rank, world, local


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (who prints and writes)."""
    return env_world()[0] == 0


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # this process's device (cuda:LOCAL_RANK under torchrun on GPUs)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the global batch (dimension 0: episodes)."""
        if not self.enabled:
            return x
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a (detached) tensor over all processes."""
        if not self.enabled:
            return value
        v = value.detach().clone()
        torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.SUM)
        return v / self.world

    def any(self, flag: bool) -> bool:
        """True when any process says so (a stop request seen by one process stops them all, same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            try:  # wait for process 0's final save: tearing gloo down under a busy peer can abort
                torch.distributed.barrier()
            except RuntimeError:
                pass  # a peer already failed; its error is the one to report
            torch.distributed.destroy_process_group()


def setup(device: torch.device) -> Dist:
    """Join the process group when started by torchrun; returns who we are and the device to use."""
    rank, world, local = env_world()
    if world <= 1:
        return Dist(device=device)
    if not torch.distributed.is_available():
        raise InputError("this torch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise InputError(f"torchrun with --device {device.type} is not supported; use cpu or cuda")
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    d = Dist(rank=rank, world=world, device=device)
    d.barrier()  # every process has passed its checks before rank 0 writes anything
    return d


class EpisodeLoss(nn.Module):
    """The whole episode as one module call, so DDP sees one forward and one backward per step."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor, gap: int = 0) -> torch.Tensor:
        return self.loss_fn(self.model, x, y, gap)[0]


def wrap(model: nn.Module, loss_fn, dist: Dist, compile_fn=None):
    """A callable (x, y) -> loss: DDP-wrapped when distributed, the plain episode loss otherwise;
    `compile_fn` (torch.compile) compiles the whole episode loss, model call included."""
    module = EpisodeLoss(model, loss_fn)
    if compile_fn is not None:
        module = compile_fn(module)
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    # every parameter gets a gradient every step (checked for both memory kinds and --slots 0), so
    # find_unused_parameters stays off; the model has no buffers to broadcast
    return DDP(module, device_ids=ids, broadcast_buffers=False)
