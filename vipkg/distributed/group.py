"""The process group: joining it, the rank and world size, copying a guide from one rank to all."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "broadcast_guide"]


def _rank_world(group=None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vipkg.distributed needs an initialized process group: run under torchrun "
            "(`torchrun --nproc_per_node=N -m vipkg fit ... --distributed`), call "
            "vipkg.distributed.init_process_group() in every process, or use vipkg.distributed.launch()."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_guide(guide, src: int = 0, group=None, model=None) -> None:
    """Copy rank ``src``'s guide parameters and buffers (and ``model``'s own parameters) to every
    rank (in place)."""
    own = [] if model is None else model.parameters()
    for t in [*guide.parameters(), *guide.buffers(), *own]:
        dist.broadcast(t.data, src=src, group=group)


def init_process_group(device=None, *, backend: str | None = None, **kwargs) -> torch.device:
    """Join the process group that torchrun (or the ``MASTER_ADDR`` / ``RANK`` ... variables) describes.

    The backend is NCCL when ``device`` is CUDA and gloo otherwise. A CUDA device
    becomes ``cuda:LOCAL_RANK``. Returns the device this rank should fit on; a no-op
    when the group is already initialized.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing and "init_method" not in kwargs:
            raise RuntimeError(
                f"cannot join a process group: environment variable(s) {missing} are not set. "
                "Launch with `torchrun --nproc_per_node=N -m vipkg fit ... --distributed` or use "
                "vipkg.distributed.launch()."
            )
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), **kwargs)
    return device
