"""The pattern matcher (fxopt.patterns) and the `fuse` pass over every family."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import fxopt
from families import VOCAB, tiny
from fxopt.ir import is_op, module_path
from fxopt.passes.fuse import norm_patterns
from fxopt.patterns import Pattern, example, match_all, register_pattern, unregister_pattern
from test_generate import LENGTHS, left_padded_batch

aten = torch.ops.aten
fx_ops = torch.ops.fxopt
PIPELINE = ["canonicalize", "kv_cache", "fuse", "dce"]


def tiny_qwen2(seed=0):
    """Qwen2: Llama's layout with a bias on q/k/v."""
    torch.manual_seed(seed)
    cfg = T.Qwen2Config(vocab_size=VOCAB, initializer_range=0.2, hidden_size=48, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return T.Qwen2ForCausalLM(cfg).eval()


def model_of(family):
    return tiny_qwen2() if family == "qwen2" else tiny(family)


LLAMA_LIKE = {"qkv_concat": 2, "gate_up_concat": 2, "add_rms_norm": 4, "rms_norm": 1, "rotary": 2,
              "gated_act:silu": 2, "rotary_into_attention": 2}
EXPECTED = {  # what fuse reports for 2 layers: per layer 1 qkv, 1 gate/up, 1 rotary, 1 gated act, ...
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gpt2": {"add_layer_norm": 5, "act:gelu_tanh": 2},  # c_attn is one linear already; gelu_new spelled out
    "opt": {"qkv_concat": 2, "add_layer_norm": 5, "act:relu": 2},  # 3 of the 5 norms behind a reshape
}
FAMILIES = list(EXPECTED)
_compiled = {}


def compiled_family(family):
    """Each family compiled once (with verify) and shared by the tests below."""
    if family not in _compiled:
        model = model_of(family)
        _compiled[family] = model, fxopt.compile(model, passes=PIPELINE, verify=True, max_batch_size=4,
                                                 max_seq_len=64)
    return _compiled[family]


def ops(compiled, op):
    return [n for n in compiled.graph.nodes if is_op(n, op)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_fires_on_every_family(family):
    model, compiled = compiled_family(family)
    row = next(r for r in compiled.report() if r.name == "fuse")
    assert row.max_error < 1e-4
    assert row.stats == EXPECTED[family], row.stats  # no near_miss either: nothing almost matched
    layers = 2
    rms = family in ("llama", "mistral", "qwen2")
    counts = {op: len(ops(compiled, op)) for op in (fx_ops.rms_norm, fx_ops.add_rms_norm, fx_ops.layer_norm,
                                                    fx_ops.add_layer_norm, fx_ops.rotary, fx_ops.gated_act, fx_ops.act)}
    assert counts == {
        fx_ops.rms_norm: 1 if rms else 0, fx_ops.add_rms_norm: 2 * layers if rms else 0,
        fx_ops.layer_norm: 0, fx_ops.add_layer_norm: 0 if rms else 2 * layers + 1,
        fx_ops.rotary: 0, fx_ops.gated_act: layers if rms else 0,  # the rotary is folded into the attention
        fx_ops.act: 0 if rms else layers}
    for attn in ops(compiled, fx_ops.cached_attention):
        cos, sin = attn.args[8:10] if len(attn.args) > 8 else (None, None)
        assert (cos is not None and sin is not None) == rms
        assert (attn.meta.get("fxopt", {}).get("folded") == "rotary") == rms
    # nothing of a norm or of gelu_new is left standalone, in the blocks or after them
    for op in (aten.rsqrt, aten.pow, aten.mean, aten.layer_norm, aten.tanh, aten.silu, aten.relu, aten.neg):
        assert not ops(compiled, op), f"{op} left in {family}"
    # q/k/v (and gate/up) are one linear per layer: 4 linears per layer + lm_head
    assert len(ops(compiled, aten.linear)) == 4 * layers + 1
    for node in ops(compiled, fx_ops.rotary) + ops(compiled, fx_ops.gated_act) + ops(compiled, fx_ops.act):
        assert node.meta["fxopt"]["pattern"] and module_path(node)  # the dumps say what made it, and where
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_and_fold_fire_on_cuda_as_on_cpu(family):
    """The passes read shapes from the values the capture made; on CUDA those come from other fake
    kernels (linear's guards on symbolic sizes there), and a shape left unknown would quietly stop a
    pattern. The default pipeline must fire the same rewrites on both devices, in bf16."""
    model = model_of(family).to(torch.bfloat16)
    stats = {}
    for device in ("cpu", "cuda"):
        compiled = fxopt.compile(model.to(device), max_batch_size=4, max_seq_len=64)
        stats[device] = {r.name: r.stats for r in compiled.report() if r.name in ("fuse", "fold_linear")}
    assert stats["cuda"] == stats["cpu"]
    assert "near_miss" not in stats["cuda"]["fuse"], stats["cuda"]["fuse"]


def test_rotary_stays_its_own_op_when_skipped_or_when_its_dtype_differs():
    """fuse_skip=["rotary_into_attention"] keeps fxopt.rotary; so do cos/sin of another dtype than
    q (the rotated values would change dtype), and the numbers are the same either way."""
    from fxopt.passes.fuse import fold_rotary

    model = tiny("llama")
    skipped = fxopt.compile(model, passes=PIPELINE, fuse_skip=["rotary_into_attention"], max_batch_size=2,
                            max_seq_len=32)
    assert len(ops(skipped, fx_ops.rotary)) == 2
    assert "rotary_into_attention" not in next(r for r in skipped.report() if r.name == "fuse").stats
    folded = compiled_family("llama")[1]
    ids = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(skipped(ids).logits, folded(ids).logits, rtol=0, atol=0)
    gm = skipped.graph_module
    cos = ops(skipped, fx_ops.rotary)[0].args[2]  # the layers share the tables
    val = cos.meta["val"]
    cos.meta["val"] = val.to(torch.float64)  # as if the tables were computed in fp64
    assert fold_rotary(gm) == 0 and len(ops(skipped, fx_ops.rotary)) == 2
    cos.meta["val"] = val
    assert fold_rotary(gm) == 2 and not ops(skipped, fx_ops.rotary)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_still_equals_transformers(family):
    model, compiled = compiled_family(family)
    ids, mask = left_padded_batch(LENGTHS)
    ours = compiled.generate(ids, attention_mask=mask, max_new_tokens=32, pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_concatenated_weights_record_their_sources():
    model, compiled = compiled_family("qwen2")
    gm = compiled.graph_module
    fused = [n for n in ops(compiled, aten.linear) if n.meta.get("fxopt", {}).get("pattern") == "qkv_concat"]
    assert len(fused) == 2
    _x, w, b = fused[0].args
    p = "model.layers.0.self_attn"
    assert w.meta["param_sources"] == [(f"{p}.q_proj.weight", 0, 48), (f"{p}.k_proj.weight", 48, 64),
                                       (f"{p}.v_proj.weight", 64, 80)]
    assert b.meta["param_sources"] == [(f"{p}.q_proj.bias", 0, 48), (f"{p}.k_proj.bias", 48, 64),
                                       (f"{p}.v_proj.bias", 64, 80)]
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(gm.get_parameter(w.target), torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                                      attn.v_proj.weight]), rtol=0, atol=0)
    torch.testing.assert_close(gm.get_parameter(b.target), torch.cat([attn.q_proj.bias, attn.k_proj.bias,
                                                                      attn.v_proj.bias]), rtol=0, atol=0)
    names = {n for n, _ in gm.named_parameters()}
    assert f"{p}.q_proj.weight" not in names, "dce drops the weights the concatenation replaced"


class ThreeHeads(nn.Module):
    """Three linears over one input, one of them without a bias, plus one over another input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 6, bias=False), nn.Linear(8, 2)
        self.other = nn.Linear(8, 3)

    def forward(self, x):
        return self.a(x) * 2, self.b(x).sum(-1), self.c(x) + self.other(x + 1).sum(-1, keepdim=True)


def test_linears_with_and_without_bias_concatenate_with_zero_rows():
    model = ThreeHeads()
    compiled = fxopt.compile(model, example_inputs=(torch.randn(3, 8),), passes=["canonicalize", "fuse", "dce"],
                             verify=True)
    assert compiled.report()[1].stats == {"linear_concat": 1}
    assert len(ops(compiled, aten.linear)) == 2  # the fused one and `other`
    fused = ops(compiled, aten.linear)[0]
    assert fused.args[2].meta["param_sources"] == [("a.bias", 0, 4), (None, 4, 10), ("c.bias", 10, 12)]
    x = torch.randn(5, 8)
    for got, want in zip(compiled(x), model(x)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------


def interleaved_rotate_half(x):
    """GPT-J's rotate-every-two spelling: not the rotate-half the `rotary` op computes."""
    return torch.cat((-x[..., 1::2], x[..., ::2]), dim=-1)


def test_near_miss_on_a_rotary_spelled_differently(monkeypatch, tmp_path):
    from transformers.models.llama import modeling_llama
    monkeypatch.setattr(modeling_llama, "rotate_half", interleaved_rotate_half)
    compiled = fxopt.compile(tiny("llama"), passes=PIPELINE, verify=True, dump_dir=tmp_path)
    stats = compiled.report()[2].stats
    assert "rotary" not in stats and stats["rms_norm"] == 1 and stats["gated_act:silu"] == 2
    assert stats["near_miss"].startswith("rotary: matched ")
    assert "of 16 nodes; stopped at aten.slice in model.layers.0.self_attn (argument 'step' is 2, expected 1)" \
        in stats["near_miss"]
    assert "near_miss=rotary: matched" in (tmp_path / "03_fuse.txt").read_text()
    assert compiled.info.state["fuse"]["near_misses"] == [stats["near_miss"]]


class ClampedRMSNorm(nn.Module):
    """An RMSNorm with one op more than transformers'."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6).clamp(max=1e3)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self, dim=16, norm=None):
        super().__init__()
        self.norm = norm or ClampedRMSNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.norm(x))


def test_near_miss_on_a_norm_with_an_extra_op():
    compiled = fxopt.compile(Block(), example_inputs=(torch.randn(2, 5, 16),), passes=["canonicalize", "fuse"],
                             verify=True)
    stats = compiled.report()[1].stats
    assert stats == {"near_miss": "rms_norm: matched 4 of 8 nodes; stopped at aten.clamp in norm (expected aten.rsqrt)"}


# ---------------------------------------------------------------------------------------------
# User patterns
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fxopt_test::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@quick_gelu.register_fake
def _(x):
    return torch.empty_like(x)


QUICK_GELU = Pattern("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x), dict(x=example(2, 3, 8)),
                     replacement=lambda m: m.call(torch.ops.fxopt_test.quick_gelu.default, m["x"]))


def test_a_registered_pattern_fires_and_shows_in_the_report():
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, initializer_range=0.2,
                       activation_function="quick_gelu", eos_token_id=None, bos_token_id=None)
    model = T.GPT2LMHeadModel(cfg).eval()
    register_pattern(QUICK_GELU)
    try:
        compiled = fxopt.compile(model, passes=PIPELINE, verify=True)
    finally:
        unregister_pattern("quick_gelu")
    row = compiled.report()[2]
    assert row.stats == {"add_layer_norm": 5, "quick_gelu": 2}
    assert "quick_gelu=2" in str(compiled.report())
    assert len(ops(compiled, torch.ops.fxopt_test.quick_gelu)) == 2 and not ops(compiled, aten.sigmoid)
    plain = fxopt.compile(model, passes=PIPELINE)
    assert "quick_gelu" not in plain.report()[2].stats, "unregistered: no longer applied"


# ---------------------------------------------------------------------------------------------
# The matcher, rule by rule
# ---------------------------------------------------------------------------------------------


def graph_of(fn, *inputs):
    """A plain function captured and canonicalized the way fxopt captures a model."""

    class M(nn.Module):
        def forward(self, x, y=None):  # placeholders x, y
            return fn(x) if y is None else fn(x, y)

    return fxopt.compile(M(), example_inputs=inputs, passes=["canonicalize", "dce"]).graph_module


X, Y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
SILU_MUL = Pattern("silu_mul", lambda a, b: F.silu(a) * b, dict(a=example(2, 8), b=example(2, 8)))


def test_commutative_ops_match_in_either_operand_order():
    for fn in (lambda x, y: F.silu(x) * y, lambda x, y: y * F.silu(x)):
        (m,) = match_all(graph_of(fn, X, Y), SILU_MUL)
        assert m["a"].name == "x" and m["b"].name == "y"  # placeholders are named after forward's inputs
    assert not match_all(graph_of(lambda x, y: F.silu(x) + y, X, Y), SILU_MUL)


RMS = norm_patterns()[2]  # the built-in rms_norm pattern, written with x.float() ... .to(x.dtype)


def rms_module(upcast, eps=1e-6):
    def fn(x, w):
        h = x.float() if upcast else x
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_casts_are_optional_but_never_dropped(dtype):
    x, w = torch.randn(2, 3, 16, dtype=dtype), torch.randn(16, dtype=dtype)
    gm = graph_of(rms_module(upcast=True), x, w)
    casts = [n for n in gm.graph.nodes if is_op(n, aten._to_copy, aten.to)]
    assert len(casts) == (0 if dtype == torch.float32 else 2)  # fp32: canonicalize removed the no-op casts
    assert len(match_all(gm, RMS)) == 1
    # without the fp32 upcast a bf16 norm computes something else: the dtype rule refuses it
    assert len(match_all(graph_of(rms_module(upcast=False), x, w), RMS)) == (1 if dtype == torch.float32 else 0)


def test_scalar_wildcards_bind_constants_consistently():
    x, w = torch.randn(2, 3, 16), torch.randn(16)
    for eps in (1e-6, 1e-5):
        (m,) = match_all(graph_of(rms_module(True, eps), x, w), RMS)
        assert m["eps"] == eps
    twice = Pattern("twice", lambda a, b, s: a * s + b * s, dict(a=example(4), b=example(4), s=2.5))
    assert len(match_all(graph_of(lambda x, y: x * 3.0 + y * 3.0, X, Y), twice)) == 1
    assert not match_all(graph_of(lambda x, y: x * 3.0 + y * 4.0, X, Y), twice)
    literal = Pattern("half", lambda a: a * 0.5, dict(a=example(4)))
    assert not match_all(graph_of(lambda x: x * 0.25, X), literal)


def test_transposes_views_and_dims_match_in_any_spelling():
    pattern = Pattern("t_mean", lambda a: a.transpose(1, 2).reshape(2, 8, 4).mean(-1), dict(a=example(2, 4, 8)))
    spellings = [lambda x: x.transpose(2, 1).view(2, 8, 4).mean(2),
                 lambda x: x.permute(0, 2, 1).reshape(2, 8, 4).mean(-1)]
    for fn in spellings:
        assert len(match_all(graph_of(fn, X), pattern)) == 1
    assert not match_all(graph_of(lambda x: x.transpose(2, 1).reshape(2, 8, 4).mean(1), X), pattern)


def test_a_predicate_can_reject_and_say_why():
    picky = Pattern("picky", lambda a, b: F.silu(a) * b, dict(a=example(2, 8), b=example(2, 8)),
                    predicate=lambda m: m["a"].meta["val"].shape[-1] == 16 or "a is not 16 wide")
    found = match_all(graph_of(lambda x, y: F.silu(x) * y, X, Y), picky)
    assert not found
    assert str(found.near_miss) == "picky: matched 2 of 2 nodes; stopped at aten.mul (a is not 16 wide)"


def test_a_match_may_not_hide_a_value_used_elsewhere():
    def leaky(x, w):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * (x * r), r  # rsqrt is an output too: fusing the norm would lose it

    found = match_all(graph_of(leaky, torch.randn(2, 3, 16), torch.randn(16)), RMS)
    assert not found
    assert "%rsqrt is also used outside the match" in str(found.near_miss)
