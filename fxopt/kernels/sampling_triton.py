"""Triton implementations of ``fxopt::argmax`` (see ``sampling.py``): a row's argmax in one launch;
and of ``fxopt::greedy_feedback_``: the same, then the generation loop's bookkeeping in the last
program of each row.

Grid ``(rows, cdiv(vocab, BLOCK))``. Each program turns its BLOCK logits into 64-bit keys that
order as (value, -index) does, takes their maximum, and folds it into its row's key with one
atomic max. The last program of a row to arrive (an arrival counter) reads the row's key back and
writes the index. A key is:

* high 32 bits: the value's fp32 bits mapped to an unsigned integer that sorts as the float does
  (negative floats: all bits flipped; others: the sign bit set), NaN first made the one positive
  NaN, which then sorts above +inf as ``torch.argmax`` counts it;
* low 32 bits: ``~index``, so that of equal values the first index has the larger key.

So the largest key of a row is its first maximum: no tie-breaking pass, any vocabulary size
(the ragged last block masks its lanes to key 0, below every value). The key and counter of each
row start at zero (one memset a call), and nothing waits on the host: capturable in a CUDA graph.

CPU: under ``TRITON_INTERPRET=1`` (set before this module is imported) the launcher runs on CPU
tensors, programs one after another; the tests use it that way. (The interpreter has no bf16
loads: test there in fp32 / fp16.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import (_check, _check_feedback, argmax, argmax_reference, greedy_feedback_,
                       greedy_feedback_reference)
from .triton_env import INTERPRET, jit as _jit, tl, triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 4096  # logits a program: 8 KiB of bf16, 32 programs for a 128k vocabulary
NUM_WARPS = 4


@_jit
def _block_key(LOGITS, row, vocab, stride_row, BLOCK: tl.constexpr):
    """The largest key of this program's BLOCK logits of ``row``."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    x = tl.load(LOGITS + row * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x != x, float("nan"), x)  # every NaN the positive one: above +inf once mapped
    bits = x.to(tl.uint32, bitcast=True)
    ordered = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = (ordered.to(tl.uint64) << 32) | (~offs.to(tl.uint32)).to(tl.uint64)
    return tl.max(tl.where(mask, key, tl.zeros_like(key)), axis=0)


