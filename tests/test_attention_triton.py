"""The Triton cached attention (fxopt/kernels/attention_triton.py) against the PyTorch reference.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA. The interpreter gets
bf16 ``tl.dot`` wrong, so bf16 is covered by the GPU-only tests.

Caches start poisoned with NaN in every slot the op may not read: a kernel that reads past a row's
position, outside its window or into another row shows up as NaN in its output. The reference
itself multiplies masked (zero) probabilities by those slots, so it is run on a copy with the
poison zeroed for the expected output, and on the poisoned copy for the expected cache contents.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import attention_triton as at
from fxopt.kernels.attention import cached_attention_reference

pytestmark = pytest.mark.skipif(at.triton is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(batch, heads_q, heads_kv, seq, dim, starts, max_seq, dtype, dim_v=None, seed=0, device=DEVICE):
    """q/k/v as the model makes them (transposed [B, S, H, D] views: non-contiguous), caches with
    slots [0, starts[b]) of row b filled and everything else (one spare row too) NaN."""
    dim_v = dim_v or dim
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rand(batch, seq, heads_q, dim).transpose(1, 2)
    k = rand(batch, seq, heads_kv, dim).transpose(1, 2)
    v = rand(batch, seq, heads_kv, dim_v).transpose(1, 2)
    k_cache = torch.full((batch + 1, heads_kv, max_seq, dim), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full((batch + 1, heads_kv, max_seq, dim_v), float("nan"), device=device, dtype=dtype)
    for b, start in enumerate(starts):
        k_cache[b, :, :start] = rand(heads_kv, start, dim)
        v_cache[b, :, :start] = rand(heads_kv, start, dim_v)
    positions = torch.tensor(starts)[:, None] + torch.arange(seq)
    return q, k, v, k_cache, v_cache, positions.to(device)


def check(q, k, v, k_cache, v_cache, positions, window=0, num_splits=None, op=None, cos=None, sin=None):
    """Run the Triton path on the poisoned caches (updated in place) and compare with the reference."""
    scale = q.shape[-1] ** -0.5
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    cached_attention_reference(q, k, v, expected_k, expected_v, positions, scale, window, cos, sin)
    expected = cached_attention_reference(q, k, v, k_cache.nan_to_num(0), v_cache.nan_to_num(0),
                                          positions, scale, window, cos, sin)
    if op is None:
        out = at.cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale, window, cos, sin,
                                         num_splits=num_splits)
    else:
        out = op(q, k, v, k_cache, v_cache, positions, scale, window, cos, sin)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out).all(), "NaN/inf in the output: a poisoned cache slot was read"
    torch.testing.assert_close(out, expected, **TOL[q.dtype])
    torch.testing.assert_close(k_cache, expected_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, equal_nan=True, atol=0, rtol=0)
    return out


# Positions per row include 0 (the new token alone) and max_seq - 1 (the last slot).
MAX_SEQ = 96
STARTS = [37, 0, MAX_SEQ - 1]


@pytest.mark.parametrize("heads_q, heads_kv, dim, dim_v, batch, window, num_splits, dtype", [
    (4, 4, 16, None, 1, 0, None, torch.float32),
    (4, 4, 64, None, 3, 0, 4, torch.float16),  # a group of one (padded to 16 rows), with splits
    (6, 2, 48, None, 2, 0, 1, torch.float32),  # one split: no combine kernel
    (6, 2, 64, None, 3, 5, 4, torch.float16),
    (6, 2, 48, 32, 3, 0, 2, torch.float32),  # v head dim != k head dim
    (9, 3, 48, None, 3, 0, 3, torch.float32),  # group of 3 padded to 16 rows; splits not a power of 2
    (9, 3, 16, None, 2, 1, 2, torch.float16),  # window 1: only the new token
    (8, 1, 64, None, 3, 0, 4, torch.float32),
    (8, 1, 48, None, 3, 40, None, torch.float16),
])
def test_decode(heads_q, heads_kv, dim, dim_v, batch, window, num_splits, dtype):
    case = make_case(batch, heads_q, heads_kv, 1, dim, STARTS[:batch], MAX_SEQ, dtype, dim_v=dim_v)
    check(*case, window=window, num_splits=num_splits)


@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, starts, window, dtype", [
    (4, 4, 16, 5, [0], 0, torch.float32),
    (6, 2, 48, 7, [0, 10], 0, torch.float16),  # row 1 continues a cached prefix (chunked prefill)
    (9, 3, 64, 20, [0, 3, 40], 6, torch.float32),
    (8, 1, 16, 70, [0, 20], 0, torch.float16),  # two query blocks; positions cross the key blocks
    (8, 1, 48, 70, [5], 17, torch.float32),
])
def test_prefill(heads_q, heads_kv, dim, seq, starts, window, dtype):
    case = make_case(len(starts), heads_q, heads_kv, seq, dim, starts, MAX_SEQ, dtype)
    check(*case, window=window)


@pytest.mark.parametrize("window", [0, 4])
def test_prefill_then_decode(window):
    """A right-padded batch of prompts (lengths 8, 5, 3), then decode steps: each row's first new
    token overwrites its first pad slot, which its queries must never have seen."""
    batch, heads_q, heads_kv, dim, max_seq, prompt = 3, 6, 2, 48, 24, 8
    lengths = torch.tensor([8, 5, 3])
    q, k, v, k_cache, v_cache, positions = make_case(batch, heads_q, heads_kv, prompt, dim, [0] * batch,
                                                     max_seq, torch.float32)
    ref_k, ref_v = k_cache.nan_to_num(0), v_cache.nan_to_num(0)
    scale = dim ** -0.5

    def step(q, k, v, positions, num_splits=None):
        out = at.cached_attention_triton(q, k, v, k_cache, v_cache, positions, scale, window, num_splits=num_splits)
        expected = cached_attention_reference(q, k, v, ref_k, ref_v, positions, scale, window)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, **TOL[torch.float32])

    step(q, k, v, positions)
    for i in range(5):
        q, k, v, _, _, _ = make_case(batch, heads_q, heads_kv, 1, dim, [0] * batch, 1, torch.float32, seed=1 + i)
        step(q, k, v, (lengths + i)[:, None].to(DEVICE), num_splits=(None, 1, 2, 4, 3)[i])
    # Written slots agree with the reference; never-written ones are still NaN.
    written = torch.arange(max_seq) < (lengths + 5).clamp(min=prompt)[:, None]  # [B, max_seq]
    for cache, ref in ((k_cache, ref_k), (v_cache, ref_v)):
        assert torch.equal(cache[:batch].isnan().cpu(), ~written[:, None, :, None].expand(cache[:batch].shape))
        assert cache[batch:].isnan().all()
        torch.testing.assert_close(cache.nan_to_num(0), ref, atol=0, rtol=0)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(heads_kv=st.integers(1, 3), group=st.integers(1, 4), dim=st.sampled_from([16, 32, 48, 64]),
       batch=st.integers(1, 3), seq=st.sampled_from([1, 1, 1, 2, 9]), window=st.sampled_from([0, 0, 1, 7]),
       num_splits=st.sampled_from([None, 1, 2, 3]), dtype=st.sampled_from([torch.float32, torch.float16]),
       data=st.data())
def test_random_shapes(heads_kv, group, dim, batch, seq, window, num_splits, dtype, data):
    max_seq = 80
    starts = data.draw(st.lists(st.integers(0, max_seq - seq), min_size=batch, max_size=batch))
    case = make_case(batch, heads_kv * group, heads_kv, seq, dim, starts, max_seq, dtype)
    check(*case, window=window, num_splits=num_splits)


def rotary_tables(batch, seq, dim, dtype, device=DEVICE, seed=1):
    """cos/sin [batch, seq, dim] as Llama makes them (two equal halves), at random positions."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4000, (batch, seq, 1), generator=g).float()
    freqs = pos * (10000.0 ** (-torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("heads_q, heads_kv, dim, batch, num_splits, dtype, cos_batch, cos_dtype", [
    (4, 4, 16, 1, None, torch.float32, None, None),
    (6, 2, 48, 3, 1, torch.float16, None, None),  # one split: the kernel writes the output itself
    (9, 3, 64, 3, 3, torch.float32, None, None),
    (8, 1, 64, 2, 4, torch.float16, 1, None),  # one cos row for the batch (stride 0)
    (6, 2, 48, 2, 2, torch.float16, None, torch.float32),  # fp32 tables: the rotary kernel first
])
def test_decode_with_rotary(heads_q, heads_kv, dim, batch, num_splits, dtype, cos_batch, cos_dtype):
    """q and the new k rotated inside the decode kernel (the rotary folded in) equal the rotary
    reference then attention: the cache holds the reference's rotated k bit for bit."""
    case = make_case(batch, heads_q, heads_kv, 1, dim, STARTS[:batch], MAX_SEQ, dtype)
    cos, sin = rotary_tables(cos_batch or batch, 1, dim, cos_dtype or dtype)
    q, k = case[:2]
    assert at._rotary_in_decode(q, k, cos, sin) == (cos_dtype is None)
    check(*case, num_splits=num_splits, cos=cos, sin=sin)


@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, starts, window, dtype", [
    (6, 2, 48, 7, [0, 10], 0, torch.float16),
    (8, 1, 16, 70, [0, 20], 5, torch.float32),
])
def test_prefill_with_rotary(heads_q, heads_kv, dim, seq, starts, window, dtype):
    case = make_case(len(starts), heads_q, heads_kv, seq, dim, starts, MAX_SEQ, dtype)
    check(*case, window=window, cos=rotary_tables(len(starts), seq, dim, dtype)[0],
          sin=rotary_tables(len(starts), seq, dim, dtype)[1])


