"""Distributed set-up from torchrun's environment (nccl on GPU, gloo on CPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _dist_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_distributed(device: torch.device):
    """(rank, world size, device) from torchrun's environment; initialises the process group
    (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    store = _attempt_store(world)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, store=store, rank=rank if store else -1,
                                world_size=world if store else -1)
    else:
        dist.init_process_group("gloo", store=store, rank=rank if store else -1, world_size=world if store else -1)
    return rank, world, device


def _attempt_store(world: int):
    """The store of this torchrun attempt, or None for torch's default (env://).

    torchrun lends its own rendezvous store to the workers (TORCHELASTIC_USE_AGENT_STORE), and that
    store outlives a restart of the group: the keys of the failed attempt (each peer's old gloo / nccl
    address) are still there, and a restarted worker that reads one before its peer rewrites it
    connects to a dead port ("Connection refused") and the restart fails. Each attempt gets its own
    key prefix instead."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a new store every attempt
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return dist.PrefixStore(f"models/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
