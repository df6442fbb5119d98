"""``fxopt.linear`` (a linear with its norm / gated-activation prologue and residual epilogue):
the reference against the unfused ops, and the Triton kernel (fxopt/kernels/linear_triton.py)
against the reference.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in fp32 and fp16 (the interpreter gets bf16 ``tl.dot`` wrong); the ``gpu``
tests run the compiled kernel in bf16 and fp16 through ``torch.ops.fxopt.linear``. Shapes are odd
on purpose (K = 100, 576; N from 1 to 70; 1, 2, 21 rows) so every mask and padded lane is exercised.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from fxopt.kernels import linear_triton as lt
from fxopt.kernels.activation import gated_act_reference
from fxopt.kernels.linear import PROLOGUES, linear_reference
from fxopt.kernels.norm import rms_norm_reference

pytestmark = [
    pytest.mark.skipif(lt.triton is None, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error of the whole output (norm of the difference / norm of the reference): the kernel
# sums in another order and applies rstd to the sum, so elementwise ulps do not line up.
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
HYPOTHESIS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def operands(m, k, n, prologue, residual, bias, dtype, seed=0):
    x = rand(m, 2 * k if prologue.startswith("gated_") else k, dtype=dtype, seed=seed)
    w = rand(n, k, dtype=dtype, seed=seed + 1, scale=k ** -0.5)
    b = rand(n, dtype=dtype, seed=seed + 2) if bias else None
    r = rand(m, n, dtype=dtype, seed=seed + 3) if residual else None
    g = (rand(k, dtype=dtype, seed=seed + 4) * 0.3 + 1) if prologue == "rms_norm" else None
    return x, w, b, r, g


def assert_close_rel(got, expected, dtype):
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert not torch.isnan(got).any(), "NaN in the output"
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err <= REL[dtype], f"relative error {err:.2e} > {REL[dtype]:.0e}"


# --------------------------------------------------------------------------------------------- #
# The reference is the unfused composition
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("prologue", PROLOGUES)
def test_reference_is_the_unfused_ops(prologue):
    x, w, b, r, g = operands(5, 48, 20, prologue, residual=True, bias=True, dtype=torch.float32)
    x, w, b, r = (t.cpu() for t in (x, w, b, r))
    g = g.cpu() if g is not None else None
    if prologue == "rms_norm":
        a = rms_norm_reference(x, g, 1e-6)
    elif prologue.startswith("gated_"):
        a = gated_act_reference(x, prologue[len("gated_"):])
    else:
        a = x
    expected = F.linear(a, w, b) + r
    assert torch.equal(linear_reference(x, w, b, r, prologue, g, 1e-6), expected)  # the op: test_linear_cpu.py


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu"])
def test_epilogue_reference_is_the_unfused_ops(kind):
    """A gated epilogue is ``gated_act`` of the linear's output, bias included."""
    x, w, b, _, g = operands(5, 48, 20, "rms_norm", residual=False, bias=True, dtype=torch.float32)
    x, w, b, g = (t.cpu() for t in (x, w, b, g))
    expected = gated_act_reference(F.linear(rms_norm_reference(x, g, 1e-6), w, b), kind)
    got = linear_reference(x, w, b, None, "rms_norm", g, 1e-6, f"gated_{kind}")
    assert got.shape == (5, 10) and torch.equal(got, expected)


def test_bad_epilogue_is_named():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="unknown epilogue 'rms_norm'"):
        linear_reference(x, w, epilogue="rms_norm")
    with pytest.raises(ValueError, match="even number of output features.*got 5"):
        linear_reference(x, w[:5], epilogue="gated_silu")
    with pytest.raises(ValueError, match="no residual"):
        linear_reference(x, w, residual=torch.randn(2, 3), epilogue="gated_silu")


def test_bad_prologue_is_named():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown prologue 'gated_swish'"):
        linear_reference(x, w, prologue="gated_swish")
    with pytest.raises(ValueError, match="norm_weight goes with prologue 'rms_norm'"):
        linear_reference(x, w, prologue="rms_norm")


