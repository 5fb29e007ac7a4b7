"""Launching ``world_size`` processes joined by a process group on one machine (no torchrun)."""

from __future__ import annotations

import io
import socket

import torch
import torch.distributed as dist

__all__ = ["launch"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world, port, backend, threads, args, queue):
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors: the worker exits before the read
        queue.put((rank, buf.getvalue(), None))
    except BaseException as err:
        queue.put((rank, None, f"{type(err).__name__}: {err}"))
        raise
    finally:
        dist.destroy_process_group()


def launch(
    fn, world_size: int, *args, backend: str = "gloo", threads: int = 1, timeout: float = 300.0
) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a process group.

    For one machine without torchrun (tests, notebooks, benchmarks). ``fn`` must be
    importable (a module-level function); its return values (tensors, numbers, dicts)
    come back as a list indexed by rank. ``threads`` sets ``torch.set_num_threads`` in
    each process, so that ``world_size`` processes do not oversubscribe the cores.
    """
    import torch.multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, fn, world_size, port, backend, threads, args, queue), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    import time

    deadline = time.monotonic() + timeout
    received = 0
    while received < world_size:
        if not queue.empty():
            rank, payload, err = queue.get()
            received += 1
            if err is not None:
                errors.append(f"rank {rank}: {err}")
                break
            else:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            continue
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if (dead and queue.empty()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if errors or received < world_size:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        codes = [p.exitcode for p in procs]
        raise RuntimeError(
            f"vipkg.distributed.launch: {'; '.join(errors) or 'a process died without a result'} "
            f"(exit codes {codes})."
        )
    for p in procs:
        p.join(timeout)
    return results
