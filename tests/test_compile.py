"""fxopt.compile: the pass pipeline, verification, report, dumps, bisecting, and its errors."""
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxopt
from families import ALL, VOCAB, main_output, tiny
from fxopt.ir import is_op

aten = torch.ops.aten


@pytest.mark.parametrize("family", ALL)
def test_compile_with_verify_matches_eager_on_two_shapes(family):
    model = tiny(family)
    compiled = fxopt.compile(model, passes=["canonicalize", "dce"], verify=True)
    report = compiled.report()
    assert [r.name for r in report] == ["canonicalize", "dce"]
    assert all(r.max_error is not None and r.max_error < 1e-4 for r in report)
    graph_before = str(compiled.graph)
    for shape in [(2, 9), (5, 3)]:
        ids = torch.randint(0, VOCAB, shape)
        torch.testing.assert_close(main_output(compiled(ids)), main_output(model(ids)), rtol=1e-5, atol=1e-5)
    assert str(compiled.graph) == graph_before, "no recompilation between shapes"


def _example_sizes(value):
    """A node's value with every dim at its example size, and whether the dim is static: what
    two propagations must agree on (they may name a symbol differently, or one may have unified
    two where the other did not, but a dim pinned to a number would bake that size in)."""
    from fxopt.ir import _hint, static_dim
    if isinstance(value, torch.Tensor):
        return [(_hint(d), static_dim(d) is not None) for d in value.shape], value.dtype
    if isinstance(value, torch.SymInt):
        return _hint(value), static_dim(value) is not None
    if isinstance(value, (list, tuple)):
        return [_example_sizes(v) for v in value]
    return value if isinstance(value, (int, float, bool, type(None))) else str(value)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_the_passes_keep_are_what_propagation_gives(family, dtype):
    """canonicalize, kv_cache, fuse, position_tables and fold_linear set the values of what they
    make instead of re-propagating the graph (preserves_meta): every node's value after the
    default pipeline is what a fresh propagation gives it, its symbolic dims still symbolic."""
    from fxopt.ir import propagate_meta
    from test_fuse import model_of
    gm = fxopt.compile(model_of(family).to(dtype), max_batch_size=4, max_seq_len=64).graph_module
    kept = {n.name: _example_sizes(n.meta["val"]) for n in gm.graph.nodes if n.op != "output"}
    propagate_meta(gm)
    fresh = {n.name: _example_sizes(n.meta["val"]) for n in gm.graph.nodes if n.op != "output"}
    assert kept == fresh


@torch.library.custom_op("fxopt_test::picky_double", mutates_args=())
def _picky_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_picky_double.register_fake
def _(x):  # as linear's on CUDA with torch 2.11: a fake kernel that cannot take symbolic sizes
    raise RuntimeError("this fake kernel needs concrete sizes")


def test_a_new_nodes_value_comes_from_the_shape_rules_where_its_fake_kernel_fails(monkeypatch):
    """A pass's new node gets its value (infer_meta) as propagation would give it: by the op's
    shape rule where one is stated, so a pattern reading its shape still matches."""
    from fxopt import ir
    from fxopt.patterns import infer_meta
    gm = fxopt.compile(tiny("llama"), passes=["canonicalize"]).graph_module
    x = next(n for n in gm.graph.nodes if is_op(n, aten.linear.default))
    with gm.graph.inserting_after(x):
        node = gm.graph.call_function(torch.ops.fxopt_test.picky_double.default, (x,))
    infer_meta(gm, node)
    assert "val" not in node.meta  # the fake kernel failed and no rule says otherwise
    monkeypatch.setitem(ir._SHAPE_RULES, torch.ops.fxopt_test.picky_double.default, lambda t: t.new_empty(t.shape))
    infer_meta(gm, node)
    assert [str(d) for d in node.meta["val"].shape] == [str(d) for d in x.meta["val"].shape]
    assert any(not isinstance(d, int) for d in node.meta["val"].shape)  # still symbolic, not pinned


