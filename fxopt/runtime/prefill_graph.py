"""Prefill replayed from CUDA graphs, one graph per (batch size, prompt-length bucket).

A prefill launches a few hundred kernels, each through Python (the graph module, the op
dispatcher, Triton's launcher). On an H200 that host work took longer than the GPU work itself:
the 7B shape's 2048-token prefill spent 41.8 ms in kernels and 93.5 ms in all, the 1B shape's
7.9 ms and 40.8 ms (one host, 2026-11-27). A replayed graph costs the host one launch.

    runner = PrefillGraphRunner(prefill_gm, signature, max_seq_len=2048)
    logits = runner(input_ids, last_index)   # [B, V], a view of the static output

- Prompts sit at positions 0..S-1 (a prefill starts each row's sequence), so the positions are
  captured as constants.
- The prompt length is padded up to its bucket (16, 32, 64, ... up to ``max_seq_len``) with token
  0 at the positions that follow the prompt: those tokens write their k/v past every row's prompt,
  into slots no real query reads before the row's own next token overwrites them (the same rule
  that lets ``generate`` right-pad prompts of different lengths).
- A graph is captured on first use of its (batch, bucket), after one warm-up run, into a memory pool
  of its own (separate from the decode graphs').
- The logits are a view of the static output: read them before the next prefill.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .cuda_graph import buckets_for, capture, capture_failed, smallest_bucket
from .last_token import prompt_positions

MIN_BUCKET = 16


def length_buckets(max_seq_len: int) -> list[int]:
    """16, 32, 64, ... and ``max_seq_len`` itself as the last bucket."""
    return buckets_for(max_seq_len, MIN_BUCKET)


class _Captured:
    """A graph and the static tensors it reads and writes. The graph holds only their addresses:
    each must live as long as the graph (the positions too, though nothing writes them again)."""

    def __init__(self, graph, input_ids, position_ids, last_index, output):
        self.graph, self.input_ids, self.position_ids, self.last_index = graph, input_ids, position_ids, last_index
        self.output = output


class PrefillGraphRunner:
    def __init__(self, gm: fx.GraphModule, signature, *, max_seq_len: int, warmup: int = 1, fallback: bool = False):
        self.gm = gm
        self.signature = signature
        self.buckets = length_buckets(max_seq_len)
        self.warmup = warmup
        self.fallback = fallback
        self.failed = False
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Captured] = {}

    def bucket(self, seq: int) -> int:
        return smallest_bucket(self.buckets, seq, "prompt length", "max_seq_len")

    def _eager(self, input_ids, last_index):
        positions = prompt_positions(*input_ids.shape, input_ids.device)
        flat = self.signature.flatten((), dict(input_ids=input_ids, position_ids=positions))
        return self.signature.unflatten(self.gm(*flat, last_index)).logits[:, 0]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self._eager(input_ids, last_index)
        batch, seq = input_ids.shape
        key = (batch, self.bucket(seq))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(*key, input_ids.device)
            if captured is None:
                return self._eager(input_ids, last_index)
        captured.input_ids[:, :seq].copy_(input_ids)
        captured.last_index.copy_(last_index)
        captured.graph.replay()
        return captured.output

    def _capture(self, batch: int, length: int, device) -> _Captured | None:
        # Past the prompt: token 0 at the next positions (set once here, never overwritten).
        ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        pos = prompt_positions(batch, length, device).contiguous()
        last = torch.zeros(batch, dtype=torch.long, device=device)
        flat = self.signature.flatten((), dict(input_ids=ids, position_ids=pos))
        try:
            graph, out = capture(lambda: self.signature.unflatten(self.gm(*flat, last)).logits[:, 0],
                                 warmup=self.warmup, pool=self.pool)
        except Exception as e:  # noqa: BLE001 - name the culprit, or fall back if asked to
            capture_failed(f"prefill of batch {batch}, length bucket {length}", e, self.gm, (*flat, last),
                           self.fallback, "eager prefill")
            self.failed = True
            return None
        captured = _Captured(graph, ids, pos, last, out)
        self.graphs[(batch, length)] = captured
        return captured
