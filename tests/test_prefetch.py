"""The ``prefetch`` pass (passes/prefetch.py) and the L2 prefetch of the decode attention
(kernels/triton_env.py, attention_triton.py): which weight each attention prefetches, found from the
dataflow; that nothing computed changes; how the bytes are shared among the requests."""
from __future__ import annotations

import pytest
import torch

import fxopt
from families import VOCAB, main_output, tiny
from fxopt.kernels import triton_env
from fxopt.passes.prefetch import next_weight

ATTENTION = torch.ops.fxopt.cached_attention.default
# The projection each family's attention feeds, by parameter name.
O_PROJ = {"llama": "self_attn.o_proj", "mistral": "self_attn.o_proj", "gpt2": "attn.c_proj", "opt": "self_attn.out_proj"}


PIPELINE = ["canonicalize", "kv_cache", "fuse", "fold_linear", "prefetch", "dce", "cuda_graph"]
WITHOUT = [p for p in PIPELINE if p != "prefetch"]


def _compile(model, passes=PIPELINE, **options):
    return fxopt.compile(model, passes=passes, max_batch_size=2, max_seq_len=32, **options)


def _prefetched(compiled) -> list[str]:
    """The get_attr target each attention prefetches, in graph order (None where it has none)."""
    gm = compiled.graph_module
    return [getattr(n.kwargs.get("prefetch"), "target", None) for n in gm.graph.find_nodes(op="call_function",
                                                                                          target=ATTENTION)]


@pytest.mark.parametrize("family", sorted(O_PROJ))
def test_each_attention_prefetches_the_weight_of_the_linear_it_feeds(family):
    compiled = _compile(tiny(family))
    targets = _prefetched(compiled)
    assert len(targets) == 2  # two layers
    for layer, target in enumerate(targets):
        assert target is not None
        # get_attr targets spell the parameter path with dots or underscores, after canonicalize
        name = target.replace("_", ".")
        assert f"{layer}.{O_PROJ[family]}.weight".replace("_", ".") in name, target
    (record,) = [r for r in compiled.report() if r.name == "prefetch"]
    assert record.stats == {"prefetch": 2}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefetch_changes_no_value(family):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with_pass, without = _compile(model), _compile(model, WITHOUT)
    assert _prefetched(without) == [None, None]
    torch.testing.assert_close(main_output(with_pass(ids)), main_output(without(ids)), atol=0, rtol=0)
    assert torch.equal(with_pass.generate(ids, max_new_tokens=6), without.generate(ids, max_new_tokens=6))


def test_int8_attention_prefetches_the_qweight_whatever_the_order():
    """After ``quantize`` the projection streams its INT8 qweight: prefetch that. Run the other way
    round, ``quantize`` moves the prefetch from the float weight it removes to the qweight."""
    model = tiny("llama")
    base = ["canonicalize", "kv_cache", "fuse"]
    for passes in (base + ["quantize", "prefetch", "dce"], base + ["prefetch", "quantize", "dce"]):
        compiled = _compile(model, passes=passes)
        targets = _prefetched(compiled)
        assert all(t is not None and t.endswith("o_proj.qweight") for t in targets), (passes, targets)
        gm = compiled.graph_module
        attrs = {n.target for n in gm.graph.find_nodes(op="get_attr")}
        assert not any(t.endswith("o_proj.weight") for t in attrs)  # the float weight is gone


def test_prefetch_linears_each_gemv_prefetches_the_next_weight():
    """With ``prefetch_linears``, each ``fxopt.linear`` prefetches the weight of the linear after it
    in the graph, except the one an attention already prefetches (the output projection's); the
    last one, with no linear after it, none. Values stay the same."""
    model = tiny("llama")
    compiled = _compile(model, prefetch_linears=True)
    gm = compiled.graph_module
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    weights = [n.args[1].target for n in linears]
    targets = [getattr(n.kwargs.get("prefetch"), "target", None) for n in linears]
    prefetched_by_attention = set(_prefetched(compiled))
    for i, (weight, target) in enumerate(zip(weights, targets)):
        following = weights[i + 1] if i + 1 < len(weights) else None
        expected = None if following in prefetched_by_attention else following
        assert target == expected, (weight, target, expected)
    assert sum(t is not None for t in targets) == 3 * 2  # qkv (the attention has it) and the head skip
    (record,) = [r for r in compiled.report() if r.name == "prefetch"]
    assert record.stats == {"prefetch": 2, "prefetch_linears": 6}
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    plain = _compile(model, WITHOUT)
    assert torch.equal(compiled.generate(ids, max_new_tokens=5), plain.generate(ids, max_new_tokens=5))