def test_complete_meta_propagates_only_for_a_node_without_a_value_and_names_it():
    from fxopt.ir import complete_meta
    gm = fxopt.compile(tiny("llama"), passes=["canonicalize"]).graph_module
    assert complete_meta(gm) is None
    linears = [n for n in gm.graph.nodes if is_op(n, aten.linear.default)]
    shapes = [_example_sizes(n.meta["val"]) for n in linears[:2]]
    for n in linears[:2]:
        del n.meta["val"]
    assert complete_meta(gm) == f"%{linears[0].name} (+1 more)"
    assert [_example_sizes(n.meta["val"]) for n in linears[:2]] == shapes


def test_canonicalize_normal_form_gpt2():
    model = tiny("gpt2")
    compiled = fxopt.compile(model, passes=["canonicalize", "dce"], verify=True)
    targets = [n.target for n in compiled.graph.nodes if n.op == "call_function"]
    assert aten.addmm.default not in targets, "Conv1D must become linear"
    assert aten.view.default not in targets and aten._assert_tensor_metadata.default not in targets
    assert aten.dropout.default not in targets
    assert targets.count(aten.linear.default) == 2 * 4 + 1  # qkv, proj, fc, fc-proj per layer + lm_head
    stats = compiled.report()[0].stats
    assert stats["conv1d_to_linear"] == 8
    # the Conv1D weight [in, out] is held transposed, [out, in], as linear wants it
    w = compiled.graph_module.get_parameter("transformer.h.0.attn.c_attn.weight")
    torch.testing.assert_close(w, model.transformer.h[0].attn.c_attn.weight.t())


def test_canonicalize_drops_noop_casts_and_identity_scalars():
    class Noisy(nn.Module):
        def forward(self, x):
            y = x.to(torch.float32).view(x.shape) * 1.0 + 0
            return (y.clone().reshape(-1, x.shape[-1]) + 2).to(torch.float64)

    model = Noisy()
    compiled = fxopt.compile(model, example_inputs=(torch.randn(3, 5),), passes=["canonicalize", "dce"], verify=True)
    ops = [n.target for n in compiled.graph.nodes if n.op == "call_function"]
    assert aten.mul.Tensor not in ops and aten.clone.default not in ops
    assert sum(is_op(n, aten._to_copy.default, aten.to.dtype) for n in compiled.graph.nodes) == 1  # the real cast
    x = torch.randn(4, 5)
    torch.testing.assert_close(compiled(x), model(x))


class DoubleNeg(fxopt.Pass):
    """A user pass: neg(neg(x)) → x."""
    name = "fold_double_neg"

    def run(self, gm, ctx):
        folded = 0
        for node in list(gm.graph.nodes):
            if is_op(node, aten.neg.default) and is_op(node.args[0], aten.neg.default):
                node.replace_all_uses_with(node.args[0].args[0])
                folded += 1
        gm.graph.eliminate_dead_code()
        return fxopt.PassResult(changed=folded > 0, stats={"folded": folded})


class NegNeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return -(-self.lin(x)) + torch.relu(x)


def test_custom_pass_changes_graph_shows_in_report_and_dumps(tmp_path):
    model = NegNeg()
    compiled = fxopt.compile(model, example_inputs=(torch.randn(2, 6),), passes=["canonicalize", DoubleNeg(), "dce"],
                             verify=True, dump_dir=tmp_path)
    row = compiled.report()[1]
    assert row.name == "fold_double_neg" and row.changed and row.stats == {"folded": 1}
    assert row.nodes_after == row.nodes_before - 2
    assert "fold_double_neg" in str(compiled.report())
    assert not any(is_op(n, aten.neg.default) for n in compiled.graph.nodes)
    diff = (tmp_path / "02_fold_double_neg.diff").read_text()
    assert re.search(r"^-%neg", diff, re.M), diff
    x = torch.randn(5, 6)
    torch.testing.assert_close(compiled(x), model(x))


