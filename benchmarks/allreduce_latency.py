"""Latency of one decode-sized all-reduce inside a CUDA graph: what each of the 2 × layers
all-reduces of a tensor-parallel decode step costs.

    torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py

For [rows, hidden] bf16 tensors (the residual stream of a decode step), times 64 all-reduces
captured in one CUDA graph, per all-reduce, for:

- ``nccl``: ``torch.ops._c10d_functional.all_reduce`` + ``wait_tensor`` (what ``shard`` emits);
- ``symm-mem one-shot``: ``torch.ops.symm_mem.one_shot_all_reduce`` on a symmetric-memory buffer
  (each GPU reads its peers' buffers over NVLink; no multicast), when this torch has it.

Rank 0 prints a table (and ``$OUT/allreduce.json``).
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

import fxopt

REPEAT = 64  # all-reduces per graph (a 7B decode step has 2 × 32)


def graph_time(fn, iters: int = 20) -> float:
    """Seconds per call of ``fn`` (which runs REPEAT all-reduces) replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> None:
    rank, world = fxopt.distributed.setup()
    group = dist.group.WORLD.group_name
    rows_out = []
    for rows in (1, 8, 32):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        c10d = torch.ops._c10d_functional

        def nccl():
            y = x
            for _ in range(REPEAT):
                y = c10d.wait_tensor(c10d.all_reduce(y, "sum", group))
            return y

        row = dict(rows=rows, world=world, nccl_us=round(graph_time(nccl) / REPEAT * 1e6, 2))
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(rows, 4096, device="cuda", dtype=torch.bfloat16)
            symm_mem.rendezvous(buf, group)
            buf.copy_(x)
            out = torch.empty_like(buf)

            def one_shot():
                for _ in range(REPEAT):
                    torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group, out)
                return out

            check = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
            want = c10d.wait_tensor(c10d.all_reduce(x.clone(), "sum", group))
            row["symm_one_shot_ok"] = bool(torch.allclose(check.float(), want.float(), rtol=2e-2, atol=2e-2))
            row["symm_one_shot_us"] = round(graph_time(one_shot) / REPEAT * 1e6, 2)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            row["symm_one_shot_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows_out.append(row)
    if rank == 0:
        print(torch.cuda.get_device_name(), torch.__version__, time.strftime("%Y-%m-%d"))
        for r in rows_out:
            print(json.dumps(r))
        with open(os.path.join(os.environ.get("OUT", "."), "allreduce.json"), "w") as f:
            json.dump(rows_out, f, indent=1)
    if not fxopt.distributed.teardown():
        fxopt.distributed.exit_now(0)


if __name__ == "__main__":
    main()
