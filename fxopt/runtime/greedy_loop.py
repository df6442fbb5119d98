"""Greedy decode steps that feed themselves: one CUDA graph replay a token, nothing else.

A plain decode step hands over to the host between graphs: the next token is picked (argmax),
finished rows are masked, the token and position are copied into the graph's input buffers and
the positions advanced: a handful of small launches and a graph launch each step (about 12 µs of
kernels and a 9 µs gap at batch 1 on an H100: docs/performance.md).
Here all of that is captured with the step:

    logits   = step(ids, pos)[:, -1]
    token    = where(done, pad, argmax(logits))     # finished rows emit padding
    done    |= token is one of the eos ids
    history[:, count] = token; count += 1
    ids, pos = token, pos + advance                 # padding rows stay parked

all but the step in one op, ``fxopt::greedy_feedback_`` (kernels/sampling.py; on CUDA one Triton
kernel), so the host only replays the graph, and every few steps reads ``done`` (a sync) to stop
early.

    >>> loop = GreedyLoop(runner, bucket=4, device=device)
    >>> loop.start(tokens, positions, done, pad=0, eos={2})    # the prefill's picks, [3] rows
    >>> loop.step(); loop.tokens(0)                            # the 2nd token of each row, [3]

With ``capture_graph=False`` the same body runs eagerly (no CUDA needed): the loop's logic can then be
checked on any device against the host-side loop in ``generate.py``.
"""
from __future__ import annotations

import torch

from ..kernels import sampling  # noqa: F401 - registers torch.ops.fxopt.greedy_feedback_
from .cuda_graph import capture, capture_failed, parked_inputs

MAX_EOS_IDS = 8  # end-of-sequence ids a loop compares against; requests with more use the host loop
NO_TOKEN = -1    # fills unused eos slots: argmax never returns it


class GreedyLoop:
    """The greedy decode step of one batch-size bucket of a ``CUDAGraphRunner``, with its own
    static state (tokens, positions, done-flags, the tokens picked so far)."""

    def __init__(self, runner, bucket: int, device, *, capture_graph: bool = True, feedback=None):
        self.runner, self.bucket = runner, bucket
        # the pick and bookkeeping: the op (its Triton kernel on CUDA), or a given implementation
        self.feedback = feedback or torch.ops.fxopt.greedy_feedback_
        park = runner.park
        self.ids, self.pos, self._flat = parked_inputs(runner.signature, bucket, park, device)
        self.advance = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.done = torch.ones(bucket, dtype=torch.bool, device=device)
        self.pad = torch.zeros(bucket, dtype=torch.long, device=device)
        self.eos = torch.full((MAX_EOS_IDS,), NO_TOKEN, dtype=torch.long, device=device)
        self.history = torch.zeros(bucket, park + 1, dtype=torch.long, device=device)
        self.count = torch.zeros(bucket, dtype=torch.long, device=device)
        self.scratch = torch.zeros(2, bucket, dtype=torch.long, device=device)  # the kernel's; it stays zero
        self.graph = None
        if capture_graph:
            self.graph, _ = capture(self._body, warmup=runner.warmup, pool=runner.pool)

    def _body(self) -> None:
        logits = self.runner.gm(*self._flat)[0][:, -1]
        self.feedback(logits, self.done, self.pad, self.eos, self.history, self.count, self.ids, self.pos,
                      self.advance, self.scratch)

    def start(self, tokens: torch.Tensor, positions: torch.Tensor, done: torch.Tensor, *,
              pad: int, eos: set[int]) -> None:
        """Load a request: ``tokens`` [B] picked last, ``positions`` [B, 1] where they go,
        ``done`` [B] rows already finished. Rows past B are padding, parked and done."""
        batch = tokens.shape[0]
        self.ids[:batch, 0].copy_(tokens)
        self.ids[batch:].zero_()
        self.pos[:batch].copy_(positions)
        self.pos[batch:].fill_(self.runner.park)
        self.advance[:batch].fill_(1)
        self.advance[batch:].zero_()
        self.done[:batch].copy_(done)
        self.done[batch:].fill_(True)
        self.pad.fill_(pad)
        self.eos.fill_(NO_TOKEN)
        if eos:
            self.eos[:len(eos)].copy_(torch.tensor(sorted(eos), dtype=torch.long))
        self.count.zero_()

    def step(self) -> None:
        """One decode step: the next token of every row lands in ``tokens(i)``."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()

    def tokens(self, i: int) -> torch.Tensor:
        """The tokens of the ``i``-th step since ``start`` (a view, valid until the next start)."""
        return self.history[:, i]


def greedy_loop(runner, batch: int, device) -> GreedyLoop | None:
    """The runner's greedy loop for ``batch`` rows, captured on first use; None where decode
    steps are not replayed from graphs (capture failed before, or fails now with fallback on)."""
    if runner.failed:
        return None
    size = runner.bucket(batch)
    loops = runner.greedy_loops
    if size not in loops:
        try:
            loops[size] = GreedyLoop(runner, size, device)
        except Exception as e:  # noqa: BLE001 - name the culprit, or fall back if asked to
            _, _, flat = parked_inputs(runner.signature, size, runner.park, device)
            capture_failed(f"greedy decode step for batch bucket {size}", e, runner.gm, flat,
                           runner.fallback, "the host-side decode loop")
            loops[size] = None
    return loops[size]