def test_no_linear_after_the_attention_no_prefetch():
    """An attention whose output reaches no linear's input (here: only a sum) prefetches nothing."""
    class Head(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum(-1)

    q = torch.randn(1, 2, 5, 8)
    compiled = fxopt.compile(Head(), passes=["canonicalize"], example_inputs=(q, q, q))
    (sdpa,) = [n for n in compiled.graph_module.graph.nodes if "attention" in str(n.target)]
    assert next_weight(sdpa) is None


@pytest.mark.parametrize("nbytes, l2, programs", [
    (2048 * 2048 * 2, 50 * 2**20, 64),  # llama-1b o_proj, 8 kv heads x 8 splits
    (4096 * 4096 * 2, 50 * 2**20, 256),  # llama2-7b o_proj: more than half the L2
    (4096 * 4096, 60 * 2**20, 256),  # its INT8 qweight on an H200
    (576 * 576 * 2 + 6, 50 * 2**20, 27),  # not a multiple of 16
    (1000, 50 * 2**20, 7),
])
def test_prefetch_split_covers_the_bytes_in_aligned_requests(nbytes, l2, programs):
    total, chunk = triton_env.prefetch_split(nbytes, l2, programs)
    assert total == min(nbytes, int(l2 * triton_env.PREFETCH_L2_FRACTION)) // 16 * 16
    assert chunk % 16 == 0 and chunk >= 16
    requests = programs * triton_env.PREFETCH_CHUNKS
    assert requests * chunk >= total  # every byte has a request
    assert (requests - 1) * chunk < total + requests * 16  # and the requests are no larger than needed
    offsets = torch.arange(requests, dtype=torch.int64) * chunk
    sizes = (total - offsets).clamp(0, chunk)
    assert bool((sizes % 16 == 0).all())
    assert int(sizes.sum()) == total  # the kernel's arithmetic: no byte twice, none missed


def test_prefetch_plan_off_without_a_hopper_gpu(monkeypatch):
    weight = torch.randn(64, 64)
    assert triton_env.prefetch_plan(None, 4) == (0, 0)
    assert triton_env.prefetch_plan(weight, 4) == (0, 0)  # CPU (or the interpreter)
    monkeypatch.setattr(triton_env, "PREFETCH_MODE", "sometimes")
    with pytest.raises(ValueError, match=r"FXOPT_PREFETCH='sometimes': expected one of off, on"):
        triton_env.prefetch_plan(weight, 4)


# --------------------------------------------------------------------------------------------- #
# GPU: the kernel with its prefetch
# --------------------------------------------------------------------------------------------- #

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads_q, heads_kv, dim, starts", [(32, 8, 64, [100, 7]), (32, 32, 128, [300, 0])])
def test_gpu_prefetch_is_a_hint(dtype, heads_q, heads_kv, dim, starts):
    """Decode with an L2 prefetch of a weight computes the same bits, eagerly and captured."""
    from fxopt.kernels import attention_triton as at

    at.register()
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, max_seq = len(starts), 512
    q = torch.randn(batch, heads_q, 1, dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, heads_kv, 1, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn_like(k)
    caches = torch.randn(2, batch, heads_kv, max_seq, dim, device="cuda", dtype=dtype, generator=g)
    positions = torch.tensor(starts, device="cuda")[:, None]
    weight = torch.randn(heads_q * dim, heads_q * dim, device="cuda", dtype=dtype, generator=g)
    assert triton_env.prefetch_plan(weight, 64)[0] > 0 or torch.cuda.get_device_capability()[0] < 9
    kc, vc = caches.clone()
    expected = at.cached_attention_triton(q, k, v, kc, vc, positions, dim ** -0.5)
    kc2, vc2 = caches.clone()
    got = at.cached_attention_triton(q, k, v, kc2, vc2, positions, dim ** -0.5, prefetch=weight)
    assert torch.equal(got, expected) and torch.equal(kc2, kc) and torch.equal(vc2, vc)

    graph = torch.cuda.CUDAGraph()
    kc3, vc3 = caches.clone()
    with torch.cuda.graph(graph):
        out = torch.ops.fxopt.cached_attention(q, k, v, kc3, vc3, positions, dim ** -0.5, prefetch=weight)
    graph.replay()
    assert torch.equal(out, expected) and torch.equal(kc3, kc)


@pytest.mark.gpu
@pytest.mark.parametrize("prologue, residual", [("rms_norm", False), ("none", True), ("gated_silu", True)])
def test_gpu_linear_prefetch_is_a_hint(prologue, residual):
    """The decode GEMV with a prefetch of another weight computes the same bits."""
    from fxopt.kernels.linear_triton import linear_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    k, n = 1024, 3000
    x = torch.randn(1, 2 * k if prologue.startswith("gated") else k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g)
    gamma = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5 if prologue == "rms_norm" else None
    res = torch.randn(1, n, device="cuda", dtype=torch.bfloat16, generator=g) if residual else None
    other = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    expected = linear_decode(x, w, None, res, prologue, gamma, 1e-5)
    assert torch.equal(linear_decode(x, w, None, res, prologue, gamma, 1e-5, prefetch=other), expected)


@pytest.mark.gpu
def test_gpu_prefetch_pipeline_generates_the_same_tokens():
    model = tiny("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    without = _compile(model, WITHOUT)
    expected = without.generate(ids, max_new_tokens=12)
    for options in ({}, dict(prefetch_linears=True)):
        compiled = _compile(model, **options)
        assert _prefetched(compiled)[0] is not None
        assert torch.equal(compiled.generate(ids, max_new_tokens=12), expected)