@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, batch", [(4, 4, 16, 5, 1), (6, 2, 48, 13, 3), (9, 3, 64, 1, 2)])
def test_prompt_attention_is_causal_attention_over_the_prompt(heads_q, heads_kv, dim, seq, batch):
    """prompt_attention (the CPU reference here) on prompts at slots 0..S-1: plain causal attention
    over q, k, v, and k/v written into slots 0..S-1 of each row's caches, the rest untouched."""
    q, k, v, k_cache, v_cache, positions = make_case(batch, heads_q, heads_kv, seq, dim, [0] * batch, MAX_SEQ,
                                                     torch.float32, device="cpu")
    out = torch.ops.fxopt.prompt_attention(q, k, v, k_cache, v_cache, positions, dim ** -0.5, 0)
    group = heads_q // heads_kv
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True, scale=dim ** -0.5)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    assert out.transpose(1, 2).is_contiguous()  # token-major: the model's transpose + reshape is a view
    torch.testing.assert_close(k_cache[:batch, :, :seq], k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache[:batch, :, :seq], v, atol=0, rtol=0)
    assert k_cache[:, :, seq:].isnan().all() and k_cache[batch:].isnan().all()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # the fake's layout is the reference's
        args = [mode.from_tensor(t) for t in (q, k, v, k_cache, v_cache, positions)]
        fake = torch.ops.fxopt.prompt_attention(*args, dim ** -0.5, 0)
    # (a dim of size 1 may have any stride)
    assert [st for st, n in zip(fake.stride(), fake.shape) if n > 1] == [st for st, n in zip(out.stride(), out.shape) if n > 1]


