"""The Triton norms, rotary and activations (fxopt/kernels/{norm,rotary,activation}_triton.py)
against their PyTorch references.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in fp32 and fp16 (the interpreter has no bf16); with one, the same tests run
the compiled kernels on CUDA, and the ``gpu`` tests also go through ``torch.ops.fxopt.*`` after
``register_all()``, in bf16 and fp16.

Every output is passed in pre-filled with NaN (the launchers' ``out=`` arguments), so an element
the kernel fails to write shows up as NaN; no NaN ever passes a comparison. Shapes are small and
odd on purpose (hidden 48, 100, 576; 3 or 7 rows; 9 q heads over 3 kv heads; head dim 48) so
every mask and padded lane is exercised.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fxopt.kernels import activation_triton as act_t
from fxopt.kernels import norm_triton as norm_t
from fxopt.kernels import rotary_triton as rot_t
from fxopt.kernels.activation import KINDS, act_reference, gated_act_reference
from fxopt.kernels.norm import layer_norm_reference, rms_norm_reference
from fxopt.kernels.rotary import rotary_reference

pytestmark = [
    pytest.mark.skipif(norm_t.triton is None, reason="triton is not installed"),
    # The interpreter runs numpy, which warns where exp overflows to inf: the activations rely on it.
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
# fp16: the kernels round where the reference rounds, but rsqrt/exp/reduction order can move a
# value across a rounding boundary: allow about two ulps.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_matches(got, expected, tol_dtype=None):
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.dtype)
    assert not torch.isnan(got).any(), "NaN in the output: an element was not written (or computed as NaN)"
    torch.testing.assert_close(got, expected, **TOL[tol_dtype or expected.dtype])


# --------------------------------------------------------------------------------------------- #
# Norms
# --------------------------------------------------------------------------------------------- #

NORM_SHAPES = [(1, 48), (3, 576), (7, 100), (2, 3, 64), (1, 1, 1)]


def check_rms(x, weight, residual=None, eps=1e-6):
    if residual is None:
        expected = rms_norm_reference(x, weight, eps)
        out = poisoned(x.shape, expected.dtype)
        got = norm_t.rms_norm_triton(x, weight, eps, out=out)
        assert got is out
        assert_matches(got, expected, x.dtype)
        return
    h = x + residual
    expected = rms_norm_reference(h, weight, eps)
    out, h_out = poisoned(x.shape, expected.dtype), poisoned(x.shape, h.dtype)
    got, got_h = norm_t.add_rms_norm_triton(x, residual, weight, eps, out=out, residual_out=h_out)
    assert got is out and got_h is h_out
    torch.testing.assert_close(got_h, h, atol=0, rtol=0)  # one fp32 add, one rounding: bit-exact
    assert_matches(got, expected, x.dtype)


def check_layer(x, weight, bias, residual=None, eps=1e-5):
    if residual is None:
        expected = layer_norm_reference(x, weight, bias, eps)
        got = norm_t.layer_norm_triton(x, weight, bias, eps, out=poisoned(x.shape, x.dtype))
        assert_matches(got, expected)
        return
    h = x + residual
    expected = layer_norm_reference(h, weight, bias, eps)
    got, got_h = norm_t.add_layer_norm_triton(x, residual, weight, bias, eps, out=poisoned(x.shape, h.dtype),
                                              residual_out=poisoned(x.shape, h.dtype))
    torch.testing.assert_close(got_h, h, atol=0, rtol=0)
    assert_matches(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape, dtype):
    x, w = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype, seed=1)
    check_rms(x, w)
    check_rms(x, w, residual=rand(*shape, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm(shape, dtype, affine):
    n = shape[-1]
    w = rand(n, dtype=dtype, seed=1) if affine in ("both", "weight") else None
    b = rand(n, dtype=dtype, seed=3) if affine in ("both", "bias") else None
    # An offset mean: the variance must be of the centred values, padding lanes excluded.
    x = rand(*shape, dtype=dtype) + 3
    check_layer(x, w, b)
    check_layer(x, w, b, residual=rand(*shape, dtype=dtype, seed=2))


def test_rms_norm_fp32_weight_over_fp16():
    """LlamaRMSNorm with an fp32 weight over fp16 activations: rounds to fp16, returns fp32."""
    x, w = rand(3, 100, dtype=torch.float16), rand(100, seed=1)
    assert norm_t.rms_norm_triton(x, w, 1e-6).dtype == torch.float32
    check_rms(x, w)
    check_rms(x, w, residual=rand(3, 100, dtype=torch.float16, seed=2))


def test_add_norm_mixed_residual_dtype():
    """h = fp16 x + fp32 residual is fp32, and so is everything after it."""
    x, r = rand(3, 48, dtype=torch.float16), rand(3, 48, seed=2)
    check_rms(x, rand(48, dtype=torch.float16, seed=1), residual=r)
    check_layer(x, rand(48, seed=1), None, residual=r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_strided_inputs(dtype):
    """Rows with a stride past the hidden size (slices: read in place) and a last dim that is not
    contiguous (a transpose: copied first)."""
    wide = rand(2, 3, 160, dtype=dtype)
    x = wide[..., 10:110]  # [2, 3, 100], row stride 160
    r = rand(6, 130, dtype=dtype, seed=2)[:, :100].reshape(2, 3, 100)
    w, b = rand(100, dtype=dtype, seed=1), rand(100, dtype=dtype, seed=3)
    check_rms(x, w, residual=r)
    check_layer(x, w, b, residual=r)
    xt = rand(100, 5, dtype=dtype).t()  # [5, 100], last-dim stride 5
    check_rms(xt, w)
    check_layer(xt, w, b, residual=x[0, :1].expand(5, 100))


def test_norms_large_values_and_eps():
    """Scaled inputs: the sum of squares is fp32 whatever the storage; eps dominates a zero row."""
    x = rand(4, 576, dtype=torch.float16, scale=200.0)
    x[1] = 0
    w = rand(576, dtype=torch.float16, seed=1)
    check_rms(x, w, eps=1e-5)
    check_layer(x, w, w, eps=1e-5)


def test_norms_empty():
    x = torch.empty(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert norm_t.rms_norm_triton(x, w, 1e-6).shape == (0, 64)
    y, h = norm_t.add_layer_norm_triton(x, x, w, None, 1e-5)
    assert y.shape == h.shape == (0, 64)


def test_norm_supported():
    x = rand(3, 64)
    assert norm_t.supported(x, x, rand(64))
    assert not norm_t.supported(x, rand(1, 64), rand(64))  # broadcasting residual: the reference's job
    assert not norm_t.supported(x.double(), None, rand(64))
    assert not norm_t.supported(x, None, rand(3, 64))
    assert not norm_t.supported(rand(1, norm_t.MAX_BLOCK + 1), None)
    with pytest.raises(ValueError):
        norm_t.add_rms_norm_triton(x, rand(1, 64), rand(64), 1e-6)
    with pytest.raises(ValueError):
        norm_t.rms_norm_triton(x, rand(64), 1e-6, out=torch.empty(3, 64, dtype=torch.float16, device=DEVICE))


@HYPOTHESIS
@given(rows=st.integers(1, 6), hidden=st.integers(1, 300), fp16=st.booleans(), seed=st.integers(0, 2**16),
       layer=st.booleans(), residual=st.booleans())
def test_norms_random_shapes(rows, hidden, fp16, seed, layer, residual):
    dtype = torch.float16 if fp16 else torch.float32
    x, w = rand(rows, hidden, dtype=dtype, seed=seed), rand(hidden, dtype=dtype, seed=seed + 1)
    r = rand(rows, hidden, dtype=dtype, seed=seed + 2) if residual else None
    if layer:
        check_layer(x, w, rand(hidden, dtype=dtype, seed=seed + 3), residual=r)
    else:
        check_rms(x, w, residual=r)


# --------------------------------------------------------------------------------------------- #
# Rotary
# --------------------------------------------------------------------------------------------- #

def make_rotary(batch, heads_q, heads_kv, seq, dim, dtype, cos_dtype=None, cos_batch=None, seed=0):
    """q/k as the model makes them ([B, S, H, D] transposed: non-contiguous); cos/sin [B, S, D]."""
    q = rand(batch, seq, heads_q, dim, dtype=dtype, seed=seed).transpose(1, 2)
    k = rand(batch, seq, heads_kv, dim, dtype=dtype, seed=seed + 1).transpose(1, 2)
    cos_dtype = cos_dtype or dtype
    cos = rand(cos_batch or batch, seq, dim, dtype=cos_dtype, seed=seed + 2)
    sin = rand(cos_batch or batch, seq, dim, dtype=cos_dtype, seed=seed + 3)
    return q, k, cos, sin


def check_rotary(q, k, cos, sin):
    eq, ek = rotary_reference(q, k, cos, sin)
    q_out, k_out = poisoned(eq.shape, eq.dtype), poisoned(ek.shape, ek.dtype)
    gq, gk = rot_t.rotary_triton(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert gq is q_out and gk is k_out
    for got, want in ((gq, eq), (gk, ek)):
        assert_matches(got, want)
        # Same roundings as the reference, no FMA contraction: bit-exact (interpreter and GPU).
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim", [
    (1, 4, 4, 1, 16),  # decode
    (2, 9, 3, 5, 64),  # GQA, a group of 3
    (3, 3, 1, 2, 48),  # head dim 48: half 24 padded to 32
    (1, 9, 3, 70, 16),  # enough tokens for several heads per program
])
def test_rotary(batch, heads_q, heads_kv, seq, dim, dtype):
    check_rotary(*make_rotary(batch, heads_q, heads_kv, seq, dim, dtype))


def test_rotary_contiguous_and_broadcast_cos():
    q, k, cos, sin = make_rotary(3, 4, 2, 3, 16, torch.float32, cos_batch=1)  # cos/sin broadcast over B
    check_rotary(q.contiguous(), k, cos, sin)
    # A cos/sin that is itself a strided view (the model slices a [max_pos, D] table).
    table = rand(1, 10, 32, seed=7)
    check_rotary(q, k, table[:, 2:5, 8:24], table[:, 4:7, 8:24])


@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim", [(2, 6, 2, 5, 16), (1, 4, 4, 70, 48)])
def test_rotary_writes_outputs_of_any_layout(batch, heads_q, heads_kv, seq, dim):
    """Token-major outputs ([B, S, H, D] in memory, as prompt_attention asks) and a padded one:
    each element lands where its strides say, nothing else is touched."""
    q, k, cos, sin = make_rotary(batch, heads_q, heads_kv, seq, dim, torch.float32, seed=11)
    eq, ek = rotary_reference(q, k, cos, sin)
    q_out = poisoned((batch, seq, heads_q, dim), torch.float32).transpose(1, 2)
    padded = poisoned((batch, heads_kv, seq + 3, dim + 8), torch.float32)
    k_out = padded[:, :, 1:seq + 1, :dim]
    gq, gk = rot_t.rotary_triton(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert gq is q_out and gk is k_out and gq.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(gq, eq, atol=0, rtol=0)
    torch.testing.assert_close(gk, ek, atol=0, rtol=0)
    untouched = torch.ones_like(padded, dtype=torch.bool)
    untouched[:, :, 1:seq + 1, :dim] = False
    assert torch.isnan(padded[untouched]).all()


@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim, dtype, cache_dtype", [
    (2, 6, 2, 5, 16, torch.float32, torch.float32),
    (1, 4, 4, 70, 48, torch.float16, torch.float16),  # several heads a program; head dim 48
    (3, 9, 3, 4, 64, torch.float16, torch.float32),  # a cache of another dtype: rounded to it
])
def test_rotary_writes_k_and_v_into_the_caches(batch, heads_q, heads_kv, seq, dim, dtype, cache_dtype):
    """With ``cache=``, the same launch puts the rotated k and v at each token's slot, exactly what
    the reference rotary then a scatter gives; slots outside the cache are skipped, nothing else is
    touched; q and k come out as without it."""
    q, k, cos, sin = make_rotary(batch, heads_q, heads_kv, seq, dim, dtype, seed=21)
    v = rand(batch, seq, heads_kv, dim, dtype=dtype, seed=25).transpose(1, 2)
    max_seq = 2 * seq + 3
    gen = torch.Generator().manual_seed(4)
    positions = torch.stack([torch.randperm(max_seq, generator=gen)[:seq] for _ in range(batch)]).to(DEVICE)
    positions[0, -1] = max_seq  # outside the cache: skipped
    k_cache, v_cache = (poisoned((batch + 1, heads_kv, max_seq, dim), cache_dtype) for _ in range(2))
    eq, ek = rotary_reference(q, k, cos, sin)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        for t in range(seq):
            if positions[b, t] < max_seq:
                want_k[b, :, positions[b, t]] = ek[b, :, t].to(cache_dtype)
                want_v[b, :, positions[b, t]] = v[b, :, t].to(cache_dtype)
    assert rot_t.cache_supported(k, v, k_cache, v_cache, positions)
    gq, gk = rot_t.rotary_triton(q, k, cos, sin, cache=(v, k_cache, v_cache, positions))
    torch.testing.assert_close(gq, eq, atol=0, rtol=0)
    torch.testing.assert_close(gk, ek, atol=0, rtol=0)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0, equal_nan=True)
    assert k_cache.isnan().sum() == want_k.isnan().sum() > 0  # the untouched slots stay poisoned


def test_rotary_cache_supported_names_what_does_not_fit():
    q, k, cos, sin = make_rotary(2, 4, 2, 3, 16, torch.float32)
    v, cache, positions = k.clone(), torch.zeros(2, 2, 8, 16), torch.zeros(2, 3, dtype=torch.long)
    assert rot_t.cache_supported(k, v, cache, cache, positions)
    assert not rot_t.cache_supported(k, v[..., :8], cache, cache, positions)  # v's head dim differs
    assert not rot_t.cache_supported(k, v, cache[:1], cache, positions)  # fewer rows than the batch
    assert not rot_t.cache_supported(k, v, cache, cache[:, :1], positions)  # other kv heads
    assert not rot_t.cache_supported(k, v, cache, cache, positions.float())
    assert not rot_t.cache_supported(k, v, cache, cache.transpose(2, 3).contiguous().transpose(2, 3), positions)
    with pytest.raises(ValueError, match="the caches do not fit k"):
        rot_t.rotary_triton(q, k, cos, sin, cache=(v, cache[:1], cache, positions))


def test_rotary_refuses_an_output_it_cannot_write():
    q, k, cos, sin = make_rotary(1, 2, 2, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="q_out must be a torch.float32 tensor of shape \\(1, 2, 3, 16\\)"):
        rot_t.rotary_triton(q, k, cos, sin, q_out=poisoned((1, 2, 16, 3), torch.float32).transpose(2, 3))
    with pytest.raises(ValueError, match="k_out must be"):
        rot_t.rotary_triton(q, k, cos, sin, k_out=poisoned((1, 2, 3, 16), torch.float16))


def test_rotary_mixed_dtypes():
    """fp16 q/k with fp32 cos/sin: the reference promotes, outputs are fp32."""
    q, k, cos, sin = make_rotary(2, 4, 2, 3, 16, torch.float16, cos_dtype=torch.float32)
    check_rotary(q, k, cos, sin)


def test_rotary_supported():
    q, k, cos, sin = make_rotary(1, 2, 2, 3, 16, torch.float32)
    assert rot_t.supported(q, k, cos, sin)
    assert not rot_t.supported(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])  # odd head dim
    assert not rot_t.supported(q, k, cos, sin.double())
    with pytest.raises(ValueError):
        rot_t.rotary_triton(q, k, cos[:, :2], sin[:, :2])


@HYPOTHESIS
@given(batch=st.integers(1, 3), heads_kv=st.integers(1, 3), group=st.integers(1, 3), seq=st.integers(1, 6),
       half=st.integers(1, 40), fp16=st.booleans(), seed=st.integers(0, 2**16))
def test_rotary_random_shapes(batch, heads_kv, group, seq, half, fp16, seed):
    dtype = torch.float16 if fp16 else torch.float32
    check_rotary(*make_rotary(batch, heads_kv * group, heads_kv, seq, 2 * half, dtype, seed=seed))


# --------------------------------------------------------------------------------------------- #
# Activations
# --------------------------------------------------------------------------------------------- #

def check_gated(gate_up, kind):
    expected = gated_act_reference(gate_up, kind)
    out = poisoned(expected.shape, expected.dtype)
    assert act_t.gated_act_triton(gate_up, kind, out=out) is out
    assert_matches(out, expected)


def check_act(x, kind):
    expected = act_reference(x, kind)
    out = poisoned(x.shape, x.dtype)
    assert act_t.act_triton(x, kind, out=out) is out
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 48), (3, 7, 200), (2, 2 * 1100)])  # I = 24, 100, 1100 (two blocks)
def test_gated_act(shape, kind, dtype):
    gate_up = rand(*shape, dtype=dtype, scale=3.0)
    check_gated(gate_up, kind)
    check_act(gate_up, kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_act_strided_and_extremes(kind, dtype):
    """Saturation far out (exp overflow must give x or -0, not NaN) and non-contiguous inputs."""
    big = 60000.0 if dtype == torch.float16 else 1e30
    x = torch.tensor([-big, -1e4, -100.0, -20.0, -1.0, -0.0, 0.0, 1e-3, 1.0, 20.0, 100.0, 1e4, big],
                     dtype=dtype, device=DEVICE)
    check_act(x, kind)
    gate_up = torch.cat([x, x.flip(0)])  # gate = x, up = x reversed
    check_gated(gate_up[None], kind)
    wide = rand(3, 2, 130, dtype=dtype)
    check_gated(wide[..., 5:105], kind)  # row stride 130: read in place
    check_gated(rand(40, 6, dtype=dtype).t(), kind)  # last dim not contiguous: copied
    check_act(wide.transpose(0, 2), kind)


def test_act_rejects():
    with pytest.raises(ValueError):
        act_t.act_triton(rand(4), "tanh")
    with pytest.raises(ValueError):
        act_t.gated_act_triton(rand(2, 5), "silu")
    assert not act_t.supported(rand(4).double(), "silu")
    assert act_t.gated_act_triton(torch.empty(0, 8, device=DEVICE), "silu").shape == (0, 4)


@HYPOTHESIS
@given(rows=st.integers(1, 5), inner=st.integers(1, 1500), kind=st.sampled_from(KINDS), fp16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gated_act_random_shapes(rows, inner, kind, fp16, seed):
    dtype = torch.float16 if fp16 else torch.float32
    check_gated(rand(rows, 2 * inner, dtype=dtype, seed=seed, scale=3.0), kind)


# --------------------------------------------------------------------------------------------- #
# Registration
# --------------------------------------------------------------------------------------------- #

def test_register_all_without_cuda():
    from fxopt.kernels.triton_ops import register_all

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert register_all() == []


@pytest.fixture(scope="module")
def registered():
    from fxopt.kernels.triton_ops import register_all

    names = register_all()
    assert {"norm_triton", "rotary_triton", "activation_triton"} <= set(names)
    return names


GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (7, 576), (3, 100), (33, 8192)])
def test_gpu_norm_ops(registered, rows, hidden, dtype):
    ops = torch.ops.fxopt
    x, r = rand(2, rows, hidden, dtype=dtype), rand(2, rows, hidden, dtype=dtype, seed=2)
    w, b = rand(hidden, dtype=dtype, seed=1), rand(hidden, dtype=dtype, seed=3)
    assert_matches(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    y, h = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(h, x + r, atol=0, rtol=0)
    assert_matches(y, rms_norm_reference(x + r, w, 1e-6))
    assert_matches(ops.rms_norm(x, w.float(), 1e-6), rms_norm_reference(x, w.float(), 1e-6), dtype)
    assert_matches(ops.layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    assert_matches(ops.layer_norm(x, None, None, 1e-5), layer_norm_reference(x, None, None, 1e-5))
    y, h = ops.add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(h, x + r, atol=0, rtol=0)
    assert_matches(y, layer_norm_reference(x + r, w, b, 1e-5))
    # Broadcasting residual: not the kernel's, the reference fallback's.
    y, h = ops.add_rms_norm(x, r[:1], w, 1e-6)
    assert_matches(y, rms_norm_reference(x + r[:1], w, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim", [
    (1, 32, 32, 1, 128), (4, 32, 8, 1, 128), (1, 32, 8, 300, 128), (2, 9, 3, 70, 64), (1, 4, 2, 5, 80)])
def test_gpu_rotary_op(registered, batch, heads_q, heads_kv, seq, dim, dtype):
    q, k, cos, sin = make_rotary(batch, heads_q, heads_kv, seq, dim, dtype)
    for got, want in zip(torch.ops.fxopt.rotary(q, k, cos, sin), rotary_reference(q, k, cos, sin)):
        assert_matches(got, want)
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # bit-exact: see rotary_triton


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 11008), (3, 5, 2 * 1536), (7, 2 * 100)])
def test_gpu_act_ops(registered, shape, kind, dtype):
    gate_up = rand(*shape, dtype=dtype, scale=3.0)
    assert_matches(torch.ops.fxopt.gated_act(gate_up, kind), gated_act_reference(gate_up, kind))
    assert_matches(torch.ops.fxopt.act(gate_up, kind), act_reference(gate_up, kind))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(registered):
    """All the ops in one CUDA graph (no host sync anywhere), replayed on new inputs."""
    ops = torch.ops.fxopt
    dtype = torch.bfloat16
    x, r, w = rand(1, 1, 4096, dtype=dtype), rand(1, 1, 4096, dtype=dtype, seed=2), rand(4096, dtype=dtype, seed=1)
    q, k, cos, sin = make_rotary(1, 32, 8, 1, 128, dtype)
    gate_up = rand(1, 1, 2 * 11008, dtype=dtype)

    def step():
        y, h = ops.add_rms_norm(x, r, w, 1e-6)
        return (y, h, ops.layer_norm(x, w, None, 1e-5), *ops.rotary(q, k, cos, sin),
                ops.gated_act(gate_up, "silu"), ops.act(gate_up, "gelu"))

    step()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t, seed in ((x, 10), (r, 11), (q, 12), (k, 13), (gate_up, 14)):
        t.copy_(rand(*t.shape, dtype=dtype, seed=seed))
    graph.replay()
    torch.cuda.synchronize()
    expected = (rms_norm_reference(x + r, w, 1e-6), x + r, layer_norm_reference(x, w, None, 1e-5),
                *rotary_reference(q, k, cos, sin), gated_act_reference(gate_up, "silu"), act_reference(gate_up, "gelu"))
    for got, want in zip(outs, expected):
        assert_matches(got, want)
