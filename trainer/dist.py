"""The training processes: one per device, started by torchrun (or a single one without it).

Under torchrun each process joins the process group (gloo on CPU, NCCL on GPU) and takes its LOCAL_RANK's GPU; the
helpers here are the collectives the loop needs besides DDP's gradient all-reduce. Each is a no-op for one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from odis.devices import pick_device


@dataclass
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1  # the number of processes
    local_rank: int = 0  # its index on its node: the GPU it takes

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder and logs."""
        return self.rank == 0


def process_group_backend(device: str) -> str:
    """NCCL for GPUs (`auto` included: the default recipes say auto), gloo for CPU processes."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_gpu else "gloo"


def setup_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment (a no-op for one process)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def training_device(requested: str, proc: Dist) -> torch.device:
    """odis.devices.pick_device for this process (its LOCAL_RANK's GPU under torchrun), made current."""
    device = torch.device(pick_device(requested, proc.local_rank if proc.world > 1 else None))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def wrap_ddp(module: torch.nn.Module, device: torch.device, proc: Dist) -> torch.nn.Module:
    """The module the loop calls: DDP-wrapped under torchrun (after the checkpoint has loaded)."""
    if proc.world == 1:
        return module
    # Buffers (the centers) are all-reduced by the loss itself, not re-broadcast from rank 0 every forward; the
    # one sync at init is harmless: every rank starts from the same seed or checkpoint.
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


def gather(obj, proc: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if proc.world == 1:
        return [obj]
    out = [None] * proc.world
    dist.all_gather_object(out, obj)
    return out


def all_finite(loss: torch.Tensor, proc: Dist) -> bool:
    """Whether the loss is finite on every rank: they must agree to skip a step, or DDP's gradient all-reduce
    would hang."""
    ok = torch.isfinite(loss.detach()).float()
    if proc.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def check_ranks_agree(module: torch.nn.Module, proc: Dist) -> None:
    """DDP keeps replicas identical; a silent divergence (e.g. a rank skipping a step alone, or centers that were
    not all-reduced: buffers are checked too) must not pass."""
    if proc.world == 1:
        return
    sums = gather([float(t.detach().double().sum()) for t in (*module.parameters(), *module.buffers())], proc)
    if any(s != sums[0] for s in sums[1:]):
        raise RuntimeError("the processes ended with different weights or centers: the replicas diverged")


def barrier(proc: Dist) -> None:
    if proc.world > 1:
        dist.barrier()


def finish(proc: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if proc.world > 1:
        dist.barrier()
        dist.destroy_process_group()
