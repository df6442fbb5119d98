"""The one-launch argmax (fxopt/kernels/sampling_triton.py) against ``torch.argmax``: exactly the
same index, ties, infinities and NaN included.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in fp32 and fp16; with one, the same tests run the compiled kernel, and the
``gpu`` test also goes through ``torch.ops.fxopt.argmax`` in bf16.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import sampling_triton as st_k

pytestmark = pytest.mark.skipif(st_k.triton is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def logits(rows, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(1, 128256), (3, 32000), (2, 4096), (4, 4097), (5, 50257), (1, 1), (2, 7)])
def test_argmax_is_torch_argmax(dtype, rows, vocab):
    x = logits(rows, vocab, dtype, seed=vocab)
    # Equal maxima in different blocks and in one block: the first one wins.
    x[0, vocab - 1] = 30.0
    x[0, vocab // 2] = 30.0
    x[-1, 3 * vocab // 4] = x[-1, 3 * vocab // 4 + 1 if vocab > 1 else 0] = 30.0
    assert torch.equal(st_k.argmax_triton(x), x.argmax(-1))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 9000), seed=st.integers(0, 2 ** 16), ties=st.integers(1, 8))
def test_argmax_with_random_ties(rows, vocab, seed, ties):
    # fp16 values from a few levels only: ties everywhere, in every block.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, ties, (rows, vocab), generator=g).to(torch.float16).to(DEVICE)
    assert torch.equal(st_k.argmax_triton(x), x.argmax(-1))


def test_argmax_of_infinities_and_nan():
    x = logits(4, 9000, torch.float32)
    x[0, 5000] = float("inf")
    x[0, 7000] = float("nan")  # NaN counts as the largest, as in torch.argmax
    x[1] = float("-inf")  # nothing but -inf: index 0
    x[2, 8999] = float("inf")
    x[3, 10] = x[3, 8000] = float("nan")  # the first NaN
    x[3, 11] = float("inf")
    assert st_k.argmax_triton(x).tolist() == x.argmax(-1).tolist() == [7000, 0, 8999, 10]


def test_argmax_of_strided_rows_and_repeated_calls():
    # logits[:, -1] of a [B, 1 + 2, V] tensor, as generate passes the last position's row; the
    # per-call scratch starts at zero every time, so a second call is not skewed by the first.
    full = logits(3, 3 * 5000, torch.float32).view(3, 3, 5000)
    rows = full[:, -1]
    assert rows.stride() == (15000, 1)
    first = st_k.argmax_triton(rows)
    assert torch.equal(first, rows.argmax(-1))
    rows[:, 17] = 1e9
    assert st_k.argmax_triton(rows).tolist() == [17, 17, 17]


def test_unsupported_logits_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"argmax: logits must be \[rows, vocab\]"):
        st_k.argmax_triton(torch.randn(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="argmax_triton: unsupported logits"):
        st_k.argmax_triton(torch.randn(8, 2, device=DEVICE).t())  # vocabulary not contiguous


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_registered_op_on_cuda(dtype):
    from fxopt.kernels.triton_ops import register_all

    assert "sampling_triton" in register_all()
    x = torch.randn(8, 128256, device="cuda").to(dtype)
    x[:, 1000] = x[:, 90000] = 40.0
    out = torch.ops.fxopt.argmax(x)
    assert out.dtype == torch.long and out.tolist() == [1000] * 8
    graph = torch.cuda.CUDAGraph()  # capturable: no host sync, the scratch from the graph's pool
    with torch.cuda.graph(graph):
        captured = torch.ops.fxopt.argmax(x)
    x[:, 5] = 50.0
    graph.replay()
    assert captured.tolist() == [5] * 8
