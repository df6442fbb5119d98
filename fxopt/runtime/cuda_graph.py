"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (one token per row) launches hundreds of small kernels; replaying them from a
captured CUDA graph removes the CPU launch cost, which at batch 1 is most of the step.

    runner = CUDAGraphRunner(gm, signature, max_batch_size=8)
    logits = runner(input_ids, position_ids)     # [B, 1] each; B padded up to its bucket

- Buckets are 1, 2, 4, 8, ... up to ``max_batch_size``; a batch is padded up to its bucket.
- Each bucket is captured on first use, after warm-up, into one memory pool shared by all buckets,
  with static input buffers (tokens, positions = cache slots) and a static output.
- Padding rows and warm-up runs write their k/v at the last cache slot, ``max_seq_len - 1``: no row
  reads a slot before writing it itself, so those writes are never seen.
- The returned logits are a view of the static output: read them before the next replay.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.fx as fx

from ..errors import FxoptError
from ..kernels.triton_env import compile_ahead

# Compile a capture's Triton kernels in parallel before its warm-up (off: one by one, as each is
# first launched; benchmarks/cold_start.py times both). FXOPT_COMPILE_AHEAD=0 turns it off.
COMPILE_AHEAD = os.environ.get("FXOPT_COMPILE_AHEAD", "1") != "0"


class CUDAGraphError(FxoptError):
    """A decode step could not be captured into a CUDA graph."""


def buckets_for(limit: int, first: int = 1) -> list[int]:
    """``first``, twice that, four times, ... below ``limit``, then ``limit`` itself."""
    sizes, b = [], first
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


def smallest_bucket(buckets: list[int], size: int, what: str, limit_name: str) -> int:
    """The first bucket that holds ``size``; a CUDAGraphError past the last one."""
    for b in buckets:
        if b >= size:
            return b
    raise CUDAGraphError(f"{what} {size} exceeds {limit_name} {buckets[-1]}")


def capture(fn, *, warmup: int, pool):
    """Run ``fn`` ``warmup`` times on a side stream (kernels compile, the allocator settles), then
    capture one call of it into a CUDA graph in ``pool``; returns (graph, what that call returned).
    Before the warm-up, a dry call compiles the Triton kernels ``fn`` launches side by side
    (``kernels.triton_env.compile_ahead``) without running them: ``fn`` must take no index and no
    host decision from what a kernel writes (a graph's step takes them from its inputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if COMPILE_AHEAD:
            _dry_run(fn)
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _dry_run(fn) -> None:
    """``fn`` inside ``compile_ahead``: its Triton kernels compile side by side, none runs. A failure
    here is only warned of: the warm-up after it runs ``fn`` for real and raises what is real (a
    dry run fails alone only where something took a decision from a kernel's unwritten output)."""
    try:
        with compile_ahead():
            fn()
    except Exception as e:  # noqa: BLE001 - the warm-up reruns fn for real
        warnings.warn(f"compiling a capture's kernels ahead failed ({type(e).__name__}: {e}); they compile one "
                      f"by one at their first launch instead (FXOPT_COMPILE_AHEAD=0 skips the attempt)", stacklevel=3)


class _Captured:
    def __init__(self, graph, input_ids, position_ids, output):
        self.graph, self.input_ids, self.position_ids, self.output = graph, input_ids, position_ids, output


class CUDAGraphRunner:
    def __init__(self, gm: fx.GraphModule, signature, *, max_batch_size: int, max_seq_len: int,
                 warmup: int = 2, fallback: bool = False):
        self.gm = gm
        self.signature = signature
        self.buckets = buckets_for(max_batch_size)
        self.park = max_seq_len - 1  # the cache slot padding rows and warm-up runs write to
        self.warmup = warmup
        self.fallback = fallback
        self.failed = False
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Captured] = {}
        self.greedy_loops: dict = {}  # bucket -> GreedyLoop or None (greedy_loop.py)

    def bucket(self, batch: int) -> int:
        return smallest_bucket(self.buckets, batch, "batch", "max_batch_size")

    def _eager(self, input_ids, position_ids):
        return self.signature.call(self.gm, input_ids=input_ids, position_ids=position_ids).logits

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self._eager(input_ids, position_ids)
        batch = input_ids.shape[0]
        size = self.bucket(batch)
        captured = self.graphs.get(size)
        if captured is None:
            captured = self._capture(size, input_ids.device)
            if captured is None:
                return self._eager(input_ids, position_ids)
        captured.input_ids[:batch].copy_(input_ids)
        captured.position_ids[:batch].copy_(position_ids)
        if batch < size:
            captured.input_ids[batch:].zero_()
            captured.position_ids[batch:].fill_(self.park)
        captured.graph.replay()
        return captured.output[:batch]

    def _capture(self, size: int, device) -> _Captured | None:
        ids, pos, flat = parked_inputs(self.signature, size, self.park, device)
        try:
            graph, out = capture(lambda: self.gm(*flat), warmup=self.warmup, pool=self.pool)
        except Exception as e:  # noqa: BLE001 - name the culprit, or fall back if asked to
            capture_failed(f"decode step for batch bucket {size}", e, self.gm, flat, self.fallback, "eager decode")
            self.failed = True
            return None
        captured = _Captured(graph, ids, pos, out[0])
        self.graphs[size] = captured
        return captured


def parked_inputs(signature, size: int, park: int, device):
    """Static decode-step inputs for ``size`` rows, all parked: (input_ids [size, 1] zeros,
    position_ids [size, 1] at slot ``park``, the graph's flat arguments over them)."""
    ids = torch.zeros(size, 1, dtype=torch.long, device=device)
    pos = torch.full((size, 1), park, dtype=torch.long, device=device)
    return ids, pos, signature.flatten((), {"input_ids": ids, "position_ids": pos})


def capture_failed(what: str, error: Exception, gm: fx.GraphModule, flat, fallback: bool, instead: str) -> None:
    """A capture raised ``error``: raise a CUDAGraphError naming the node at fault or, with
    ``fallback``, warn that ``instead`` runs from now on."""
    culprit = _find_uncapturable(gm, flat)
    message = (f"{what} could not be captured into a CUDA graph: "
               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
               + (f"\n  culprit: {culprit}" if culprit else ""))
    if not fallback:
        raise CUDAGraphError(message) from error
    warnings.warn(message + f"\n  falling back to {instead}", stacklevel=4)
    torch.cuda.synchronize()


def _find_uncapturable(gm: fx.GraphModule, flat) -> str | None:
    """Replay the graph node by node inside a capture; name the first node that fails."""
    from ..ir import describe

    class Probe(fx.Interpreter):
        culprit = None

        def run_node(self, node):
            try:
                return super().run_node(node)
            except Exception as e:  # noqa: BLE001
                if Probe.culprit is None:
                    Probe.culprit = f"{describe(node)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            Probe(gm).run(*flat)
    except Exception:  # noqa: BLE001 - the probe only looks for the culprit
        pass
    torch.cuda.synchronize()
    return Probe.culprit
