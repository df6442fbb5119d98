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


# --------------------------------------------------------------------------------------------- #
# greedy_feedback_: the pick and the generation loop's bookkeeping in one kernel
# --------------------------------------------------------------------------------------------- #

def _loop_state(rows, width, seed):
    """A mid-generation loop state: some rows done, rows at different positions, some parked."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        done=torch.rand(rows, generator=g) < 0.3,
        pad=torch.full((rows,), 7, dtype=torch.long),
        eos=torch.tensor([-1, -1, -1], dtype=torch.long),
        history=torch.randint(0, 100, (rows, width), generator=g),
        count=torch.full((rows,), 2, dtype=torch.long),
        ids=torch.randint(0, 100, (rows, 1), generator=g),
        pos=torch.randint(0, width, (rows, 1), generator=g),
        advance=(torch.rand(rows, 1, generator=g) < 0.7).long(),
    )


def _on(state, device):
    return {k: v.clone().to(device) for k, v in state.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(1, 32000), (3, 4097), (5, 9000), (2, 7)])
def test_greedy_feedback_kernel_is_its_reference_step_after_step(dtype, rows, vocab):
    from fxopt.kernels.sampling import greedy_feedback_reference
    full = logits(rows, 2 * vocab, dtype, seed=rows).view(rows, 2, vocab)
    x = full[:, -1]  # strided rows, as the loop passes the last position's logits
    state = _loop_state(rows, 12, seed=vocab)
    picks = x.argmax(-1)
    state["eos"][:2] = torch.tensor([int(picks[0]), int(picks[-1])])  # some rows end now
    ref, got = _on(state, "cpu"), _on(state, DEVICE)
    scratch = torch.zeros(2, rows, dtype=torch.long, device=DEVICE)
    for step in range(3):  # the kernel leaves its scratch at zero: later calls are not skewed
        greedy_feedback_reference(x.float().cpu(), **ref)  # same picks: done rows stay done, counts advance
        st_k.greedy_feedback_triton(x, **got, scratch=scratch)
        for key in ref:
            assert torch.equal(got[key].cpu(), ref[key]), (step, key)
        assert not scratch.any()
    assert bool(ref["done"][0]) and bool(ref["done"][-1])
    assert ref["count"].tolist() == [5] * rows


def test_greedy_feedback_refuses_what_it_cannot_take():
    state = _on(_loop_state(2, 8, seed=0), DEVICE)
    x = logits(2, 100, torch.float32)
    with pytest.raises(ValueError, match=r"greedy_feedback_: count must be a contiguous torch.int64 tensor"):
        st_k.greedy_feedback_triton(x, **{**state, "count": state["count"][:1]},
                                    scratch=torch.zeros(2, 2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"scratch must be contiguous int64 \[2, 2\]"):
        st_k.greedy_feedback_triton(x, **state, scratch=torch.zeros(2, 3, dtype=torch.long, device=DEVICE))


@pytest.mark.gpu
def test_greedy_feedback_op_replays_in_a_cuda_graph():
    from fxopt.kernels.sampling import greedy_feedback_reference
    from fxopt.kernels.triton_ops import register_all

    assert "sampling_triton" in register_all()
    x = torch.randn(4, 128256, device="cuda").to(torch.bfloat16)
    state = _loop_state(4, 16, seed=1)
    state["eos"][0] = int(x[2].float().argmax())
    ref, got = _on(state, "cpu"), _on(state, "cuda")
    scratch = torch.zeros(2, 4, dtype=torch.long, device="cuda")
    torch.ops.fxopt.greedy_feedback_(x, **_on(state, "cuda"), scratch=scratch)  # compiles the kernel
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # capturing runs nothing: the state is still the start's
        torch.ops.fxopt.greedy_feedback_(x, **got, scratch=scratch)
    for _ in range(4):
        graph.replay()
        greedy_feedback_reference(x.float().cpu(), **ref)
    torch.cuda.synchronize()
    for key in ref:
        assert torch.equal(got[key].cpu(), ref[key]), key
    assert not scratch.any() and bool(ref["done"][2])