def test_function_pass_and_registry(tmp_path):
    def relu_to_clamp(gm):
        for node in gm.graph.nodes:
            if is_op(node, aten.relu.default):
                node.target = aten.clamp_min.default
                node.args = (node.args[0], 0.0)
        return gm

    fxopt.register_pass("relu_to_clamp")(relu_to_clamp)
    assert "relu_to_clamp" in fxopt.available_passes()
    model = NegNeg()
    compiled = fxopt.compile(model, example_inputs=(torch.randn(2, 6),), passes=["relu_to_clamp"], verify=True)
    assert compiled.report()[0].changed
    assert any(is_op(n, aten.clamp_min.default) for n in compiled.graph.nodes)


def test_dumps_for_every_pass_and_index_links_them(tmp_path):
    compiled = fxopt.compile(tiny("llama"), verify=True, dump_dir=tmp_path)
    names = ["capture"] + [r.name for r in compiled.report()]
    index = (tmp_path / "index.html").read_text()
    links = set(re.findall(r'href="([^"#]+)"', index))
    for step, name in enumerate(names):
        for ext in ("txt", "diff", "json"):
            f = f"{step:02d}_{name}.{ext}"
            assert (tmp_path / f).exists(), f
            assert f in links, f
    listing = (tmp_path / "02_kv_cache.txt").read_text()
    assert "fxopt.cached_attention" in listing and "model.layers.1.self_attn" in listing


def test_unknown_pass_name():
    with pytest.raises(fxopt.PassError, match="unknown pass 'fuse_everything'.*known passes: .*canonicalize"):
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(2, 6),), passes=["fuse_everything"])


def test_pass_that_breaks_the_numbers_is_caught_and_located():
    def break_relu(gm):
        for node in gm.graph.nodes:
            if is_op(node, aten.relu.default):
                node.target = aten.neg.default
        return gm

    with pytest.raises(fxopt.VerificationError) as e:
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=["canonicalize", break_relu], verify=True)
    msg = str(e.value)
    assert "after pass 'break_relu'" in msg and "relative error" in msg
    assert "first diverging node: %relu" in msg


def test_pass_that_leaves_a_malformed_graph():
    def dangle(gm: fx.GraphModule):
        lin = next(n for n in gm.graph.nodes if is_op(n, aten.linear.default))
        with gm.graph.inserting_before(lin):
            bad = gm.graph.call_function(aten.neg.default, (lin,))  # uses a value defined after it
        lin.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        return gm

    with pytest.raises(fxopt.PassError, match="pass 'dangle' left a malformed graph"):
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=[dangle])


def test_pass_that_raises_is_named():
    def explode(gm):
        raise KeyError("boom")

    with pytest.raises(fxopt.PassError, match="pass 'explode' failed: KeyError"):
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=[explode])


def test_disable_and_stop_after_bisect():
    model = NegNeg()
    kw = dict(example_inputs=(torch.randn(2, 6),), passes=["canonicalize", DoubleNeg(), "dce"])
    off = fxopt.compile(model, disable=["fold_double_neg"], **kw)
    assert off.report()[1].skipped == "disabled"
    assert any(is_op(n, aten.neg.default) for n in off.graph.nodes)
    early = fxopt.compile(model, stop_after="canonicalize", **kw)
    assert [r.name for r in early.report()] == ["canonicalize"]
    with pytest.raises(fxopt.PassError, match="'nope'.*not in the pipeline"):
        fxopt.compile(model, stop_after="nope", **kw)


def test_compiled_module_input_errors():
    compiled = fxopt.compile(tiny("llama"), passes=["canonicalize"])
    with pytest.raises(fxopt.InputError, match="input 'input_ids' has dtype torch.float32"):
        compiled(torch.randn(2, 3))
    with pytest.raises(fxopt.InputError, match="labels"):
        compiled(torch.randint(0, VOCAB, (2, 3)), labels=torch.randint(0, VOCAB, (2, 3)))
    with pytest.raises(fxopt.InputError, match="use_cache"):
        compiled(torch.randint(0, VOCAB, (2, 3)), use_cache=True)


