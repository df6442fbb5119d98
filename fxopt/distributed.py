"""Tensor-parallel processes: set up torch.distributed the way torchrun launched us.

fxopt uses the distributed engine torch already has: ``torchrun`` starts one process per rank
(on one node, or many through its rendezvous), and :func:`setup` joins them into the default
process group — NCCL on GPUs, gloo on CPUs — with a timeout, so a rank that dies or hangs ends the
run with an error instead of a silent hang. The ``shard`` pass then reads the rank and the group.

    # torchrun --nproc-per-node 2 my_script.py
    import fxopt
    rank, world = fxopt.distributed.setup()
    compiled = fxopt.compile(model, passes=["canonicalize", "shard", "kv_cache", "fuse", "position_tables",
                                            "fold_linear", "dce", "cuda_graph"], tp=world)
    if rank == 0:
        print(tokenizer.decode(compiled.generate(ids)[0]))
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import FxoptError

#: Seconds a collective may wait for the other ranks before the run fails (``FXOPT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 300


class DistributedError(FxoptError):
    """torch.distributed is not set up the way the requested tensor parallelism needs."""


def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (idempotent); returns ``(rank, world_size)``.

    ``backend``: ``nccl`` when CUDA is available, else ``gloo``. On CUDA each rank takes the GPU
    ``LOCAL_RANK``. ``timeout_s`` (default ``$FXOPT_DIST_TIMEOUT`` or 300 s) bounds every
    collective: a rank that stops answering fails the others within it. Without torchrun's
    variables this is a one-process "group" of one: ``(0, 1)``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched():
        return 0, 1
    if timeout_s is None:
        timeout_s = float(os.environ.get("FXOPT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise DistributedError(f"rank {os.environ['RANK']} wants GPU {local}, but this machine has "
                                   f"{torch.cuda.device_count()}; use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
        # Fail a collective that waits longer than the timeout instead of hanging on it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda") if torch.cuda.is_available() and not dist.is_initialized() else torch.device("cpu")


def teardown(timeout_s: float = 30.0) -> bool:
    """Leave the process group at the end of a run (safe to call when there is none).

    Every rank first finishes its collectives (a barrier), so no peer is torn down under one that
    is still replaying a graph with an all-reduce in it. The teardown runs in a helper thread and is
    given ``timeout_s``: on 2 × H200, NCCL's teardown after CUDA-graph replays was seen to hang.
    Returns False when it did not finish; the caller may then end the process with ``os._exit``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True

    def leave():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()

    import threading

    worker = threading.Thread(target=leave, name="fxopt-teardown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        import sys
        print(f"fxopt: the process group did not shut down within {timeout_s:.0f} s; leaving it", file=sys.stderr)
        return False
    return True


def exit_now(code: int = 0) -> None:
    """End the process at once (after flushing stdout/stderr), skipping interpreter teardown: for
    a rank whose process group would not shut down (see :func:`teardown`)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
