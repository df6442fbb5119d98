"""On a CPU model, CompiledModel runs its graph with the fxopt ops' Python functions called
directly (fxopt/runtime/direct.py); the compiled graph itself keeps the ops."""
import torch

import fxopt
from families import VOCAB, tiny
from fxopt.runtime.direct import direct_forward, direct_graph, on_cpu


def fxopt_calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("fxopt.")]


def flat_inputs(compiled, batch=2, seq=7):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(batch, seq)
    return compiled.info.signature.flatten((), dict(input_ids=ids, position_ids=pos))


def test_direct_forward_calls_the_op_functions_and_computes_the_same_bits():
    compiled = fxopt.compile(tiny("llama"), max_batch_size=2, max_seq_len=32)
    gm = compiled.graph_module
    ops = fxopt_calls(gm.graph)
    assert {str(n.target) for n in ops} >= {"fxopt.linear.default", "fxopt.cached_attention.default"}
    graph = direct_graph(gm)
    assert not fxopt_calls(graph) and len(graph.nodes) == len(gm.graph.nodes)  # every op call became a plain call
    assert fxopt_calls(gm.graph) == ops  # the compiled graph is untouched
    flat = flat_inputs(compiled)
    with torch.no_grad():
        want = [t.clone() for t in gm(*flat)]
        got = direct_forward(gm)(*flat)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_direct_forward_reads_the_weights_of_the_module_at_each_call():
    """load_checkpoint replaces parameters: the direct forward must see the new ones."""
    compiled = fxopt.compile(tiny("llama"), max_batch_size=2, max_seq_len=32)
    gm = compiled.graph_module
    forward = direct_forward(gm)
    flat = flat_inputs(compiled)
    with torch.no_grad():
        before = forward(*flat)[0].clone()
        name, p = next((n, p) for n, p in gm.named_parameters() if n.endswith("lm_head.weight"))
        owner = gm.get_submodule(name.rsplit(".", 1)[0])
        owner._parameters["weight"] = torch.nn.Parameter(2 * p.detach(), requires_grad=False)
        torch.testing.assert_close(forward(*flat)[0], 2 * before)


def test_compiled_model_runs_the_direct_forward_on_cpu_and_follows_graph_edits():
    compiled = fxopt.compile(tiny("llama"), max_batch_size=2, max_seq_len=32)
    assert on_cpu(compiled.graph_module)
    runner = compiled._executable(compiled.graph_module)
    assert runner is not compiled.graph_module
    assert compiled._executable(compiled.graph_module) is runner  # built once
    ids = torch.randint(0, VOCAB, (1, 5))
    before = compiled(input_ids=ids).logits
    # an edit by hand: scale the logits by 2 at the output
    gm = compiled.graph_module
    out = gm.graph.output_node()
    logits = out.args[0][0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (logits, 2.0))
    out.args = ((doubled, *out.args[0][1:]),)
    gm.recompile()
    assert compiled._executable(gm) is not runner
    torch.testing.assert_close(compiled(input_ids=ids).logits, 2 * before)