@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, batch, rotary", [
    (6, 2, 48, 13, 2, True),  # GQA: the rotary kernel writes k and v into the caches
    (4, 4, 16, 70, 1, True),  # several heads a rotary program
    (6, 2, 48, 13, 2, False),  # no rotary: write_cache
])
def test_prompt_attention_cuda_path(heads_q, heads_kv, dim, seq, batch, rotary, monkeypatch):
    """prompt_attention's CUDA implementation, run here on the CPU (its kernels in the interpreter,
    fp16; SDPA's CPU kernel): causal attention over the prompt, k/v in the caches exactly (by the
    rotary kernel itself when there is a rotary), the output token-major."""
    dtype = torch.float16
    writes = []
    monkeypatch.setattr(at, "write_cache", lambda *a, _write=at.write_cache: writes.append(_write(*a)))
    case = make_case(batch, heads_q, heads_kv, seq, dim, [0] * batch, MAX_SEQ, dtype)
    cos, sin = rotary_tables(batch, seq, dim, dtype) if rotary else (None, None)
    out = check(*case, op=at.prompt_attention_cuda, cos=cos, sin=sin)
    assert out.transpose(1, 2).is_contiguous()
    assert len(writes) == (0 if rotary else 1)


@pytest.mark.parametrize("heads_q, heads_kv, dim, starts, rotary", [(6, 2, 48, [0, 0], True), (4, 4, 16, [3], False)])
def test_prefill_writes_a_token_major_output_when_asked(heads_q, heads_kv, dim, starts, rotary):
    """The Triton prefill path (prompt_attention's fallback on CUDA) writes its output
    [B, Hq, S, D] with [B, S, Hq, D] in memory, same values."""
    seq, dtype = 11, torch.float32
    case = make_case(len(starts), heads_q, heads_kv, seq, dim, starts, MAX_SEQ, dtype)
    cos, sin = rotary_tables(len(starts), seq, dim, dtype) if rotary else (None, None)
    op = lambda *a: at.cached_attention_triton(*a, token_major_out=True)  # noqa: E731
    out = check(*case, op=op, cos=cos, sin=sin)
    assert out.transpose(1, 2).is_contiguous()


