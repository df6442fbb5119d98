"""``cuda_graph``: the final pass — decode steps run as replayed CUDA graphs.

The pass checks the graph can be captured (no host syncs, no CPU tensors, a KV cache to write
into) and records the plan: batch-size buckets 1, 2, 4, ... up to ``max_batch_size``. The
runtime (``fxopt/runtime/cuda_graph.py``) captures each bucket on first use and replays it.
Prefill (many tokens per row, a different length every time) runs uncaptured.

Options: ``cuda_graph_fallback=True`` turns a capture failure into a warning and eager decode
instead of an error. ``cuda_graph_greedy_loop=False`` keeps greedy decoding's token pick and
feedback on the host (by default they are captured with the step: ``runtime/greedy_loop.py``).
On a machine without CUDA (or with the weights on the CPU) the pass changes nothing and says so
in one line.
"""
from __future__ import annotations

import sys

import torch
import torch.fx as fx

from ..errors import PassError
from ..ir import describe, is_op
from ..runtime.cuda_graph import buckets_for
from .base import CompileContext, Pass, PassResult, register_pass

aten = torch.ops.aten
_SYNCING = (aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default)
_noticed = False


@register_pass("cuda_graph")
class CUDAGraph(Pass):
    name = "cuda_graph"
    preserves_meta = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        if device.type != "cuda" or not torch.cuda.is_available():
            _notice(f"cuda_graph: weights are on {device.type}, not CUDA; decode runs without CUDA graphs")
            return PassResult(changed=False, stats={"skipped": f"no CUDA ({device.type})"})
        info = ctx.info
        cache = info.state.get("kv_cache") if info is not None else None
        if cache is None:
            raise PassError("cuda_graph: put 'kv_cache' before 'cuda_graph'; only cached decode steps are captured")
        for node in gm.graph.nodes:
            if is_op(node, *_SYNCING):
                raise PassError(f"cuda_graph: {describe(node)} copies a value to the host, which a CUDA graph "
                                "cannot capture")
        buckets = buckets_for(cache["max_batch_size"])
        info.state["cuda_graph"] = {"buckets": buckets, "fallback": bool(ctx.option("cuda_graph_fallback", False)),
                                    "greedy_loop": bool(ctx.option("cuda_graph_greedy_loop", True))}
        return PassResult(changed=True, stats={"buckets": ",".join(map(str, buckets))})


def _notice(message: str) -> None:
    global _noticed
    if not _noticed:
        print(message, file=sys.stderr)
        _noticed = True