# --------------------------------------------------------------------------------------------- #
# The decode kernel against the reference
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "gated_silu", "gated_gelu_tanh"])
def test_decode_kernel(prologue, dtype):
    x, w, b, r, g = operands(1, 100, 50, prologue, residual=prologue != "rms_norm", bias=prologue == "none", dtype=dtype)
    got = lt.linear_decode(x, w, b, r, prologue, g, 1e-5)
    expected = linear_reference(x.float(), w.float(), None if b is None else b.float(),
                                None if r is None else r.float(), prologue, None if g is None else g.float(), 1e-5)
    assert_close_rel(got, expected.to(dtype), dtype)


@HYPOTHESIS
@given(k=st.sampled_from([16, 48, 100, 576]), n=st.integers(1, 70),
       prologue=st.sampled_from(["none", "rms_norm", "gated_relu", "gated_gelu"]),
       residual=st.booleans(), bias=st.booleans(), seed=st.integers(0, 1000))
def test_decode_kernel_random_shapes(k, n, prologue, residual, bias, seed):
    dtype = torch.float32
    x, w, b, r, g = operands(1, k, n, prologue, residual, bias, dtype, seed)
    # Small tiles, so that several N blocks and K steps (and a ragged last one) are exercised.
    tiles = dict(block_n=4, block_k=32, num_stages=2)
    got = lt.linear_decode(x, w, b, r, prologue, g, 1e-5, tiles)
    assert_close_rel(got, linear_reference(x, w, b, r, prologue, g, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prologue, kind", [("none", "silu"), ("rms_norm", "silu"), ("rms_norm", "gelu_tanh"),
                                            ("gated_silu", "relu")])
def test_decode_kernel_gated_epilogue(prologue, kind, dtype):
    """The GEMV writes act(gate) * up: half the weight's rows, each gate reduced beside its up."""
    x, w, b, _, g = operands(1, 100, 50, prologue, residual=False, bias=prologue == "none", dtype=dtype)
    got = lt.linear_decode(x, w, b, None, prologue, g, 1e-5, epilogue=f"gated_{kind}")
    expected = linear_reference(x.float(), w.float(), None if b is None else b.float(), None, prologue,
                                None if g is None else g.float(), 1e-5, f"gated_{kind}")
    assert got.shape == (1, 25)
    assert_close_rel(got, expected.to(dtype), dtype)


@HYPOTHESIS
@given(k=st.sampled_from([16, 48, 100, 576]), half=st.integers(1, 37),
       prologue=st.sampled_from(["none", "rms_norm", "gated_gelu"]),
       kind=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"]), bias=st.booleans(),
       block_n=st.sampled_from([2, 4, 8]), seed=st.integers(0, 1000))
def test_decode_kernel_gated_epilogue_random_shapes(k, half, prologue, kind, bias, block_n, seed):
    """Odd numbers of features (a last program with pairs past the end), several tiles."""
    x, w, b, _, g = operands(1, k, 2 * half, prologue, False, bias, torch.float32, seed)
    tiles = dict(block_n=block_n, block_k=32, num_stages=2)
    got = lt.linear_decode(x, w, b, None, prologue, g, 1e-5, tiles, epilogue=f"gated_{kind}")
    assert_close_rel(got, linear_reference(x, w, b, None, prologue, g, 1e-5, f"gated_{kind}"), torch.float32)


@pytest.mark.parametrize("m", [1, 2, 21])
def test_gated_epilogue_by_rows(m, monkeypatch):
    """One row: the epilogue inside the decode kernel; more: cuBLAS, then gated_act's kernel."""
    activations = []
    real = torch.ops.fxopt.gated_act
    monkeypatch.setattr(lt, "epilogue_kernel", lambda y, e: activations.append(y.shape) or real(y, e[len("gated_"):]))
    x, w, _, _, g = operands(m, 64, 30, "rms_norm", residual=False, bias=False, dtype=torch.float32, seed=m)
    got = lt.linear_triton(x.view(1, m, 64), w, None, None, "rms_norm", g, 1e-6, "gated_silu")
    assert got.shape == (1, m, 15)
    assert_close_rel(got, linear_reference(x, w, None, None, "rms_norm", g, 1e-6, "gated_silu").view(1, m, 15),
                     torch.float32)
    assert activations == ([] if m == 1 else [(1, m, 30)])