@_jit
def _argmax_kernel(LOGITS, KEYS, ARRIVED, OUT, vocab, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.atomic_max(KEYS + row, _block_key(LOGITS, row, vocab, stride_row, BLOCK))
    # acq_rel: the atomic max above is visible to whoever sees this arrival, and the last to
    # arrive sees every other program's.
    if tl.atomic_add(ARRIVED + row, 1) == tl.num_programs(1) - 1:
        final = tl.atomic_max(KEYS + row, 0)  # an atomic read
        tl.store(OUT + row, (~final.to(tl.uint32)).to(tl.int64))


@_jit
def _greedy_feedback_kernel(LOGITS, KEYS, ARRIVED, DONE, PAD, EOS, HISTORY, COUNT, IDS, POS, ADVANCE,
                            vocab, stride_row, stride_history, n_eos, BLOCK: tl.constexpr, EOS_BLOCK: tl.constexpr):
    """The argmax above; then the row's last program does the generation loop's bookkeeping
    (sampling.greedy_feedback_reference) and sets the row's key and counter back to zero."""
    row = tl.program_id(0).to(tl.int64)
    tl.atomic_max(KEYS + row, _block_key(LOGITS, row, vocab, stride_row, BLOCK))
    if tl.atomic_add(ARRIVED + row, 1) == tl.num_programs(1) - 1:
        final = tl.atomic_max(KEYS + row, 0)
        tl.store(KEYS + row, tl.zeros_like(final))  # every other program is done with it
        tl.store(ARRIVED + row, 0)
        done = tl.load(DONE + row) != 0
        token = tl.where(done, tl.load(PAD + row), (~final.to(tl.uint32)).to(tl.int64))
        e = tl.arange(0, EOS_BLOCK)
        eos = tl.load(EOS + e, mask=e < n_eos, other=-1)
        hit = tl.max((eos == token).to(tl.int32), axis=0) != 0
        tl.store(DONE + row, (done | hit).to(tl.int1))
        count = tl.load(COUNT + row)
        tl.store(HISTORY + row * stride_history + count, token)
        tl.store(COUNT + row, count + 1)
        tl.store(IDS + row, token)
        tl.store(POS + row, tl.load(POS + row) + tl.load(ADVANCE + row))


def supported(logits: Tensor) -> bool:
    """What the kernel takes: [rows, vocab] logits of a float dtype, unit stride along the vocabulary,
    a vocabulary that fits the key's 32-bit index."""
    return (logits.dim() == 2 and logits.dtype in DTYPES and logits.stride(1) == 1
            and 0 < logits.shape[1] < 2 ** 31)


def argmax_triton(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)`` for [rows, vocab] logits, in one kernel (CUDA, or CPU under the
    interpreter)."""
    if triton is None:
        raise RuntimeError("argmax_triton: triton is not installed")
    if logits.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("argmax_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    _check(logits)
    if not supported(logits):
        raise ValueError(f"argmax_triton: unsupported logits {logits.dtype} {list(logits.shape)} with strides "
                         f"{logits.stride()} (see supported()); use the reference")
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    scratch = torch.zeros(2, rows, dtype=torch.int64, device=logits.device)  # keys, arrival counts
    keys = scratch[0].view(torch.uint64)
    _argmax_kernel[(rows, triton.cdiv(vocab, BLOCK))](
        logits, keys, scratch[1], out, vocab, logits.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def greedy_feedback_triton(logits: Tensor, done: Tensor, pad: Tensor, eos: Tensor, history: Tensor,
                           count: Tensor, ids: Tensor, pos: Tensor, advance: Tensor, scratch: Tensor) -> None:
    """``sampling.greedy_feedback_`` in one kernel (CUDA, or CPU under the interpreter). ``scratch``
    [2, rows] int64 must be zeros; the kernel leaves it so."""
    if triton is None:
        raise RuntimeError("greedy_feedback_triton: triton is not installed")
    if logits.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("greedy_feedback_triton: CPU tensors need TRITON_INTERPRET=1 set before fxopt is imported")
    _check_feedback(logits, done, pad, eos, history, count, ids, pos, advance)
    if not supported(logits):
        raise ValueError(f"greedy_feedback_triton: unsupported logits {logits.dtype} {list(logits.shape)} with "
                         f"strides {logits.stride()} (see supported()); use the reference")
    rows, vocab = logits.shape
    if list(scratch.shape) != [2, rows] or scratch.dtype != torch.int64 or not scratch.is_contiguous():
        raise ValueError(f"greedy_feedback_triton: scratch must be contiguous int64 [2, {rows}], got "
                         f"{scratch.dtype} {list(scratch.shape)}")
    if rows == 0:
        return
    _greedy_feedback_kernel[(rows, triton.cdiv(vocab, BLOCK))](
        logits, scratch[0].view(torch.uint64), scratch[1], done, pad, eos, history, count, ids, pos, advance,
        vocab, logits.stride(0), history.stride(0), eos.numel(), BLOCK=BLOCK,
        EOS_BLOCK=triton.next_power_of_2(max(eos.numel(), 1)), num_warps=NUM_WARPS)


def _argmax_cuda(logits):
    return argmax_triton(logits) if supported(logits) else argmax_reference(logits)


def _greedy_feedback_cuda(logits, done, pad, eos, history, count, ids, pos, advance, scratch):
    if supported(logits):
        greedy_feedback_triton(logits, done, pad, eos, history, count, ids, pos, advance, scratch)
    else:
        greedy_feedback_reference(logits, done, pad, eos, history, count, ids, pos, advance)


def register() -> bool:
    """Make the Triton launcher the CUDA implementation of ``torch.ops.fxopt.argmax``. Idempotent.
    Returns False when triton is missing."""
    if triton is None:
        return False
    argmax.register_kernel("cuda")(_argmax_cuda)
    greedy_feedback_.register_kernel("cuda")(_greedy_feedback_cuda)
    return True


# --------------------------------------------------------------------------------------------- #
# Benchmark (CUDA): python -m fxopt.kernels.sampling_triton
# --------------------------------------------------------------------------------------------- #

def benchmark(dtype: torch.dtype = torch.bfloat16) -> None:
    """The greedy pick at the vocabularies of the benchmark models: this kernel, torch's argmax, and
    the two-step argmax over 256 slices fxopt used before (five kernels), as CUDA-graph replays;
    then the pick with the loop's bookkeeping: greedy_feedback_'s kernel against its torch ops."""
    from triton.testing import do_bench_cudagraph

    def sliced(logits):
        values, index = logits.unflatten(-1, (256, logits.shape[-1] // 256)).max(dim=-1)
        best = values.argmax(dim=-1, keepdim=True)
        return (best * (logits.shape[-1] // 256) + index.gather(-1, best)).squeeze(-1)

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}")
    print(f"{'vocab':>7} {'rows':>4} {'triton us':>9} {'torch us':>9} {'256 slices us':>13}  same "
          f"{'feedback us':>11} {'torch ops us':>12}  same")
    for vocab in (32000, 128256):
        for rows in (1, 8):
            logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
            same = torch.equal(argmax_triton(logits), logits.argmax(-1))
            times = [do_bench_cudagraph(lambda f=f: f(logits)) * 1e3
                     for f in (argmax_triton, argmax_reference, sliced)]
            state = dict(done=torch.zeros(rows, dtype=torch.bool, device="cuda"),
                         pad=torch.zeros(rows, dtype=torch.long, device="cuda"),
                         eos=torch.tensor([2, -1], device="cuda"),
                         history=torch.zeros(rows, 4096, dtype=torch.long, device="cuda"),
                         count=torch.zeros(rows, dtype=torch.long, device="cuda"),
                         ids=torch.zeros(rows, 1, dtype=torch.long, device="cuda"),
                         pos=torch.zeros(rows, 1, dtype=torch.long, device="cuda"),
                         advance=torch.zeros(rows, 1, dtype=torch.long, device="cuda"))
            scratch = torch.zeros(2, rows, dtype=torch.long, device="cuda")

            def fused_step():  # both reset the count (one memset), or history's column runs out
                state["count"].zero_()
                greedy_feedback_triton(logits, **state, scratch=scratch)

            def torch_step():
                state["count"].zero_()
                greedy_feedback_reference(logits, **state)

            fused, plain = (do_bench_cudagraph(f) * 1e3 for f in (fused_step, torch_step))
            ref = {k: v.clone() for k, v in state.items()}
            got = {k: v.clone() for k, v in state.items()}
            greedy_feedback_reference(logits, **ref)
            greedy_feedback_triton(logits, **got, scratch=scratch)
            agree = all(torch.equal(got[k], ref[k]) for k in ref)
            print(f"{vocab:7} {rows:4} {times[0]:9.1f} {times[1]:9.1f} {times[2]:13.1f}  {same} "
                  f"{fused:11.1f} {plain:12.1f}  {agree}")


if __name__ == "__main__":
    benchmark()
