"""Programmatic dependent launch (kernels/triton_env.py): when it applies, and on a GPU, that a
captured chain of dependent decode kernels computes what it computes without it."""
from __future__ import annotations

import pytest
import torch

import fxopt
from families import VOCAB, tiny
from fxopt.kernels import triton_env
from fxopt.kernels.activation import gated_act_reference
from fxopt.kernels.attention import cached_attention_reference
from fxopt.kernels.linear import linear_reference
from fxopt.kernels.norm import rms_norm_reference
from fxopt.kernels.quant import quant_linear_reference, quantize_weight


@pytest.fixture
def cuda_like(monkeypatch):
    """pdl_code's view of a CUDA device 0 of a chosen compute capability, without a GPU."""
    if triton_env.gdc_wait is None:
        pytest.skip("this triton has no grid dependency control")
    monkeypatch.setattr(triton_env, "INTERPRET", False)

    def capability(hopper: bool):
        monkeypatch.setattr(triton_env, "_PDL_DEVICES", {0: hopper})
        return torch.device("cuda", 0)
    return capability


@pytest.mark.parametrize("mode, code", [("off", 0), ("on", 1)])
def test_pdl_code_follows_the_mode_on_hopper(cuda_like, monkeypatch, mode, code):
    monkeypatch.setattr(triton_env, "PDL_MODE", mode)
    assert triton_env.pdl_code(cuda_like(hopper=True)) == code


def test_pdl_is_never_used_before_hopper_on_cpu_or_in_the_interpreter(cuda_like, monkeypatch):
    monkeypatch.setattr(triton_env, "PDL_MODE", "on")
    assert triton_env.pdl_code(cuda_like(hopper=False)) == 0
    assert triton_env.pdl_code(torch.device("cpu")) == 0
    device = cuda_like(hopper=True)
    monkeypatch.setattr(triton_env, "INTERPRET", True)
    assert triton_env.pdl_code(device) == 0


def test_an_unknown_mode_is_named(monkeypatch):
    monkeypatch.setattr(triton_env, "PDL_MODE", "sometimes")
    with pytest.raises(ValueError, match=r"FXOPT_PDL='sometimes': expected one of off, on"):
        triton_env.pdl_code(torch.device("cpu"))


# --------------------------------------------------------------------------------------------- #
# GPU: a captured chain of dependent kernels
# --------------------------------------------------------------------------------------------- #

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS, CACHE, GROUP = 1024, 8, 128, 1376, 3, 300, 128


def _layers(gen: torch.Generator, dtype):
    """Random weights of a small decoder: qkv (norm prologue), o (+residual), INT8 gate/up (norm
    prologue), down (gated-SiLU prologue, +residual)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dtype)
    layers = []
    for _ in range(LAYERS):
        gate_up = torch.randn(2 * FFN, HIDDEN, generator=gen) / HIDDEN ** 0.5
        qw, sc = quantize_weight(gate_up.to(dtype), GROUP, 8)
        layers.append(dict(
            qkv=rand(3 * HIDDEN, HIDDEN, scale=HIDDEN ** -0.5), o=rand(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5),
            qw=qw.cuda(), sc=sc.cuda(), down=rand(HIDDEN, FFN, scale=FFN ** -0.5),
            g1=rand(HIDDEN).abs() + 0.5, g2=rand(HIDDEN).abs() + 0.5,
            k_cache=rand(1, HEADS, CACHE, HEAD_DIM), v_cache=rand(1, HEADS, CACHE, HEAD_DIM)))
    return layers


def _step(h, layers, positions, ops):
    """One decode step of the chain; ``ops`` the Triton functions or their references. The first
    layer folds its norm and activation into the GEMVs (the activation as the down projection's
    prologue), the second runs them as kernels of their own, the third folds the activation into
    the INT8 gate/up projection's epilogue."""
    linear, quant_linear, attention, gated_act, rms_norm = ops
    for i, w in enumerate(layers):
        if i == 0:
            qkv = linear(h, w["qkv"], None, None, "rms_norm", w["g1"], 1e-6)
        else:
            qkv = linear(rms_norm(h, w["g1"], 1e-6), w["qkv"], None, None, "none", None, 0.0)
        q, k, v = (t.view(1, 1, HEADS, HEAD_DIM).transpose(1, 2) for t in qkv.split(HIDDEN, dim=-1))
        a = attention(q, k, v, w["k_cache"], w["v_cache"], positions, HEAD_DIM ** -0.5)
        h = linear(a.transpose(1, 2).reshape(1, HIDDEN), w["o"], None, h, "none", None, 0.0)
        if i == 2:
            a = quant_linear(h, w["qw"], w["sc"], None, GROUP, 8, HIDDEN, None, "rms_norm", w["g2"], 1e-6,
                             "gated_silu")
            h = linear(a, w["down"], None, h, "none", None, 0.0)
            continue
        gu = quant_linear(h, w["qw"], w["sc"], None, GROUP, 8, HIDDEN, None, "rms_norm", w["g2"], 1e-6)
        if i == 0:
            h = linear(gu, w["down"], None, h, "gated_silu", None, 0.0)
        else:
            h = linear(gated_act(gu, "silu"), w["down"], None, h, "none", None, 0.0)
    return h