def test_num_splits_bounds():
    dev = torch.device(DEVICE)
    for batch, heads_kv, max_seq in ((1, 32, 4096), (32, 32, 4096), (1, 8, 128), (3, 1, 16), (1, 1, 4096)):
        n = at.decode_num_splits(batch, heads_kv, max_seq, dev)
        assert 1 <= n <= 64 and n & (n - 1) == 0  # a power of two
        assert n <= at._pow2(-(-max_seq // at.DECODE_BLOCK_N))  # no more splits than cache blocks (rounded)


@pytest.mark.parametrize("min_blocks, splits", [(1, 4), (2, 4), (3, 2), (4, 2), (5, 1), (8, 1)])
def test_num_splits_follow_the_blocks_a_split_must_own(monkeypatch, min_blocks, splits):
    # 300 slots are 5 blocks of 64; at least min_blocks a split, rounded up to a power of two.
    # (The interpreter counts 4 SMs: one row, one kv head wants 4 programs.)
    monkeypatch.setattr(at, "DECODE_MIN_BLOCKS_PER_SPLIT", min_blocks)
    assert at.decode_num_splits(1, 1, 300, torch.device("cpu"), block_n=64) == splits


@pytest.mark.parametrize("min_blocks", [1, 4])
def test_decode_is_right_with_fewer_splits(monkeypatch, min_blocks):
    # The split count the launcher picks: 4 splits and their merge, or one split and no merge.
    monkeypatch.setattr(at, "DECODE_MIN_BLOCKS_PER_SPLIT", min_blocks)
    assert at.decode_num_splits(1, 1, 200, torch.device(DEVICE)) == (4 if min_blocks == 1 else 1)
    check(*make_case(1, 3, 1, 1, 40, [171], 200, torch.float32, seed=min_blocks))


def test_register_is_idempotent():
    assert at.register() and at.register()


# --------------------------------------------------------------------------------------------- #
# CUDA: the registered op in bf16/fp16, and decode captured in a CUDA graph.
# --------------------------------------------------------------------------------------------- #

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, starts, window", [
    (32, 32, 128, 1, [700, 0, 2047], 0),  # llama2-7b decode
    (32, 8, 64, 1, [1500, 3], 0),  # llama-3.2-1b decode
    (9, 3, 48, 1, [100, 2047, 30], 64),
    (32, 8, 64, 300, [0, 1000], 0),  # prefill, and a continued one
    (9, 3, 48, 129, [0, 1900], 100),
])
def test_gpu_registered_op(dtype, heads_q, heads_kv, dim, seq, starts, window):
    at.register()
    case = make_case(len(starts), heads_q, heads_kv, seq, dim, starts, 2048, dtype, device="cuda")
    check(*case, window=window, op=torch.ops.fxopt.cached_attention)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, starts", [
    (32, 32, 128, 1, [700, 0, 2047]),  # llama2-7b decode: rotary in the kernel
    (32, 8, 64, 1, [1500, 3]),  # llama-3.2-1b
    (9, 3, 64, 1, [100, 2047, 30]),
    (32, 8, 64, 300, [0, 1000]),  # prefill: the rotary kernel first
])
def test_gpu_rotary_folded(dtype, heads_q, heads_kv, dim, seq, starts):
    """cached_attention with cos/sin on the GPU: the rotated k in the cache equals the reference's
    bit for bit (the kernel repeats the reference's roundings, no FMA contraction)."""
    at.register()
    case = make_case(len(starts), heads_q, heads_kv, seq, dim, starts, 2048, dtype, device="cuda")
    cos, sin = rotary_tables(len(starts), seq, dim, dtype, device="cuda")
    check(*case, op=torch.ops.fxopt.cached_attention, cos=cos, sin=sin)


