"""fxopt.linear's CPU kernel (kernels/linear_cpu.py): the reference's composition with the matmul
in oneDNN -- equal to the reference up to rounding, the reference itself where oneDNN does not
suit, and what the op and the CPU runtime run."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.kernels import linear_cpu
from fxopt.kernels.linear import linear_add_reference, linear_reference
from fxopt.runtime.direct import direct_graph

SHAPES = [((1, 576), 1536), ((3, 33), 7), ((2, 5, 64), 100), ((17, 129), 65)]  # (x shape, out features)


def data(x_shape, out, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).to(dtype)
    w = (torch.randn(out, x_shape[-1], generator=g) / x_shape[-1] ** 0.5).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    return x, w, b


def assert_rounding_close(got, want):
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("x_shape, out", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_is_f_linear_up_to_rounding(x_shape, out, with_bias):
    x, w, b = data(x_shape, out)
    b = b if with_bias else None
    got = linear_cpu.onednn_matmul(x, w, b)
    assert got.shape == (*x_shape[:-1], out)
    assert_rounding_close(got, F.linear(x, w, b))
    with linear_cpu.enabled(False):
        assert torch.equal(linear_cpu.onednn_matmul(x, w, b), F.linear(x, w, b))


def test_oneDNN_computes_where_this_torch_has_it(monkeypatch):
    assert not linear_cpu.AVAILABLE or torch.backends.mkldnn.is_available()
    calls = []
    if linear_cpu.AVAILABLE:
        op = linear_cpu._LINEAR_POINTWISE
        monkeypatch.setattr(linear_cpu, "_LINEAR_POINTWISE", lambda *a: calls.append(a[0].shape) or op(*a))
    x, w, b = data((2, 3, 96), 40)
    assert_rounding_close(linear_cpu.onednn_matmul(x, w, b), F.linear(x, w, b))
    assert calls == ([(6, 96)] if linear_cpu.AVAILABLE else [])  # rows flattened into one matrix


@pytest.mark.parametrize("case", ["bf16", "fp64", "transposed weight", "autograd", "empty"])
def test_where_oneDNN_does_not_suit_it_is_f_linear_exactly(case):
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    x, w, b = data((3, 48), 24, dtype=dtype)
    if case == "transposed weight":
        w = w.t().contiguous().t()
    if case == "autograd":
        w.requires_grad_(True)
    if case == "empty":
        x = x[:0]
    got = linear_cpu.onednn_matmul(x, w, b)
    assert torch.equal(got, F.linear(x, w, b))
    if case == "autograd":
        got.sum().backward()
        torch.testing.assert_close(w.grad, torch.ones(3, 24).t() @ x)


def test_a_nan_in_the_input_reaches_the_output():
    x, w, b = data((2, 64), 16)
    x[1, 5] = float("nan")
    y = linear_cpu.onednn_matmul(x, w, b)
    assert y[1].isnan().all() and not y[0].isnan().any()


@pytest.mark.parametrize("prologue, epilogue, residual", [
    ("none", "none", True), ("rms_norm", "none", False), ("rms_norm", "gated_silu", False),
    ("gated_gelu", "none", True), ("none", "gated_relu", False)])
def test_kernel_is_the_reference_composition(prologue, epilogue, residual):
    x, w, b = data((3, 7, 2 * 48 if prologue.startswith("gated") else 48), 2 * 20, seed=1)
    in_features = x.shape[-1] // 2 if prologue.startswith("gated") else x.shape[-1]
    w = w[:, :in_features].contiguous()
    norm = torch.rand(in_features) + 0.5 if prologue == "rms_norm" else None
    res = torch.randn(3, 7, w.shape[0] // 2 if epilogue != "none" else w.shape[0]) if residual else None
    args = (x, w, b, res, prologue, norm, 1e-6, epilogue)
    assert_rounding_close(linear_cpu.linear_cpu(*args), linear_reference(*args))
    assert torch.equal(torch.ops.fxopt.linear(*args), linear_cpu.linear_cpu(*args))  # the op's CPU kernel
    with linear_cpu.enabled(False):
        assert torch.equal(torch.ops.fxopt.linear(*args), linear_reference(*args))


def test_in_place_kernel_adds_into_the_residual():
    x, w, b = data((5, 40), 24, seed=2)
    norm = torch.rand(40, generator=torch.Generator().manual_seed(3)) + 0.5
    residual = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
    want = residual.clone()
    linear_add_reference(x, w, b, want, "rms_norm", norm, 1e-6)
    got = residual.clone()
    torch.ops.fxopt.linear_add_(x, w, b, got, "rms_norm", norm, 1e-6)
    assert_rounding_close(got, want)
    assert (got - residual).abs().min() > 0  # every element moved


def test_the_cpu_runtime_calls_the_kernel():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.fxopt.linear.default, (x, graph.get_attr("w")))
    graph.output((y,))
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)
    gm = fx.GraphModule(root, graph)
    assert [n.target for n in direct_graph(gm).nodes if n.op == "call_function"] == [linear_cpu.linear_cpu]
