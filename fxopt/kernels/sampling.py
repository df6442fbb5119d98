"""Greedy decoding's pick: the index of each row's largest logit, as one op; and the pick with
the generation loop's bookkeeping, as another.

    tokens = argmax(logits)       # logits [rows, vocab] (fp32 / fp16 / bf16) -> int64 [rows]
    greedy_feedback_(logits, done, pad, eos, history, count, ids, pos, advance, scratch)

The same answer as ``logits.argmax(-1)``, which is the reference: the first index of a row's
largest value, a NaN counting as larger than any number. torch reduces one long row on few
blocks (36.7 us for a 128k vocabulary on an H200, 3 % of a 1B model's step), and splitting the
row by hand takes five small kernels. The Triton kernel (``sampling_triton.py``) registers itself
for CUDA and does it in one.

``greedy_feedback_`` is what a greedy decode step does after the model (``runtime/greedy_loop.py``
captures it in the step's CUDA graph): the argmax, then finished rows masked to padding, the
end-of-sequence check, the token recorded and fed back as the next input, the position advanced.
As separate torch ops that is ten small kernels a step; the Triton kernel does all of it in the
argmax's launch (the last program of a row does the bookkeeping).
"""
from __future__ import annotations

import torch
from torch import Tensor


def argmax_reference(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


def _check(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"argmax: logits must be [rows, vocab] with vocab > 0, got {list(logits.shape)}")


@torch.library.custom_op("fxopt::argmax", mutates_args=())
def argmax(logits: Tensor) -> Tensor:
    _check(logits)
    return argmax_reference(logits)


@argmax.register_fake
def _(logits):
    _check(logits)
    return logits.new_empty(logits.shape[:1], dtype=torch.long)


# --------------------------------------------------------------------------------------------- #
# The pick and the loop's bookkeeping in one op (runtime/greedy_loop.py's step)
# --------------------------------------------------------------------------------------------- #

def greedy_feedback_reference(logits: Tensor, done: Tensor, pad: Tensor, eos: Tensor, history: Tensor,
                              count: Tensor, ids: Tensor, pos: Tensor, advance: Tensor) -> None:
    """Row by row: token = argmax, or the row's ``pad`` once it is ``done``; ``done`` |= token is
    one of ``eos``; ``history[row, count[row]] = token``, ``count`` += 1; the token becomes the
    row's next input (``ids``) and its position moves on by ``advance``.

    logits [B, V]; done [B] bool; pad, count [B] int64; eos [E] int64 (-1: no id); history
    [B, S] int64; ids, pos, advance [B, 1] int64."""
    token = torch.where(done, pad, argmax_reference(logits))
    done |= (token[:, None] == eos).any(dim=-1)
    history.scatter_(1, count[:, None], token[:, None])
    count += 1
    ids.copy_(token[:, None])
    pos += advance


def _check_feedback(logits, done, pad, eos, history, count, ids, pos, advance) -> None:
    _check(logits)
    rows = logits.shape[0]
    for name, t, shape, dtype in (("done", done, [rows], torch.bool), ("pad", pad, [rows], torch.long),
                                  ("count", count, [rows], torch.long), ("ids", ids, [rows, 1], torch.long),
                                  ("pos", pos, [rows, 1], torch.long), ("advance", advance, [rows, 1], torch.long)):
        if list(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"greedy_feedback_: {name} must be a contiguous {dtype} tensor of shape {shape}, "
                             f"got {t.dtype} {list(t.shape)}")
    if eos.dim() != 1 or eos.dtype != torch.long or history.dim() != 2 or history.shape[0] != rows \
            or history.dtype != torch.long or history.stride(1) != 1:
        raise ValueError(f"greedy_feedback_: eos must be int64 [E] and history int64 [{rows}, S] with unit "
                         f"stride along S; got eos {eos.dtype} {list(eos.shape)}, history {history.dtype} "
                         f"{list(history.shape)}")


@torch.library.custom_op("fxopt::greedy_feedback_", mutates_args=("done", "history", "count", "ids", "pos", "scratch"))
def greedy_feedback_(logits: Tensor, done: Tensor, pad: Tensor, eos: Tensor, history: Tensor, count: Tensor,
                     ids: Tensor, pos: Tensor, advance: Tensor, scratch: Tensor) -> None:
    """``greedy_feedback_reference``; ``scratch`` ([2, B] int64, zeros) is the kernel's: it leaves
    it at zero again, so a CUDA graph's replays need no memset."""
    _check_feedback(logits, done, pad, eos, history, count, ids, pos, advance)
    greedy_feedback_reference(logits, done, pad, eos, history, count, ids, pos, advance)


@greedy_feedback_.register_fake
def _(logits, done, pad, eos, history, count, ids, pos, advance, scratch):
    return None