# ---------------------------------------------------------------------------------------------
# Approximate passes: a declared tolerance (Pass.tolerance)
# ---------------------------------------------------------------------------------------------


class Nudge(fxopt.Pass):
    """Scales the linear's output by ``factor``: changes the numbers on purpose when it declares
    ``bound`` (None: an exact pass that is wrong)."""
    name = "nudge"

    def __init__(self, factor=1.001, bound=None, name=None):
        self.factor, self.bound = factor, bound
        if name:
            self.name = name

    def run(self, gm, ctx):
        lin = next(n for n in gm.graph.nodes if is_op(n, aten.linear.default))
        with gm.graph.inserting_after(lin):
            scaled = gm.graph.call_function(aten.mul.Tensor, (lin, self.factor))
        lin.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        return fxopt.PassResult(changed=True)

    def tolerance(self, dtype, ctx):
        return self.bound


def test_an_approximate_pass_is_checked_against_its_declared_bound_and_becomes_the_reference():
    model, x = NegNeg(), (torch.randn(4, 6),)
    compiled = fxopt.compile(model, example_inputs=x, passes=["canonicalize", Nudge(1.001, 5e-3), DoubleNeg(), "dce"],
                             verify=True)
    canon, nudge, fold, dce = compiled.report()
    assert not canon.approximate and canon.reference == "eager" and canon.tolerance == 1e-4
    assert nudge.approximate and nudge.tolerance == 5e-3 and nudge.reference == "eager"
    assert 1e-4 < nudge.step_error == nudge.max_error < 5e-3  # ~1e-3 of the linear's share of the output
    for later in (fold, dce):  # exact: tightly against the nudged graph; against eager: nudge's error
        assert not later.approximate and later.reference == "nudge" and later.tolerance == 1e-4
        assert later.step_error < 1e-6 and later.max_error == pytest.approx(nudge.max_error, rel=1e-3)
    text = str(compiled.report())
    assert "step err" in text and "bound" in text and "5.00e-03*" in text
    # without an approximate pass the table keeps its columns
    assert "step err" not in str(fxopt.compile(model, example_inputs=x, passes=["canonicalize"], verify=True).report())


def test_an_approximate_pass_past_its_bound_fails_naming_the_node():
    with pytest.raises(fxopt.VerificationError) as e:
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=["canonicalize", Nudge(1.1, 5e-3)],
                      verify=True)
    msg = str(e.value)
    assert "after pass 'nudge'" in msg and "by more than the pass declares it may" in msg and "> 0.005" in msg
    assert "first diverging node: %mul_tensor (aten.mul.Tensor" in msg and "which it replaced" in msg


def test_an_exact_pass_after_an_approximate_one_is_held_to_the_tight_tolerance():
    """1e-3 more error would pass the approximate pass's 5e-3 bound against eager; against the
    approximate graph it is 10x the fp32 tolerance."""
    passes = ["canonicalize", Nudge(1.001, 5e-3), Nudge(1.001, name="exact_but_wrong"), "dce"]
    with pytest.raises(fxopt.VerificationError) as e:
        fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=passes, verify=True)
    msg = str(e.value)
    assert "after pass 'exact_but_wrong', output 0 diverges from the graph after 'nudge'" in msg and "> 0.0001" in msg
    assert "first diverging node: %mul_tensor_1 (aten.mul.Tensor" in msg


def test_a_pass_that_changes_nothing_is_exact_whatever_it_declares():
    class Idle(fxopt.Pass):
        name = "idle"

        def run(self, gm, ctx):
            return fxopt.PassResult(changed=False)

        def tolerance(self, dtype, ctx):
            return 0.5

    compiled = fxopt.compile(NegNeg(), example_inputs=(torch.randn(4, 6),), passes=["canonicalize", Idle()],
                             verify=True)
    idle = compiled.report()[1]
    assert not idle.approximate and idle.tolerance == 1e-4 and idle.reference == "eager"
