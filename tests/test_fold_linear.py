"""The ``fold_linear`` pass: norms, gated activations and residual adds folded into ``fxopt.linear``."""
import pytest
import torch

import fxopt
from fxopt.errors import PassError
from families import VOCAB, tiny
from fxopt.ir import is_op, module_path
from fxopt.passes.fold_linear import fold_linears, linear_fields, unfold_linears
from test_fuse import model_of
from test_generate import LENGTHS, left_padded_batch

aten = torch.ops.aten
fx_ops = torch.ops.fxopt
FOLDED = ["canonicalize", "kv_cache", "fuse", "fold_linear", "dce"]
LAYERS = 2


def ops(gm, op):
    return [n for n in gm.graph.nodes if is_op(n, op)]


def folds(gm, op=fx_ops.linear):
    """Sorted (prologue, has a residual, epilogue) of the ``op`` nodes."""
    fields = [linear_fields(n) for n in ops(gm, op)]
    return sorted((f["prologue"], f["residual"] is not None, f["epilogue"]) for f in fields)


RMS, RES, GATE_UP, DOWN = ("rms_norm", False, "none"), ("none", True, "none"), ("rms_norm", False, "gated_silu"), \
    ("gated_silu", True, "none")
# per block, by default: q/k/v and gate/up behind their norms, o with the residual, down with the
# residual and the activation as its prologue; and the head behind the last norm
BLOCK = [RMS, RES, RMS, DOWN]
FOLDED_STATS = {"linear_residual": 2 * LAYERS, "linear_prologue_rms_norm": 2 * LAYERS + 1,
                "linear_prologue_gated": LAYERS}
# every rule on: the activation is gate/up's epilogue, down a plain linear with the residual
BLOCK_EPILOGUE = [RMS, RES, GATE_UP, RES]


@pytest.mark.parametrize("family, epilogue", [("llama", False), ("llama", True), ("qwen2", False)])
def test_a_block_becomes_four_linears(family, epilogue):
    """Mistral's graph is Llama's; Qwen2 has q/k/v biases. By default the activation becomes the
    down projection's prologue; with every rule on (fold_float_linear=True) gate/up's epilogue."""
    model = model_of(family)
    option = dict(fold_float_linear=True) if epilogue else {}
    compiled = fxopt.compile(model, passes=FOLDED, verify=True, max_batch_size=4, max_seq_len=64, **option)
    row = next(r for r in compiled.report() if r.name == "fold_linear")
    stats = dict(FOLDED_STATS)
    if epilogue:
        stats["linear_epilogue_gated"] = stats.pop("linear_prologue_gated")
    assert row.stats == stats
    assert row.max_error < 1e-4
    gm = compiled.graph_module
    for op in (fx_ops.rms_norm, fx_ops.add_rms_norm, fx_ops.gated_act, aten.linear, aten.add):
        assert not ops(gm, op), f"{op} left"
    assert folds(gm) == sorted((BLOCK_EPILOGUE if epilogue else BLOCK) * LAYERS + [RMS])
    labels = ("rms_norm", "residual", "rms_norm+epilogue_gated_silu" if epilogue else "gated_silu+residual")
    for node in ops(gm, fx_ops.linear):
        assert module_path(node) and node.meta["fxopt"]["folded"] in labels
    ids, mask = left_padded_batch(LENGTHS)
    ours = compiled.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_layer_norm_models_are_left_alone(family):
    compiled = fxopt.compile(tiny(family), passes=FOLDED, verify=True, max_seq_len=64)
    row = next(r for r in compiled.report() if r.name == "fold_linear")
    assert row.stats == {} and not ops(compiled.graph_module, fx_ops.linear)


def test_the_default_pipeline_folds():
    compiled = fxopt.compile(tiny("llama"), max_seq_len=64)
    assert [r.name for r in compiled.report()] == ["canonicalize", "kv_cache", "fuse", "position_tables", "fold_linear", "dce",
                                                    "cuda_graph"]
    assert len(ops(compiled.graph_module, fx_ops.linear)) == 4 * LAYERS + 1


