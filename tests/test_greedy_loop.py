"""The self-feeding greedy decode step (runtime/greedy_loop.py) = the host-side decode loop.

On the CPU the loop's body runs uncaptured (``capture_graph=False``): the same tensor program the
CUDA graph replays, checked token for token against generate()'s host loop. On a GPU, captured.
"""
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

import fxopt
from families import VOCAB, tiny
from fxopt.kernels.triton_env import INTERPRET
from fxopt.runtime.cuda_graph import buckets_for, smallest_bucket
from fxopt.runtime.greedy_loop import MAX_EOS_IDS, GreedyLoop

MAX_SEQ = 48


def _prompts(n, width, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, width), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, : (2 * i) % width] = 0  # prompts of different lengths
    return ids, mask


def _with_uncaptured_loops(compiled, max_batch_size, feedback=None):
    """Make ``compiled`` decode greedily through GreedyLoops run without CUDA graphs."""
    runner = SimpleNamespace(gm=compiled.graph_module, signature=compiled.info.signature, park=MAX_SEQ - 1,
                             warmup=0, pool=None)
    buckets, loops = buckets_for(max_batch_size), {}

    def greedy_loop(batch, device):
        size = smallest_bucket(buckets, batch, "batch", "max_batch_size")
        if size not in loops:
            loops[size] = GreedyLoop(runner, size, device, capture_graph=False, feedback=feedback)
        return loops[size]

    compiled.greedy_loop = greedy_loop
    return loops


@pytest.fixture(scope="module")
def models():
    model = tiny("llama").eval()
    host = fxopt.compile(model, max_batch_size=8, max_seq_len=MAX_SEQ)
    looped = fxopt.compile(model, max_batch_size=8, max_seq_len=MAX_SEQ)
    loops = _with_uncaptured_loops(looped, 8)
    return host, looped, loops


@pytest.mark.parametrize("n", [1, 3, 5])
def test_loop_emits_the_host_loops_tokens(models, n):
    host, looped, loops = models
    ids, mask = _prompts(n, 6, seed=n)
    expected = host.generate(ids, attention_mask=mask, max_new_tokens=11, eos_token_id=None)
    got = looped.generate(ids, attention_mask=mask, max_new_tokens=11, eos_token_id=None)
    assert torch.equal(got, expected)
    loop = loops[smallest_bucket(buckets_for(8), n, "batch", "max_batch_size")]
    assert loop.count.tolist() == [10] * loop.bucket  # the first token comes from the prefill
    assert bool((loop.pos[n:] == MAX_SEQ - 1).all()), "padding rows must stay parked"
    lengths = mask.sum(1)
    assert torch.equal(loop.pos[:n, 0], lengths + 10)


def test_loop_stops_and_pads_rows_at_their_eos_like_the_host_loop(models):
    host, looped, _ = models
    ids, mask = _prompts(5, 6, seed=7)
    free = host.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=None)[:, 6:]
    # end-of-sequence ids that some rows emit midway: those rows finish early, others run on
    eos = sorted({int(free[0, 3]), int(free[2, 6]), int(free[4, 1])})
    for stream in (False, True):
        kwargs = dict(attention_mask=mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
        if stream:
            got = torch.stack(list(looped.stream(ids, **kwargs)), dim=1)
            expected = torch.stack(list(host.stream(ids, **kwargs)), dim=1)
        else:
            got, expected = looped.generate(ids, **kwargs), host.generate(ids, **kwargs)
        assert torch.equal(got, expected), stream
        assert (got == 0).any(), "some row should have finished and been padded"


def test_every_row_done_stops_the_loop_early(models):
    host, looped, _ = models
    ids, mask = _prompts(2, 6, seed=3)
    free = host.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)[:, 6:]
    eos = [int(free[0, 1]), int(free[1, 1])]  # both rows end at their second token
    got = looped.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, host.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos))
    assert got.shape[1] < 6 + 30


@contextmanager
def _loops_asked_for(compiled):
    """The batch sizes ``compiled`` asks a greedy loop for, inside the block."""
    asked, inner = [], compiled.greedy_loop
    compiled.greedy_loop = lambda batch, device: asked.append(batch) or inner(batch, device)
    try:
        yield asked
    finally:
        compiled.greedy_loop = inner


def test_more_eos_ids_than_the_loop_holds_use_the_host_loop(models):
    host, looped, _ = models
    ids, mask = _prompts(2, 6, seed=5)
    eos = list(range(VOCAB - MAX_EOS_IDS - 1, VOCAB))
    with _loops_asked_for(looped) as asked:
        got = looped.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos)
        assert asked == []
        assert torch.equal(got, host.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos))
        looped.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos[:MAX_EOS_IDS])
        assert asked == [2]


def test_a_single_new_token_never_asks_for_the_loop(models):
    """The prefill picks the first token: a loop (a CUDA-graph capture on a GPU) only for a second."""
    host, looped, _ = models
    ids, mask = _prompts(3, 6, seed=2)
    with _loops_asked_for(looped) as asked:
        got = looped.generate(ids, attention_mask=mask, max_new_tokens=1)
        assert asked == []
        looped.generate(ids, attention_mask=mask, max_new_tokens=2)
        assert asked == [3]
    assert torch.equal(got, host.generate(ids, attention_mask=mask, max_new_tokens=1))


def test_sampling_never_asks_for_the_loop(models):
    _, looped, _ = models
    ids, mask = _prompts(2, 6, seed=5)
    with _loops_asked_for(looped) as asked:
        looped.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, seed=0)
    assert asked == []


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs the Triton interpreter")
def test_loop_through_the_triton_kernel_emits_the_host_loops_tokens(models):
    """The loop's tensors as the feedback kernel takes them (strided logits, the history's row
    stride, the per-row counts), in the interpreter: the same tokens and stops as the host loop."""
    from fxopt.kernels.sampling_triton import greedy_feedback_triton
    host, _, _ = models
    looped = fxopt.compile(tiny("llama").eval(), max_batch_size=4, max_seq_len=MAX_SEQ)  # the host's weights (seeded)
    _with_uncaptured_loops(looped, 4, feedback=greedy_feedback_triton)
    ids, mask = _prompts(3, 6, seed=11)
    free = host.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    assert torch.equal(looped.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None), free)
    eos = [int(free[1, 6 + 3])]
    assert torch.equal(looped.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos),
                       host.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos))


def test_the_loop_is_off_without_cuda_or_when_the_option_says_so():
    model = tiny("llama")
    compiled = fxopt.compile(model, max_seq_len=32)
    assert compiled.greedy_loop(1, torch.device("cpu")) is None
    compiled.info.state["cuda_graph"] = {"buckets": [1], "fallback": False, "greedy_loop": False}
    assert compiled.greedy_loop(1, torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_loop_equals_the_host_loop_on_gpu(dtype):
    model = tiny("llama").to("cuda", dtype)
    looped = fxopt.compile(model, max_batch_size=8, max_seq_len=64)
    host = fxopt.compile(model, max_batch_size=8, max_seq_len=64, cuda_graph_greedy_loop=False)
    for n in (1, 3, 8, 3):
        ids, mask = _prompts(n, 7, seed=n)
        free = host.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
        assert torch.equal(looped.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None), free)
        eos = [int(free[0, 7 + 4])]
        assert torch.equal(looped.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos),
                           host.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos))
    assert sorted(looped._runner.greedy_loops) == [1, 4, 8]
    assert host._runner.greedy_loops == {}
