"""Process groups for one tensor/expert-parallel model: init from the launcher's environment
(torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, LOCAL_RANK), nccl on CUDA, gloo on CPU.

NVLink multicast (NVLS) stays off: on shared hosts a program using it can take the GPUs out of
service, so the variables are forced before NCCL is first touched, not merely defaulted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptoss_engine.parallel.topology import ParallelConfigError, Topology

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelGroups:
    topology: Topology
    device: torch.device
    attention: dist.ProcessGroup | None   # this rank's attention TP group; None when not split
    moe: dist.ProcessGroup | None         # all ranks; None when world_size == 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_parallel(attention_tp_size: int, moe_ep_size: int, device: str = "cpu", timeout_s: float = 600.0,
                  backend: str | None = None, ranks_per_gpu: int = 1) -> ParallelGroups:
    """Join the job the launcher started (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and build
    the groups. Every rank must call this with the same sizes. On CUDA the rank's GPU is
    LOCAL_RANK // ranks_per_gpu; ranks_per_gpu > 1 (a smoke test of the sharded GPU kernels on one
    GPU) needs backend "gloo", since NCCL refuses two ranks on one GPU."""
    missing = [k for k in LAUNCHER_ENV if not os.environ.get(k)]
    if missing:
        raise ParallelConfigError(f"environment lacks {missing}: start the ranks with torchrun (or set them)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ParallelConfigError(f"RANK/WORLD_SIZE must be integers, got {os.environ['RANK']!r}/"
                                  f"{os.environ['WORLD_SIZE']!r}") from None
    topology = Topology(world, rank, attention_tp_size, moe_ep_size)
    dev = torch.device(device)
    if dev.type == "cuda":
        os.environ.update(MULTICAST_OFF)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) // ranks_per_gpu)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        import datetime
        dist.init_process_group(backend or backend_for(dev), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    groups = build_groups(topology, dev)
    if dist.get_backend() == "nccl":
        # NCCL allocates its buffers at a group's first collective: take them now, before an engine
        # sizes its KV cache from the free memory (else that collective runs out of memory).
        for group in (groups.attention, groups.moe):
            if group is not None:
                dist.all_reduce(torch.zeros(1, device=dev), group=group)
    return groups


def build_groups(topology: Topology, device: torch.device) -> ParallelGroups:
    """Attention groups are created by every rank in the same order (new_group is collective)."""
    attention = None
    for ranks in topology.attention_groups():
        group = dist.new_group(ranks) if topology.attention_tp_size > 1 else None
        if topology.rank in ranks:
            attention = group
    moe = dist.group.WORLD if topology.world_size > 1 else None
    return ParallelGroups(topology, device, attention, moe)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