def _captured_chain(mode: str, monkeypatch, dtype, steps):
    """Outputs of ``steps`` (x, position) replays of one captured decode step under a PDL mode."""
    from fxopt.kernels.activation_triton import gated_act_triton
    from fxopt.kernels.attention_triton import cached_attention_triton
    from fxopt.kernels.linear_triton import linear_triton
    from fxopt.kernels.norm_triton import rms_norm_triton
    from fxopt.kernels.quant_triton import quant_linear_triton
    monkeypatch.setattr(triton_env, "PDL_MODE", mode)
    layers = _layers(torch.Generator().manual_seed(0), dtype)
    ops = (linear_triton, quant_linear_triton, cached_attention_triton, gated_act_triton, rms_norm_triton)
    x = torch.zeros(1, HIDDEN, dtype=dtype, device="cuda")
    positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile off the capture
        _step(x, layers, positions, ops)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(x, layers, positions, ops)
    outs = []
    for new_x, position in steps:
        x.copy_(new_x)
        positions.fill_(position)
        graph.replay()
        outs.append(out.clone())
    return outs, layers


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_captured_chain_of_dependent_kernels_computes_what_it_does_without_pdl(dtype, monkeypatch):
    """21 kernels deep (GEMVs with a norm prologue, a gated one and a residual, INT8 GEMVs with and
    without a gated epilogue, split attention and its merge, RMSNorm and gated-activation kernels),
    each reading what the one
    before wrote; replayed at several cache positions with new inputs. Equal to the chain without
    PDL, and close to the references."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    gen = torch.Generator().manual_seed(1)
    steps = [(torch.randn(1, HIDDEN, generator=gen).to("cuda", dtype), p) for p in (5, 127, 128, CACHE - 1)]
    got, _ = _captured_chain("on", monkeypatch, dtype, steps)
    base, layers = _captured_chain("off", monkeypatch, dtype, steps)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    refs = (linear_reference, quant_linear_reference, cached_attention_reference, gated_act_reference,
            rms_norm_reference)
    for (x, position), out in zip(steps, got):
        expected = _step(x, layers, torch.full((1, 1), position, device="cuda"), refs)
        assert torch.isfinite(out).all()
        assert (out.float() - expected.float()).norm() / expected.float().norm() < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("passes", [None, ["canonicalize", "kv_cache", "fuse", "quantize", "fold_linear", "dce",
                                           "cuda_graph"]])
def test_generation_is_the_same_with_and_without_pdl(passes, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    model = tiny("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(triton_env, "PDL_MODE", mode)
        compiled = fxopt.compile(model, passes=passes, max_batch_size=4, max_seq_len=64)
        tokens[mode] = compiled.generate(ids, max_new_tokens=20)
        tokens[mode + "-b1"] = compiled.generate(ids[:1], max_new_tokens=20)
    assert torch.equal(tokens["on"], tokens["off"]) and torch.equal(tokens["on-b1"], tokens["off-b1"])


# --------------------------------------------------------------------------------------------- #
# The GEMVs' PDL knobs: trigger_steps (trigger inside the K loop), preload (L2 before the wait)
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("trigger_steps, preload", [(-1, 0), (1.5, 0), (0, 64), (0, 384), (0, "1k")])
def test_bad_pdl_knobs_are_named(trigger_steps, preload):
    with pytest.raises(ValueError, match="trigger_steps" if trigger_steps in (-1, 1.5) else "preload"):
        triton_env.check_pdl_knobs(trigger_steps, preload, "test")


def test_quant_config_rejects_bad_pdl_knobs():
    from fxopt.kernels import quant_triton
    with pytest.raises(ValueError, match="quant_linear_triton: preload"):
        quant_triton.decode_plan(1, 64, 64, 32, torch.device("cpu"), config=dict(preload=100))
    plan = quant_triton.decode_plan(1, 64, 64, 32, torch.device("cpu"), config=dict(trigger_steps=2, preload=1024))
    assert (plan["trigger_steps"], plan["preload"]) == (2, 1024)


def _set_pdl_knobs(monkeypatch, trigger_steps, preload, attn_slots):
    """The knobs on every one-row GEMV (linear_triton's tiles and quant_triton's one-row INT8 entry)
    and the decode attention's preload."""
    from fxopt.kernels import attention_triton, linear_triton, quant_triton
    monkeypatch.setattr(attention_triton, "DECODE_PRELOAD_SLOTS", attn_slots)
    monkeypatch.setitem(linear_triton.DECODE_TILES, "trigger_steps", trigger_steps)
    monkeypatch.setitem(linear_triton.DECODE_TILES, "preload", preload)
    (max_m, tiles), *rest = quant_triton.DECODE_TILES[8]
    monkeypatch.setitem(quant_triton.DECODE_TILES, 8,
                        ((max_m, {**tiles, "trigger_steps": trigger_steps, "preload": preload}), *rest))


@pytest.mark.gpu
@pytest.mark.parametrize("trigger_steps, preload, attn_slots", [(1, 0, 0), (0, 1024, 64), (2, 2048, 16), (50, 128, 128)])
def test_the_chain_is_the_same_with_the_pdl_knobs(trigger_steps, preload, attn_slots, monkeypatch):
    """Triggering the next kernel inside the K loop (50: before the first step) and warming the L2
    with weights and cache slots before the wait change when things run, never what they compute:
    bit for bit the chain without PDL (cache positions up to its last slot)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    gen = torch.Generator().manual_seed(2)
    steps = [(torch.randn(1, HIDDEN, generator=gen).to("cuda", torch.bfloat16), p) for p in (7, 128, CACHE - 1)]
    base, _ = _captured_chain("off", monkeypatch, torch.bfloat16, steps)
    _set_pdl_knobs(monkeypatch, trigger_steps, preload, attn_slots)
    got, _ = _captured_chain("on", monkeypatch, torch.bfloat16, steps)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