@pytest.mark.gpu
def test_gpu_decode_in_cuda_graph():
    """No host sync: the decode step captures, and replays follow new positions written in place."""
    at.register()
    batch, heads_q, heads_kv, dim, max_seq, dtype = 4, 32, 8, 64, 1024, torch.bfloat16
    starts = [10, 500, 0, 1023]
    q, k, v, k_cache, v_cache, positions = make_case(batch, heads_q, heads_kv, 1, dim, starts, max_seq, dtype,
                                                     device="cuda")
    k_cache, v_cache = k_cache.nan_to_num(0), v_cache.nan_to_num(0)
    op = torch.ops.fxopt.cached_attention
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) off the capture
        op(q, k, v, k_cache.clone(), v_cache.clone(), positions, dim ** -0.5, 0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, k_cache, v_cache, positions, dim ** -0.5, 0)
    for new_starts in ([11, 501, 1, 1000], [900, 3, 64, 5]):
        positions.copy_(torch.tensor(new_starts, device="cuda")[:, None])
        q.copy_(torch.randn_like(q))
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        expected = cached_attention_reference(q, k, v, ref_k, ref_v, positions, dim ** -0.5, 0)
        graph.replay()
        torch.testing.assert_close(out, expected, **TOL[dtype])
        torch.testing.assert_close(k_cache, ref_k, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads_q, heads_kv, dim, seq, batch, window", [
    (32, 32, 128, 2048, 1, 0),  # llama2-7b prefill
    (32, 8, 64, 777, 2, 0),  # llama-3.2-1b heads (GQA), odd length
    (9, 3, 64, 129, 3, 0),  # SmolLM2 heads
    (6, 2, 48, 70, 2, 17),  # a sliding window: the cached path
])
def test_gpu_prompt_attention(dtype, heads_q, heads_kv, dim, seq, batch, window):
    """The registered CUDA prompt_attention (cuDNN/flash SDPA, or the Triton cached path for
    windows and fp32) against the reference, eagerly and replayed from a CUDA graph; with and
    without the rotary; its output token-major on every path."""
    at.register()
    case = make_case(batch, heads_q, heads_kv, seq, dim, [0] * batch, seq + 40, dtype, device="cuda")
    out = check(*case, window=window, op=torch.ops.fxopt.prompt_attention)
    assert out.transpose(1, 2).is_contiguous()
    cos, sin = rotary_tables(batch, seq, dim, dtype, device="cuda")
    out = check(*make_case(batch, heads_q, heads_kv, seq, dim, [0] * batch, seq + 40, dtype, seed=5, device="cuda"),
                window=window, op=torch.ops.fxopt.prompt_attention, cos=cos, sin=sin)
    assert out.transpose(1, 2).is_contiguous()
    q, k, v, k_cache, v_cache, positions = case
    op = lambda: torch.ops.fxopt.prompt_attention(q, k, v, k_cache, v_cache, positions, dim ** -0.5, window)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op()
    q.copy_(torch.randn_like(q))
    k.copy_(torch.randn_like(k))
    expected = cached_attention_reference(q, k, v, k_cache.nan_to_num(0), v_cache.nan_to_num(0), positions,
                                          dim ** -0.5, window)
    graph.replay()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    torch.testing.assert_close(k_cache[:batch, :, :seq], k.to(dtype), atol=0, rtol=0)
