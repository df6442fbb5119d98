"""The Triton weight-only quantized linear (fxopt/kernels/quant_triton.py) against
``quant_linear_reference``.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in fp32 and fp16 (the interpreter gets bf16 ``tl.dot`` wrong); with one, the
same tests run the compiled kernels on CUDA, and the ``gpu`` tests also go through
``torch.ops.fxopt.quant_linear`` after ``register()``, in bf16 and fp16.

Poison: every output is passed in pre-filled with NaN (``out=``) and every split-K partial buffer
is handed out NaN-filled, so an element the kernels fail to write shows up as NaN. x, the scales
and the bias are views into larger NaN-filled buffers (an extra row of x, an extra row and column
of scales, extra bias entries), so a read past M, past K, past the last group or past N shows up as
NaN too (NaN times a masked zero is still NaN). No NaN ever passes a comparison.

Shapes are small and odd on purpose: in_features 99 (odd: a padding nibble with 4 bits), 100, 48
and 576 (SmolLM2: 4.5 groups of 128), out_features 37, M = 1 (the FMA GEMV), 3 (the decode
kernel's dot branch) and 17 (the prefill kernel); groups of 32/64/128 (power-of-two runs), the
whole row, 20/48 (runs of 4/16 inside groups that straddle blocks) and 7 (runs of one feature: a
4-bit byte may straddle two groups). Every decode knob (``DECODE_DEFAULTS``) is exercised, and the
dequantize kernel must match ``quant.dequantize_weight`` bit for bit (bf16 too: the kernel rounds
with integer ops in the interpreter, which truncates fp32 -> bf16 itself).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fxopt.kernels import quant_triton as qt
from fxopt.kernels.quant import dequantize_weight, quant_linear_reference, quantize_weight

pytestmark = pytest.mark.skipif(qt.triton is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16/bf16: the dot paths round the dequantized weight where the reference does, the GEMV path
# does not (one ulp of a weight at most); with fp32 accumulation either way the outputs differ by
# about an ulp of the output dtype.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAN = float("nan")


@pytest.fixture(autouse=True)
def poisoned_partials(monkeypatch):
    """Split-K partials start as NaN: the reduction must only read what the decode kernel wrote.
    After each test the fused reduction's arrival counters must be back at zero."""
    monkeypatch.setattr(qt, "_alloc_partials",
                        lambda shape, device: torch.full(shape, NAN, dtype=torch.float32, device=device))
    yield
    for counters in qt._COUNTERS.values():
        assert int(counters.abs().sum()) == 0, "a fused split-K reduction left its counters set"


