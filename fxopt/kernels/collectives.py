"""``fxopt::all_reduce``: the sum over a tensor-parallel group, with a low-latency path for decode.

    y = torch.ops.fxopt.all_reduce(x, group_name)     # = all_reduce(x, "sum") over the group

The reference is torch.distributed's functional all-reduce (``_c10d_functional.all_reduce`` +
``wait_tensor``): any backend (gloo on CPU, NCCL on GPUs), traceable, CUDA-graph capturable. It is
what ``shard`` emits by default.

On CUDA, with ``shard``'s option ``tp_allreduce="symm_mem"``, small tensors (a decode step's
residual stream: ``[batch, 1, hidden]``) take PyTorch's symmetric-memory one-shot all-reduce
instead: each GPU copies its tensor into a buffer that every peer can read over NVLink, and one
kernel reads all peers' copies and sums them. No NCCL launch, no multicast (which this project
never uses). Measured inside CUDA graphs on 2 × H200 (``benchmarks/allreduce_latency.py``,
2026-11-27): 6.3 µs against 11.2 µs for NCCL at [1, 4096] bf16.

The symmetric buffer is allocated and exchanged (a collective: every rank runs the same graph, so
they all get here together) the first time a size is seen, which is always outside a CUDA-graph
capture (prefill and the runner's warm-up run first); a buffer is never freed, since captured
graphs may point at it. Tensors above ``SYMM_MAX_BYTES`` go through NCCL, whose ring is faster
for large messages.
"""
from __future__ import annotations

import torch
from torch import Tensor

SYMM_MAX_BYTES = 1 << 20  # one-shot reads every peer's whole tensor: for small messages only

_buffers: dict[tuple, Tensor] = {}
_retired: list[Tensor] = []  # replaced buffers, kept alive for graphs captured with them


def all_reduce_reference(x: Tensor, group_name: str) -> Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group_name))


@torch.library.custom_op("fxopt::all_reduce", mutates_args=())
def all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum of ``x`` over the ranks of ``group_name``."""
    return all_reduce_reference(x, group_name)


@all_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _symm_buffer(numel: int, x: Tensor, group_name: str) -> Tensor:
    key = (x.device, x.dtype, group_name)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fxopt.all_reduce: a {numel}-element all-reduce first seen inside a CUDA-graph "
                               "capture; run the step once before capturing")
        import torch.distributed._symmetric_memory as symm_mem

        if buf is not None:
            _retired.append(buf)
        buf = symm_mem.empty(max(numel, SYMM_MAX_BYTES // x.element_size()), device=x.device, dtype=x.dtype)
        symm_mem.rendezvous(buf, group_name)
        _buffers[key] = buf
    return buf


def all_reduce_symm_mem(x: Tensor, group_name: str) -> Tensor:
    """The CUDA implementation: one-shot over symmetric memory for small tensors, else NCCL."""
    if x.numel() * x.element_size() > SYMM_MAX_BYTES or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return all_reduce_reference(x, group_name)
    n = x.numel()
    staged = _symm_buffer(n, x, group_name)[:n]
    staged.copy_(x.reshape(-1))
    out = torch.empty_like(x)
    torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", group_name, out.view(-1))
    return out


def use_symm_mem() -> bool:
    """Make the symmetric-memory path the CUDA implementation of ``fxopt.all_reduce`` (False when
    this torch has no symmetric memory)."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return False
    all_reduce.register_kernel("cuda")(all_reduce_symm_mem)
    return True