def test_dispatch_by_rows(monkeypatch):
    """One row takes the decode kernel, more rows the prompt path; both agree with the reference."""
    decoded = []
    real = lt.linear_decode
    monkeypatch.setattr(lt, "linear_decode", lambda *a, **k: decoded.append(a[0].shape[0]) or real(*a, **k))
    for m in (1, 2, 21):
        x, w, b, r, g = operands(m, 64, 24, "rms_norm", residual=True, bias=False, dtype=torch.float32, seed=m)
        got = lt.linear_triton(x.view(1, m, 64), w, None, r.view(1, m, 24), "rms_norm", g, 1e-6)
        assert got.shape == (1, m, 24)
        assert_close_rel(got, linear_reference(x, w, None, r, "rms_norm", g, 1e-6).view(1, m, 24), torch.float32)
    assert decoded == [1]


@pytest.mark.parametrize("prologue", ["none", "rms_norm", "gated_silu"])
@pytest.mark.parametrize("m, bias", [(1, False), (3, False), (21, False), (5, True)])
def test_linear_add_updates_the_residual_in_place(prologue, m, bias, monkeypatch):
    """``linear_add_``'s launcher leaves ``residual + linear(...)`` in the residual's own storage:
    one row through the decode kernel and a copy, more rows through the prologue and ``addmm_``
    (with a bias, ``linear`` and a copy)."""
    copied = []
    real = lt.linear_triton
    monkeypatch.setattr(lt, "linear_triton", lambda *a: copied.append(a[0].shape[1]) or real(*a))
    x, w, b, r, g = operands(m, 72, 40, prologue, residual=True, bias=bias, dtype=torch.float32, seed=m)
    expected = linear_reference(x, w, b, r, prologue, g, 1e-6)
    ptr = r.data_ptr()
    assert lt.linear_add_triton(x.view(1, m, -1), w, b, r.view(1, m, 40), prologue, g, 1e-6) is None
    assert r.data_ptr() == ptr
    assert_close_rel(r, expected, torch.float32)
    assert copied == ([m] if m == 1 or bias else [])  # addmm_ for many rows without a bias


# --------------------------------------------------------------------------------------------- #
# GPU: the registered op, bf16 and fp16
# --------------------------------------------------------------------------------------------- #

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 8, 16, 40])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "gated_silu"])
def test_registered_op_gpu(prologue, m, dtype):
    from fxopt.kernels.triton_ops import register_all

    register_all()
    x, w, b, r, g = operands(m, 576, 1000, prologue, residual=prologue != "rms_norm", bias=False, dtype=dtype)
    got = torch.ops.fxopt.linear(x, w, b, r, prologue, g, 1e-5)
    expected = linear_reference(x.float(), w.float(), None, None if r is None else r.float(), prologue,
                                None if g is None else g.float(), 1e-5)
    assert_close_rel(got, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 40])
@pytest.mark.parametrize("prologue", ["none", "rms_norm"])
def test_registered_op_gated_epilogue_gpu(prologue, m, dtype):
    from fxopt.kernels.triton_ops import register_all

    register_all()
    x, w, b, _, g = operands(m, 576, 1002, prologue, residual=False, bias=prologue == "none", dtype=dtype)
    got = torch.ops.fxopt.linear(x, w, b, None, prologue, g, 1e-5, "gated_silu")
    expected = linear_reference(x.float(), w.float(), None if b is None else b.float(), None, prologue,
                                None if g is None else g.float(), 1e-5, "gated_silu")
    assert_close_rel(got, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 9, 300])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "gated_silu"])
def test_registered_linear_add_gpu(prologue, m, dtype):
    from fxopt.kernels.triton_ops import register_all

    register_all()
    x, w, b, r, g = operands(m, 576, 1000, prologue, residual=True, bias=False, dtype=dtype)
    expected = linear_reference(x.float(), w.float(), None, r.float(), prologue, None if g is None else g.float(), 1e-5)
    torch.ops.fxopt.linear_add_(x, w, None, r, prologue, g, 1e-5)
    assert_close_rel(r, expected, dtype)