def make_case(m, n, k, group, bits, dtype, bias=True, seed=0, lead=(), device=DEVICE):
    """(x, qweight, scales, bias) for an [n, k] random weight quantized by quantize_weight.
    x is [*lead, m, k]; x, scales and bias are views into NaN-filled buffers one larger each way."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    qweight, scales = quantize_weight(w, group, bits)

    x_buf = torch.full((*lead, m + 1, k + 3), NAN, dtype=dtype)
    x_buf[..., :m, :k] = torch.randn(*lead, m, k, generator=g).to(dtype)
    s_buf = torch.full((n + 1, scales.shape[1] + 1), NAN, dtype=dtype)
    s_buf[:n, :scales.shape[1]] = scales
    # The weight rows get a wider stride too (ints cannot be poisoned, but the stride is exercised).
    q_buf = torch.zeros((n, qweight.shape[1] + 5), dtype=qweight.dtype)
    q_buf[:, :qweight.shape[1]] = qweight
    b = None
    if bias:
        b_buf = torch.full((n + 2,), NAN, dtype=dtype)
        b_buf[:n] = torch.randn(n, generator=g).to(dtype)
        b = b_buf.to(device)[:n]
    return (x_buf.to(device)[..., :m, :k], q_buf.to(device)[:, :qweight.shape[1]],
            s_buf.to(device)[:n, :scales.shape[1]], b)


def check(case, group, bits, k, op=None, **kw):
    x, qweight, scales, bias = case
    expected = quant_linear_reference(x, qweight, scales, bias, group, bits, k)
    assert not torch.isnan(expected).any(), "the test itself read poison"
    if op is None:
        out = torch.full(expected.shape, NAN, dtype=x.dtype, device=x.device)
        got = qt.quant_linear_triton(x, qweight, scales, bias, group, bits, k, out=out, **kw)
        assert got is out
    else:
        got = op(x, qweight, scales, bias, group, bits, k)
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype)
    assert not torch.isnan(got).any(), "NaN in the output: an element not written, or poison read"
    torch.testing.assert_close(got, expected, **TOL[x.dtype])
    return got


# --------------------------------------------------------------------------------------------- #
# Both paths, both bit widths, ragged shapes
# --------------------------------------------------------------------------------------------- #

CASES = [  # m, n, k, group, bias
    (1, 37, 99, 32, True),  # GEMV; odd K: ragged last group (3 features) and a padding nibble
    (3, 37, 576, 128, False),  # SmolLM2's 576 = 4.5 groups of 128
    (17, 37, 100, 64, True),  # prefill
    (1, 37, 576, 64, False),
    (3, 37, 99, 99, True),  # one group for the whole row
    (17, 37, 48, 48, False),
    (1, 37, 100, 48, True),  # groups of 48 straddle the blocks: scales per run of 16
    (3, 37, 99, 20, False),  # a group smaller than any block (runs of 4)
    (1, 37, 99, 7, True),  # odd groups: runs of one feature, 4-bit bytes straddling two groups
    (3, 37, 100, 7, False),
    (17, 37, 99, 48, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, n, k, group, bias", CASES)
def test_matches_reference(m, n, k, group, bias, bits, dtype):
    check(make_case(m, n, k, group, bits, dtype, bias, seed=m + k + group), group, bits, k)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3, 100])
def test_decode_split_k(m, bits, split_k):
    """One split (the kernel writes y and the bias itself), a few, and more than K has blocks
    (clamped: no empty split). The default split count is exercised by every other test."""
    k, group = 576, 32  # 18 blocks of 32
    check(make_case(m, 37, k, group, bits, torch.float32, seed=split_k), group, bits, k, split_k=split_k)


@pytest.mark.parametrize("path, m", [("decode", 17), ("decode", 64), ("prefill", 1), ("prefill", 3),
                                     ("dequant", 1), ("dequant", 5)])
@pytest.mark.parametrize("bits", [8, 4])
def test_forced_path(path, m, bits):
    """Every path is correct at any M it accepts (decode pads 17 rows to 32, 64 to 64)."""
    k, group = 100, 32
    check(make_case(m, 37, k, group, bits, torch.float16, seed=m), group, bits, k, path=path)


def test_decode_rejects_too_many_rows():
    case = make_case(65, 8, 32, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="at most"):
        qt.quant_linear_triton(*case, 32, 8, 32, path="decode")


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_grouped_tiles(bits):
    """Small tiles so the grouped launch order has several row blocks, a partial group of them and
    ragged edges in every direction: every tile is written exactly where it belongs."""
    k, group = 99, 32
    cfg = dict(block_m=16, block_n=16, block_k=32, group_m=3)
    check(make_case(70, 37, k, group, bits, torch.float32, seed=5), group, bits, k, path="prefill", config=cfg)


@pytest.mark.parametrize("bits", [8, 4])
def test_small_decode_blocks(bits):
    """Many K blocks and N blocks (block_n 16, block_k 16), the default split."""
    k, group = 99, 64
    cfg = dict(block_n=16, block_k=16)
    for m in (1, 5):
        check(make_case(m, 37, k, group, bits, torch.float32, seed=m), group, bits, k, config=cfg)


def test_leading_dims_and_tiny_shapes():
    """x [2, 3, K] (batch, seq) flattens to M = 6; a single output feature; a single input feature."""
    check(make_case(3, 37, 100, 32, 4, torch.float32, lead=(2,)), 32, 4, 100)
    check(make_case(2, 1, 48, 16, 8, torch.float32), 16, 8, 48)
    check(make_case(1, 5, 1, 128, 4, torch.float32), 128, 4, 1)
    check(make_case(20, 5, 1, 1, 8, torch.float16), 1, 8, 1)


def test_empty_rows():
    x, qweight, scales, bias = make_case(1, 37, 48, 16, 8, torch.float32)
    out = qt.quant_linear_triton(x[:0], qweight, scales, bias, 16, 8, 48)
    assert out.shape == (0, 37)


def test_non_contiguous_x_is_copied():
    """x whose last dim is strided (a transpose) still works (copied to unit stride first)."""
    x, qweight, scales, bias = make_case(3, 37, 64, 32, 8, torch.float32)
    xt = x.detach().clone().t().contiguous().t()  # same values, strides (1, 3)
    assert xt.stride(-1) != 1
    check((xt, qweight, scales, bias), 32, 8, 64)


def test_supported():
    x, qweight, scales, bias = make_case(2, 37, 99, 32, 4, torch.float32)
    assert qt.supported(x, qweight, scales, bias, 32, 4, 99)
    assert not qt.supported(x, qweight, scales, bias, 32, 8, 99)  # uint8 weight read as int8
    assert not qt.supported(x, qweight, scales, bias, 64, 4, 99)  # wrong number of groups
    assert not qt.supported(x.double(), qweight, scales, bias, 32, 4, 99)
    assert not qt.supported(x[..., :98], qweight, scales, bias, 32, 4, 98)
    assert not qt.supported(x, qweight, scales, bias[:5], 32, 4, 99)
    assert not qt.supported(x, qweight, scales, bias, 32, 3, 99)
    with pytest.raises(ValueError, match="unsupported"):
        qt.quant_linear_triton(x, qweight, scales, bias, 64, 4, 99)


@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_impl_falls_back(bits):
    """The function registered for CUDA takes the reference for what the kernels do not support
    (here fp64 activations) and the kernels otherwise."""
    x, qweight, scales, bias = make_case(2, 37, 99, 32, bits, torch.float32)
    got = qt._cuda_impl(x.double(), qweight, scales, bias, 32, bits, 99)
    expected = quant_linear_reference(x.double(), qweight, scales, bias, 32, bits, 99)
    torch.testing.assert_close(got, expected)
    check((x, qweight, scales, bias), 32, bits, 99, op=qt._cuda_impl)


# --------------------------------------------------------------------------------------------- #
# Decode knobs, split-K reductions, plans
# --------------------------------------------------------------------------------------------- #

GEMV_CONFIGS = [  # M = 1
    dict(block_k=64),  # the defaults otherwise: runs of 16, native conversion
    dict(convert="magic", sub_k=1, block_k=32, num_stages=1),  # a scale per weight, straight to registers
    dict(convert="magic", sub_k=2, block_k=128, block_n=8, num_stages=2),  # int4: one byte a run
    dict(convert="cast", sub_k=64, block_k=256, block_n=4, num_warps=2),  # blocks wider than the groups
    dict(dot=True, block_k=64, block_n=32),  # M = 1 on the tensor-core kernel
    dict(block_k=32, scales_ahead=True),  # scales loaded a step ahead
]
DOT_CONFIGS = [  # M > 1
    dict(block_k=32, block_n=16),  # every K block inside one group: the scale multiplies the dot
    dict(block_k=128, block_n=32, num_stages=2),  # blocks wider than the group: scaled weights
    dict(block_k=32, block_n=16, scales_ahead=True),
]


@pytest.mark.parametrize("k, group", [(99, 32), (576, 64), (100, 20), (99, 7)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, config", [(1, c) for c in GEMV_CONFIGS] + [(3, c) for c in DOT_CONFIGS])
def test_decode_configs(m, config, bits, k, group):
    """Each decode tile knob against the reference: FMA or tensor cores, the magic conversion, run
    lengths from one weight to wider than the group, K blocks inside or across groups."""
    dtype = torch.float16 if config.get("dot") or m > 1 else torch.float32
    check(make_case(m, 37, k, group, bits, dtype, seed=k + group + m), group, bits, k, config=config)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, config", [(1, dict(block_k=32)), (1, dict(block_k=32, convert="magic", num_stages=1)),
                                       (3, dict(block_k=32)), (1, dict(block_k=32, dot=True))])
def test_fused_reduce(m, config, bits, monkeypatch):
    """Split-K summed by the last program to arrive: correct (bias included), the counters reset
    (checked after every test), the same bits on a second run; and the reduce kernel stands in when
    the counters cannot be allocated (during a CUDA-graph capture)."""
    k, group = 576, 64  # 18 blocks of 32
    case = make_case(m, 37, k, group, bits, torch.float32, seed=bits + m)
    config = dict(config, fused_reduce=True)
    first = check(case, group, bits, k, split_k=5, config=config)
    assert qt._COUNTERS, "the fused reduction did not run"
    again = qt.quant_linear_triton(*case, group, bits, k, split_k=5, config=config)
    assert torch.equal(first, again)
    monkeypatch.setattr(qt, "_split_counters", lambda device, n: None)
    check(case, group, bits, k, split_k=5, config=config)


def test_decode_plan():
    cpu = torch.device("cpu")  # 4 notional SMs
    plan = qt.decode_plan(1, 4096, 4096, 128, cpu, bits=8)
    assert plan["block_m"] == 1 and plan["sub"] == min(qt.DECODE_DEFAULTS["sub_k"], 128) and plan["split_k"] == 1
    assert qt.decode_plan(1, 37, 100, 48, cpu, config=dict(sub_k=64))["sub"] == 16  # 48 = 3 x 16
    assert qt.decode_plan(1, 37, 99, 7, cpu)["sub"] == 1
    whole = qt.decode_plan(1, 37, 99, 99, cpu, config=dict(sub_k=256, block_k=64))
    assert whole["group"] == qt.WHOLE_ROW and whole["sub"] == 64 and whole["block_k"] == 64
    dot = qt.decode_plan(3, 37, 576, 128, cpu, config=dict(block_k=256, block_n=8))
    assert dot["block_m"] == 16 and dot["sub"] == 128 and dot["block_n"] == 16  # tl.dot's minimum
    assert qt.decode_plan(1, 37, 99, 32, cpu, config=dict(dot=True))["block_m"] == 16
    # Splits: rounded to the waves' program count, never more than K has blocks (two each).
    assert qt.decode_split_k(n_blocks=2, k_blocks=100, waves=2, device=cpu) == 4
    assert qt.decode_split_k(n_blocks=5, k_blocks=100, waves=2, device=cpu) == 2  # 8 / 5 rounds to 2
    assert qt.decode_split_k(n_blocks=7, k_blocks=100, waves=2, device=cpu) == 1
    assert qt.decode_split_k(n_blocks=1, k_blocks=5, waves=2, device=cpu) == 2
    assert qt.decode_split_k(n_blocks=1, k_blocks=100, waves=0, device=cpu) == 1
    # The M buckets: the first entry that covers M, the last one beyond the table.
    for bits, table in qt.DECODE_TILES.items():
        assert qt.decode_tiles(1, bits) == {**qt.DECODE_DEFAULTS, **table[0][1]}
        assert qt.decode_tiles(10 ** 6, bits) == {**qt.DECODE_DEFAULTS, **table[-1][1]}
    with pytest.raises(ValueError, match="power of two"):
        qt.decode_plan(1, 37, 99, 32, cpu, config=dict(block_k=100))
    with pytest.raises(ValueError, match="unknown config keys"):
        qt.decode_plan(1, 37, 99, 32, cpu, config=dict(block_q=16))


# --------------------------------------------------------------------------------------------- #
# Dequantize kernel and the dequantize + matmul path
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k, group, config", [
    (99, 32, None), (576, 128, None), (100, 48, None), (99, 7, dict(block_k=32)), (99, 99, None), (1, 128, None),
    (576, 64, dict(block_n=8, block_k=512, num_warps=2)),
])
def test_dequantize_bit_exact(k, group, config, bits, dtype):
    """dequantize_triton == quant.dequantize_weight bit for bit: ragged K, odd K with 4 bits, odd
    groups, one group for the row; strided weight rows and NaN-poisoned scales and output."""
    _, qweight, scales, _ = make_case(1, 37, k, group, bits, dtype, seed=k + group)
    expected = dequantize_weight(qweight, scales, group, bits, k, dtype)
    out = torch.full((37, k), NAN, dtype=dtype, device=DEVICE)
    got = qt.dequantize_triton(qweight, scales, group, bits, k, dtype, out=out, config=config)
    assert got is out and not torch.isnan(got).any()
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequant_path_chunked(bits, dtype, monkeypatch):
    """path="dequant" in row chunks (a small DEQUANT_MAX_NUMEL: 8 chunks of 5 rows), with bias and
    leading dims; and the automatic choice of the path by M."""
    k, group = 99, 32
    monkeypatch.setattr(qt, "DEQUANT_MAX_NUMEL", 5 * k)
    check(make_case(4, 37, k, group, bits, dtype, lead=(2,)), group, bits, k, path="dequant")
    calls = []
    dequant_linear = qt._dequant_linear
    monkeypatch.setattr(qt, "_dequant_linear", lambda *a: calls.append(a) or dequant_linear(*a))
    monkeypatch.setattr(qt, "DECODE_MAX_M", 16)
    monkeypatch.setattr(qt, "DEQUANT_MIN_M", 20)
    check(make_case(19, 37, k, group, bits, dtype), group, bits, k)  # prefill
    assert not calls
    check(make_case(20, 37, k, group, bits, dtype), group, bits, k)
    assert len(calls) == 1


def test_default_path(monkeypatch):
    assert qt.default_path(1) == qt.default_path(qt.DECODE_MAX_M) == "decode"
    assert qt.default_path(qt.DEQUANT_MIN_M) == qt.default_path(10 ** 6) == "dequant"
    monkeypatch.setattr(qt, "DECODE_MAX_M", 16)
    monkeypatch.setattr(qt, "DEQUANT_MIN_M", 128)
    assert qt.default_path(17) == qt.default_path(127) == "prefill"
    assert qt.default_path(128) == "dequant"
    case = make_case(2, 8, 32, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="path must be"):
        qt.quant_linear_triton(*case, 32, 8, 32, path="gemv")


# Random shapes, paths and decode knobs. Decode configs are drawn whole (tile, run length,
# conversion, stages, dot, fused reduction, scales) and only passed where the decode kernel runs.
DECODE_CONFIG = st.fixed_dictionaries({}, optional=dict(
    block_n=st.sampled_from([4, 16, 32]), block_k=st.sampled_from([16, 32, 128]), sub_k=st.sampled_from([1, 4, 16]),
    convert=st.sampled_from(qt.CONVERTS), dot=st.booleans(), scales_ahead=st.booleans(),
    num_stages=st.sampled_from([1, 2]), fused_reduce=st.booleans()))


@settings(HYPOTHESIS, max_examples=40)
@given(m=st.integers(1, 20), n=st.integers(1, 40), k=st.integers(1, 160), bits=st.sampled_from([8, 4]),
       group=st.sampled_from([16, 32, 64, 7, 48, 20, 1000]), bias=st.booleans(), seed=st.integers(0, 2 ** 16),
       path=st.sampled_from([None, "decode", "prefill", "dequant"]), config=DECODE_CONFIG,
       split_k=st.sampled_from([None, 1, 2, 5]))
def test_hypothesis(m, n, k, bits, group, bias, seed, path, config, split_k):
    decode = path == "decode" or (path is None and m <= qt.DECODE_MAX_M)
    kw = dict(config=config, split_k=split_k) if decode else {}
    check(make_case(m, n, k, group, bits, torch.float32, bias, seed=seed), group, bits, k, path=path, **kw)


# --------------------------------------------------------------------------------------------- #
# GPU: the registered op in bf16/fp16, llama shapes, CUDA graphs
# --------------------------------------------------------------------------------------------- #

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, n, k, group, bias", [
    (1, 4096, 4096, 128, False),  # llama2-7b q/k/v/o decode
    (8, 11008, 4096, 128, False),  # gate/up, batched decode
    (16, 4096, 11008, 128, True),  # down, the last decode M
    (17, 4096, 4096, 128, False),  # the first fused-prefill M
    (300, 1536, 576, 128, True),  # SmolLM2 (576 = 4.5 groups), dequantize + cuBLAS
    (1, 576, 1536, 64, False),
    (5, 37, 99, 48, True),  # odd everything, runs of 16
    (3, 37, 99, 7, True),  # runs of one feature
    (129, 37, 99, 99, True),
])
def test_gpu_registered_op(m, n, k, group, bias, bits, dtype):
    qt.register()
    check(make_case(m, n, k, group, bits, dtype, bias, device="cuda"), group, bits, k, op=torch.ops.fxopt.quant_linear)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path, m", [("decode", 32), ("decode", 64), ("prefill", 1), ("prefill", 2048),
                                     ("dequant", 1), ("dequant", 2048)])
def test_gpu_paths_bf16(path, m, bits):
    """Every path at the M where another is the default, in bf16 (compiled tl.dot)."""
    check(make_case(m, 4096, 4096, 128, bits, torch.bfloat16, device="cuda"), 128, bits, 4096, path=path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, config", [
    (1, dict(convert="magic")), (1, dict(convert="cast", num_stages=1)), (1, dict(sub_k=128, block_k=1024)),
    (1, dict(convert="i2f", block_n=16, block_k=1024)), (1, dict(convert="mixed", block_n=16, block_k=1024)),
    (1, dict(dot=True, block_n=64, block_k=128)), (1, dict(block_n=64, block_k=256, fused_reduce=True)),
    (4, dict(block_n=64, block_k=256)), (8, dict(block_n=32, block_k=128, fused_reduce=True)),
    (16, dict(block_n=128, block_k=64, num_warps=8, waves=0)),
])
def test_gpu_decode_configs(m, config, bits, dtype):
    """Decode knobs compiled for the GPU (tl.dot in bf16, cp.async pipelining, the fused split-K
    reduction with real atomics), at llama shapes."""
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        check(make_case(m, n, k, 128, bits, dtype, device="cuda"), 128, bits, k, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k, group", [(4096, 4096, 128), (37, 99, 7), (576, 1536, 64), (300, 576, 128)])
def test_gpu_conversions_agree(n, k, group, dtype):
    """The M = 1 GEMV's int8 -> fp32 conversions are exact, so every one gives the bits the cast
    gives: the PTX ones ("i2f", "mixed") run only on a GPU (the interpreter takes the cast for them),
    and this is where a wrong byte select or sign would show. Weights span all of -127..127."""
    case = make_case(1, n, k, group, 8, dtype, True, device="cuda", seed=n + k)
    assert int(case[1].min()) == -127 and int(case[1].max()) == 127
    results = {c: qt.quant_linear_triton(*case, group, 8, k, path="decode", config=dict(convert=c, block_n=16))
               for c in qt.CONVERTS}
    check(case, group, 8, k, path="decode", config=dict(convert="cast", block_n=16))
    for convert, y in results.items():
        assert torch.equal(y, results["cast"]), f"convert={convert!r} differs from the cast"


def test_convert_plan():
    """PTX conversions only where they run: int8, the FMA GEMV, not the interpreter."""
    cpu = torch.device("cpu")
    for convert in qt.CONVERTS:
        plan = qt.decode_plan(1, 64, 256, 128, cpu, config=dict(convert=convert), bits=8)
        assert plan["convert"] == (convert if convert in ("cast", "magic") or not qt.INTERPRET else "cast")
        assert qt.decode_plan(1, 64, 256, 128, cpu, config=dict(convert=convert), bits=4)["convert"] == (
            "cast" if convert == "cast" else "magic")
        assert qt.decode_plan(1, 64, 256, 128, cpu, config=dict(convert=convert, dot=True))["convert"] == "cast"
    with pytest.raises(ValueError, match="convert must be one of"):
        qt.decode_plan(1, 64, 256, 128, cpu, config=dict(convert="fast"))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, fused", [(1, False), (8, False), (8, True), (8, "capture first")])
def test_gpu_decode_in_cuda_graph(m, fused, bits, monkeypatch):
    """No host sync: decode (with split-K and its reduction: a second kernel, or the fused one;
    with counters allocated at warm-up, or first needed during the capture, where the second
    kernel stands in) captures, and replays follow new x written in place."""
    qt.register()
    if fused:
        for _, tiles in qt.DECODE_TILES[bits]:
            monkeypatch.setitem(tiles, "fused_reduce", True)
    monkeypatch.setattr(qt, "_COUNTERS", {})
    k, n, group, dtype = 4096, 4096, 128, torch.bfloat16
    x, qweight, scales, bias = make_case(m, n, k, group, bits, dtype, device="cuda")
    x = x.contiguous()
    op = torch.ops.fxopt.quant_linear
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) off the capture
        op(x, qweight, scales, bias, group, bits, k)
    torch.cuda.current_stream().wait_stream(stream)
    if fused == "capture first":
        qt._COUNTERS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, qweight, scales, bias, group, bits, k)
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        expected = quant_linear_reference(x, qweight, scales, bias, group, bits, k)
        torch.testing.assert_close(out, expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------- #
# Folded prologue and residual (fold_linear): in the decode kernel for one row, composed for more
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("prologue", ["rms_norm", "gated_silu", "gated_gelu_tanh", "none"])
@pytest.mark.parametrize("m, k, group", [(1, 99, 32), (1, 576, 128), (3, 100, 64)])
def test_folded_prologue_and_residual(m, k, group, prologue, bits):
    dtype, n = torch.float32, 37
    g = torch.Generator().manual_seed(k + m)
    x, qweight, scales, _ = make_case(m, n, k, group, bits, dtype, bias=False, seed=k)
    if prologue.startswith("gated_"):
        x = torch.randn(m, 2 * k, generator=g).to(DEVICE)  # [gate | up]
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if prologue == "rms_norm" else None
    residual = torch.randn(m, n, generator=g).to(DEVICE)
    args = (x, qweight, scales, None, group, bits, k, residual, prologue, norm_weight, 1e-5)
    expected = quant_linear_reference(*args)
    got = qt.quant_linear_triton(*args)
    assert not torch.isnan(got).any()
    # rms_norm: rstd scales the fp32 sum instead of each input element (a few ulps apart)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "gated_silu"])
@pytest.mark.parametrize("m, bias", [(1, False), (5, True), (qt.DEQUANT_MIN_M + 4, False), (qt.DEQUANT_MIN_M, True)])
def test_quant_linear_add_updates_the_residual_in_place(m, bias, prologue, bits, monkeypatch):
    """``quant_linear_add_``'s launcher leaves ``residual + quant_linear(...)`` in the residual's own
    storage: the decode kernels writing into the residual they add, prompts without a bias through
    the prologue and the dequantize path accumulating into it, the rest (a bias on that path)
    through ``quant_linear`` and a copy."""
    copied = []
    real = qt._cuda_impl
    monkeypatch.setattr(qt, "_cuda_impl", lambda *a: copied.append(a[0].shape[0]) or real(*a))
    k, n, group = 100, 37, 32
    g = torch.Generator().manual_seed(m + bits)
    x, qweight, scales, b = make_case(m, n, k, group, bits, torch.float32, bias=bias, seed=m)
    if prologue.startswith("gated_"):
        x = torch.randn(m, 2 * k, generator=g).to(DEVICE)  # [gate | up]
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if prologue == "rms_norm" else None
    residual = torch.randn(m, n, generator=g).to(DEVICE)
    expected = quant_linear_reference(x, qweight, scales, b, group, bits, k, residual, prologue, norm_weight, 1e-5)
    ptr = residual.data_ptr()
    assert qt.quant_linear_add_triton(x, qweight, scales, b, group, bits, k, residual, prologue, norm_weight,
                                      1e-5) is None
    assert residual.data_ptr() == ptr and not torch.isnan(residual).any()
    torch.testing.assert_close(residual, expected, atol=5e-5, rtol=5e-5)
    assert copied == ([m] if bias and m >= qt.DEQUANT_MIN_M else [])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, split_k, fused, path, prologue", [
    (1, 3, False, None, "none"),  # one row, split: the reduce kernel adds it
    (3, 3, False, None, "rms_norm"),  # more rows: the norm's kernel first, the residual in the reduction
    (3, 3, True, None, "gated_silu"),  # the fused reduction (last program to arrive) adds it
    (5, 1, False, None, "none"),  # no split: the decode kernel's epilogue
    (1, None, False, "prefill", "rms_norm"),  # a prefill path for one row: norm and add around it
    (3, None, False, "dequant", "none"),
])
def test_residual_added_once(m, split_k, fused, path, prologue, bits, monkeypatch):
    """The residual is added exactly once wherever the output is written: the decode kernel, the
    split-K reduce kernel, the fused reduction, or after a prefill path (and a prologue at any M).
    On the decode paths the output may be the residual itself."""
    n, k, group = 37, 576, 64  # 18 blocks of 32: room for 3 splits
    g = torch.Generator().manual_seed(m * 7 + bits)
    x, qweight, scales, bias = make_case(m, n, k, group, bits, torch.float32, seed=m + bits)
    if prologue.startswith("gated_"):
        x = torch.randn(m, 2 * k, generator=g).to(DEVICE)
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if prologue == "rms_norm" else None
    residual = (10 * torch.randn(m, n, generator=g)).to(DEVICE)  # large: a missing or doubled add shows
    args = (x, qweight, scales, bias, group, bits, k, residual, prologue, norm_weight, 1e-5)
    kw = dict(path=path) if path else dict(split_k=split_k, config=dict(block_k=32, fused_reduce=fused))
    monkeypatch.setattr(qt, "_COUNTERS", {})
    got = qt.quant_linear_triton(*args, **kw)
    expected = quant_linear_reference(*args)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=5e-5)
    assert bool(qt._COUNTERS) == fused, "the fused reduction did not run" if fused else "unexpected fused reduction"
    if not path:  # the decode kernels may write into the residual they add (quant_linear_add_ does)
        inplace = residual.clone()
        qt.quant_linear_triton(*args[:7], inplace, *args[8:], out=inplace, **kw)
        torch.testing.assert_close(inplace, expected, atol=5e-5, rtol=5e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, prologue, fused", [(8, "rms_norm", False), (8, "none", True), (16, "gated_silu", False)])
def test_gpu_residual_batched(m, prologue, fused, bits, monkeypatch):
    """Batched decode with a folded residual (fold_quant_linear): bf16, llama shapes, the split-K
    reduction adding it, as fxopt runs batch 8 and 16."""
    qt.register()
    monkeypatch.setattr(qt, "_COUNTERS", {})
    n, k, group, dtype = 4096, 4096, 128, torch.bfloat16
    x, qweight, scales, _ = make_case(m, n, k, group, bits, dtype, bias=False, device="cuda")
    if prologue.startswith("gated_"):
        x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
    norm_weight = torch.rand(k, device="cuda", dtype=dtype) + 0.5 if prologue == "rms_norm" else None
    residual = torch.randn(m, n, device="cuda", dtype=dtype)
    args = (x, qweight, scales, None, group, bits, k, residual, prologue, norm_weight, 1e-5)
    got = qt.quant_linear_triton(*args, config=dict(fused_reduce=fused))
    expected = quant_linear_reference(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args))
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------- #
# Gated epilogue (fold_linear's rule 3): act(gate) * up written by the decode kernel
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, n, k, group, prologue, kind, bias", [
    (1, 38, 99, 32, "rms_norm", "silu", False),  # the default fold of a gate/up projection
    (1, 74, 576, 128, "none", "gelu_tanh", True),  # 37 features: a last program with a pair past the end
    (1, 38, 100, 48, "gated_silu", "relu", False),
    (3, 38, 99, 32, "rms_norm", "silu", True),  # the dot path (norm's kernel first)
    (17, 74, 100, 64, "none", "gelu", False),
    (qt.DEQUANT_MIN_M + 2, 38, 99, 32, "rms_norm", "silu", True),  # dequantize + cuBLAS, then gated_act
])
def test_gated_epilogue(m, n, k, group, prologue, kind, bias, bits, monkeypatch):
    """The decode kernels write act(gate) * up for [gate | up] weight rows (bias added first), for
    one row and for the dot path; the prefill paths run gated_act's kernel after them. The output
    starts as NaN: every feature must be written, none twice-halved."""
    monkeypatch.setattr(qt, "_COUNTERS", {})
    g = torch.Generator().manual_seed(m + n + bits)
    x, qweight, scales, b = make_case(m, n, k, group, bits, torch.float32, bias=bias, seed=k + m)
    if prologue.startswith("gated_"):
        x = torch.randn(m, 2 * k, generator=g).to(DEVICE)
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if prologue == "rms_norm" else None
    args = (x, qweight, scales, b, group, bits, k, None, prologue, norm_weight, 1e-5, f"gated_{kind}")
    expected = quant_linear_reference(*args)
    out = torch.full((m, n // 2), NAN, device=DEVICE)
    got = qt.quant_linear_triton(*args, out=out, split_k=3)  # a split is refused: the activation needs the sum
    assert got is out and got.shape == (m, n // 2) and not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=5e-5)
    assert not qt._COUNTERS


def test_gated_epilogue_refusals():
    x, qweight, scales, _ = make_case(1, 37, 64, 32, 8, torch.float32, bias=False)
    with pytest.raises(ValueError, match="even number of output features.*got 37"):
        qt.quant_linear_triton(x, qweight, scales, None, 32, 8, 64, epilogue="gated_silu")
    x, qweight, scales, _ = make_case(1, 38, 64, 32, 8, torch.float32, bias=False)
    with pytest.raises(ValueError, match="no residual"):
        qt.quant_linear_triton(x, qweight, scales, None, 32, 8, 64, torch.randn(1, 38), epilogue="gated_silu")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 8, 16, 300])
def test_gpu_gated_epilogue(m, bits):
    """bf16, a llama-1b gate/up projection behind its norm, through the registered op, against
    the reference in fp32: at least as close to it as the reference run in bf16 itself.

    (A fixed bf16 tolerance fails a few of the 2.4M outputs of any bf16 implementation, the
    reference's own included: act(gate) * up near 0 with a large gate carries the rounding of up,
    and up the rounding of the normed x, an absolute error of ~0.03 where the value is ~0.1.)"""
    qt.register()
    n, k, group, dtype = 2 * 8192, 2048, 128, torch.bfloat16
    x, qweight, scales, _ = make_case(m, n, k, group, bits, dtype, bias=False, device="cuda")
    norm_weight = torch.rand(k, device="cuda", dtype=dtype) + 0.5
    args = (x, qweight, scales, None, group, bits, k, None, "rms_norm", norm_weight, 1e-5, "gated_silu")
    got = torch.ops.fxopt.quant_linear(*args)
    exact = quant_linear_reference(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                     for a in args))
    in_bf16 = quant_linear_reference(*args).float()
    assert got.shape == (m, n // 2) and not torch.isnan(got).any()
    error, reference_error = (got.float() - exact).abs(), (in_bf16 - exact).abs()
    assert error.max() <= 1.5 * reference_error.max(), (error.max(), reference_error.max())
    assert error.mean() <= 1.5 * reference_error.mean(), (error.mean(), reference_error.mean())