def test_unfold_gives_back_the_graph_before():
    model = tiny("llama")
    folded = fxopt.compile(model, passes=FOLDED, max_seq_len=64)
    gm = folded.graph_module
    ids = torch.randint(0, VOCAB, (2, 7))
    before = folded(ids).logits
    assert unfold_linears(gm) == 4 * LAYERS + 1
    assert not ops(gm, fx_ops.linear) and len(ops(gm, aten.linear)) == 4 * LAYERS + 1
    gm.recompile()
    torch.testing.assert_close(folded(ids).logits, before, rtol=0, atol=0)  # the same arithmetic, op for op
    # and folding again gives the folded graph back
    assert fold_linears(gm) == FOLDED_STATS
    assert folds(gm) == sorted(BLOCK * LAYERS + [RMS])
    gm.recompile()
    torch.testing.assert_close(folded(ids).logits, before, rtol=0, atol=0)
    # the gated epilogue unfolds into the linear and its gated_act
    assert unfold_linears(gm) == 4 * LAYERS + 1
    assert fold_linears(gm, float_linear=True)["linear_epilogue_gated"] == LAYERS
    assert unfold_linears(gm) == 4 * LAYERS + 1
    assert len(ops(gm, fx_ops.gated_act)) == LAYERS
    gm.recompile()
    torch.testing.assert_close(folded(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("order, fold_quant", [("quantize_then_fold", False), ("fold_then_quantize", False),
                                               ("fold_then_quantize", True)])
def test_quantize_before_or_after_fold(order, fold_quant):
    """Whichever pass comes first (after fold_linear, quantize unfolds, quantizes and folds again).
    With fold_quant_linear=False the INT8 linears stay unfolded, each residual add with its norm
    one add_rms_norm; with fold_quant_linear=True they fold like float ones."""
    model = tiny("llama")
    tail = ["quantize", "fold_linear"] if order == "quantize_then_fold" else ["fold_linear", "quantize"]
    compiled = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", *tail, "dce"], verify=True,
                             max_seq_len=64, fold_quant_linear=fold_quant)
    gm = compiled.graph_module
    quant = ops(gm, fx_ops.quant_linear)
    assert len(quant) == 4 * LAYERS
    if fold_quant:
        assert folds(gm, fx_ops.quant_linear) == sorted(BLOCK_EPILOGUE * LAYERS)
        (head,) = ops(gm, fx_ops.linear)  # the head stays float (quant_lm_head=False) and takes the last norm
        assert head.args[4] == "rms_norm" and head.args[3] is None
        for op in (fx_ops.rms_norm, fx_ops.add_rms_norm, fx_ops.gated_act, aten.linear, aten.add):
            assert not ops(gm, op), f"{op} left"
    else:
        assert all(len(n.args) == 7 for n in quant) and len(ops(gm, fx_ops.gated_act)) == LAYERS
        if order == "quantize_then_fold":  # nothing to fold: the float head reads an add_rms_norm
            assert not ops(gm, fx_ops.linear) and not ops(gm, aten.add)
            assert len(ops(gm, fx_ops.add_rms_norm)) == 2 * LAYERS
        else:  # unfolded, quantized, folded again: the head keeps its norm, so the last add is alone
            (head,) = ops(gm, fx_ops.linear)
            assert head.args[4] == "rms_norm" and head.args[3] is None and len(ops(gm, aten.add)) == 1
            assert len(ops(gm, fx_ops.add_rms_norm)) == 2 * LAYERS - 1
    ids = torch.randint(0, VOCAB, (2, 9))
    err = (compiled(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert err < 0.05


NONE = ("none", False, "none")


@pytest.mark.parametrize("kinds, want", [
    (("gated",), [NONE] * 3 + [("gated_silu", False, "none")]),
    (("gated_epilogue",), [NONE] * 3 + [("none", False, "gated_silu")]),
    (("residual", "rms_norm"), [RMS] * 2 + [RES] * 2),
    (("residual", "gated"), [RES] + [NONE] * 2 + [("gated_silu", True, "none")]),
    (None, BLOCK_EPILOGUE),  # the default: residuals, norms, the activation as gate/up's epilogue
    (True, BLOCK_EPILOGUE),  # everything: the epilogue takes the activation before the down prologue could
])
def test_fold_quant_linear_by_kind(kinds, want):
    """fold_quant_linear names the kinds INT8 linears take: per block, only those fold (the sorted
    (prologue, has residual, epilogue) of its four quant_linears is ``want``), the activation or the
    norms left stay kernels of their own, and the logits still match the eager model."""
    model = tiny("llama")
    option = {} if kinds is None else dict(fold_quant_linear=kinds)
    compiled = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "quantize", "fold_linear", "dce"],
                             max_seq_len=64, **option)
    gm = compiled.graph_module
    assert folds(gm, fx_ops.quant_linear) == sorted(want * LAYERS)
    activations = sum(f == "gated_silu" for w in want for f in (w[0], w[2]))
    assert len(ops(gm, fx_ops.gated_act)) == (1 - activations) * LAYERS
    assert not ops(gm, aten.add)  # every residual is in a linear or an add_rms_norm
    ids = torch.randint(0, VOCAB, (3, 11))
    err = (compiled(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert err < 0.05


@pytest.mark.parametrize("kinds, want", [
    (("residual", "rms_norm"), [RMS, RES, RMS, RES]),  # the activation a kernel of its own
    (("residual", "rms_norm", "gated"), BLOCK),  # in the down projection's prologue (the default)
    (("residual", "rms_norm", "gated_epilogue"), BLOCK_EPILOGUE),  # in the gate/up projection's epilogue
])
def test_fold_float_linear_by_kind(kinds, want):
    """fold_float_linear names the kinds float linears take (the sorted (prologue, has residual,
    epilogue) of a block's four linears is ``want``); the logits still match the eager model's."""
    model = tiny("llama")
    compiled = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "fold_linear", "dce"],
                             max_seq_len=64, fold_float_linear=kinds)
    gm = compiled.graph_module
    assert len(ops(gm, fx_ops.gated_act)) == (0 if {"gated", "gated_epilogue"} & set(kinds) else LAYERS)
    assert folds(gm) == sorted(want * LAYERS + [RMS])
    ids = torch.randint(0, VOCAB, (2, 7))
    err = (compiled(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert err < 1e-5


def test_fold_quant_linear_refuses_an_unknown_kind():
    with pytest.raises(PassError, match="fold_linear.*unknown kind.*'norm'"):
        fxopt.compile(tiny("llama"), passes=["canonicalize", "kv_cache", "fuse", "quantize", "fold_linear"],
                      max_seq_len=64, fold_quant_linear=("norm",))


def test_no_residual_is_folded_before_an_all_reduce():
    """Tensor parallel: a row-parallel linear feeds its all-reduce, and only the reduced sum meets
    the residual; the column-parallel linears still take their norms."""
    compiled = fxopt.compile(tiny("llama"), ["canonicalize", "shard", "kv_cache", "fuse", "fold_linear", "dce"],
                             tp=2, rank=0)
    gm = compiled.graph_module
    reduces = [n for n in gm.graph.nodes if n.op == "call_function" and "all_reduce" in str(n.target)]
    assert len(reduces) == 2 * LAYERS + 1  # o and down of each block, and the vocab-parallel embedding
    for r in reduces[1:]:
        assert is_op(r.args[0], aten.linear, fx_ops.linear) and (is_op(r.args[0], aten.linear) or r.args[0].args[3] is None)
    # down still takes its activation; the first block's q/k/v its norm (no add before it); the
    # others read an add_rms_norm after an all-reduce
    assert folds(gm) == sorted([("gated_silu", False, "none")] * LAYERS + [RMS])
    # with the epilogue, gate/up takes it: column-parallel, each rank's [gate | up] shard
    compiled = fxopt.compile(tiny("llama"), ["canonicalize", "shard", "kv_cache", "fuse", "fold_linear", "dce"],
                             tp=2, rank=0, fold_float_linear=True)
    assert folds(compiled.graph_module) == sorted([("none", False, "gated_silu")] * LAYERS + [RMS])
