"""Capture traces three layers of a stack of like layers and copies the third for the rest
(fxopt.repeated_layers): the graph must be the one a whole trace gives, node for node, and any
stack whose layers differ must be traced whole, saying why."""
import pytest
import torch
import torch.nn as nn
import transformers as T

import fxopt
from families import ALL, VOCAB, main_output, tiny
from fxopt.checkpoint import compile_from_checkpoint
from fxopt.ir import module_path


def qwen2(layers=5, **extra):
    torch.manual_seed(0)
    cfg = T.Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=6,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2,
                        **extra)
    return T.Qwen2ForCausalLM(cfg).eval()


def nodes(gm):
    """Every node as what a reader of the graph sees: op, target, module path, parameter name,
    value's shape and dtype, and its inputs by position in the graph."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        spec = (str(tuple(v.shape)), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: ("node", order[a]))
        out.append((n.op, str(n.target), module_path(n), n.meta.get("param"), spec, repr(args)))
    return out


def run(gm, **inputs):
    return main_output(gm.meta["fxopt"].signature.call(gm, **inputs))


@pytest.mark.parametrize("family", ALL + ["qwen2"])
def test_copied_layers_give_the_graph_a_whole_trace_gives(family):
    model = qwen2() if family == "qwen2" else tiny(family, layers=5)
    copied = fxopt.capture(model)
    whole = fxopt.capture(model, trace_every_layer=True)
    path = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "bert": "encoder.layer"}.get(family, "model.layers")
    assert copied.meta["fxopt"].layers == f"{path}: 3 of 5 layers traced, 2 copied"
    assert whole.meta["fxopt"].layers == "every layer traced (trace_every_layer=True)"
    assert nodes(copied) == nodes(whole)
    assert {n for n, _ in copied.named_parameters()} == {n for n, _ in whole.named_parameters()}
    for batch, seq in [(1, 1), (3, 11)]:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = main_output(model(input_ids=ids))
        got = run(copied, input_ids=ids)
        assert torch.equal(got, run(whole, input_ids=ids))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the model is whole again
    assert len(model.get_submodule(path)) == 5 and model.config.num_hidden_layers == 5


def test_default_pipeline_on_copied_layers_generates_what_transformers_does():
    model = tiny("llama", layers=6)
    compiled = fxopt.compile(model, max_batch_size=3, max_seq_len=40, verify=True)
    assert "model.layers: 3 of 6 layers traced, 3 copied" in str(compiled.report())
    whole = fxopt.compile(model, max_batch_size=3, max_seq_len=40, trace_every_layer=True)
    # every pass does to the copies what it does to traced layers
    assert [(r.name, r.stats, r.nodes_after) for r in compiled.report()] == \
        [(r.name, r.stats, r.nodes_after) for r in whole.report()]
    assert next(r for r in compiled.report() if r.name == "fuse").stats["qkv_concat"] == 6
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0), want)


def test_a_checkpoint_compiled_on_the_meta_device_loads_into_copied_layers(tmp_path):
    tiny("llama", layers=5).save_pretrained(tmp_path, safe_serialization=True)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = compile_from_checkpoint(tmp_path, ["canonicalize", "kv_cache", "fuse", "dce"], dtype=torch.float32,
                                   max_batch_size=2, max_seq_len=32)
    assert ours.graph_module.meta["fxopt"].layers == "model.layers: 3 of 5 layers traced, 2 copied"
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # every layer reads its own weights: layer 4's down projection is what the file holds
    gm = ours.graph_module
    assert torch.equal(gm.get_parameter("model.layers.4.mlp.down_proj.weight"), model.model.layers[4].mlp.down_proj.weight)


# ---------------------------------------------------------------------------------------------
# Stacks whose layers differ are traced whole, and the capture says why
# ---------------------------------------------------------------------------------------------


def _assert_traced_whole(model, reason, **inputs):
    gm = fxopt.capture(model, **({"example_inputs": inputs} if inputs else {}))
    note = gm.meta["fxopt"].layers
    assert "layers traced (" in note and reason in note, note
    assert nodes(gm) == nodes(fxopt.capture(model, trace_every_layer=True, **({"example_inputs": inputs} if inputs else {})))
    return gm


def test_a_layer_built_with_another_attribute_is_traced():
    # GPT-2 scaling attention by 1 / layer index: each layer's scale differs
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=48, n_layer=5, n_head=4, vocab_size=VOCAB,
                                           scale_attn_by_inverse_layer_idx=True)).eval()
    gm = _assert_traced_whole(model, "transformer.h.3 is built unlike transformer.h.2: attn.scaling")
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(run(gm, input_ids=ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_per_layer_config_list_that_changes_is_traced():
    # full attention in layers 0-3, a sliding window above
    model = qwen2(layers=6, use_sliding_window=True, sliding_window=4, max_window_layers=4)
    _assert_traced_whole(model, "model.layers.4 is built unlike model.layers.2")


def test_hidden_states_read_outside_the_stack_are_traced():
    model = tiny("llama", layers=5)
    model.config.output_hidden_states = True
    gm = _assert_traced_whole(model, "config.output_hidden_states asks for every layer's output")
    ids = torch.randint(0, VOCAB, (2, 6))
    got = gm.meta["fxopt"].signature.call(gm, input_ids=ids)
    with torch.no_grad():
        want = model(input_ids=ids)
    assert len(got.hidden_states) == len(want.hidden_states) == 6
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self, width, index):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.layer_idx = index  # a number, not part of how the block is built...

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class IndexedBlock(Block):
    def forward(self, x):  # ...unless the block computes with it
        return x + torch.tanh(self.fc(x)) * (self.layer_idx + 1)


class Stack(nn.Module):
    def __init__(self, block=Block, widths=(16,) * 6, depth_check=False):
        super().__init__()
        self.inp = nn.Linear(16, widths[0])
        self.blocks = nn.ModuleList(block(w, i) for i, w in enumerate(widths))
        self.depth_check = depth_check

    def forward(self, x):
        if self.depth_check:
            assert len(self.blocks) == 6, "this model insists on its depth"
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_layer_with_a_hook_is_traced():
    torch.manual_seed(0)
    model = Stack().eval()
    model.blocks[4].register_forward_hook(lambda module, args, out: out * 3)
    x = torch.randn(2, 16)
    gm = _assert_traced_whole(model, "blocks.4 has forward hooks", x=x)
    torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-6, atol=1e-6)


class Collecting(Stack):
    def forward(self, x):  # every block's output read after the stack too
        x, seen = self.inp(x), []
        for block in self.blocks:
            x = block(x)
            seen.append(x)
        return torch.stack(seen).sum(0)


def test_a_layer_output_read_outside_the_stack_is_traced():
    torch.manual_seed(0)
    model = Collecting().eval()
    x = torch.randn(3, 16)
    gm = _assert_traced_whole(model, "is read outside blocks.1 too", x=x)
    torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-6, atol=1e-6)


class Rerouted(Stack):
    """Reaches its blocks under a second registered name ("alias") or through a plain Python list
    ("unregistered"): cutting ``blocks`` short does not cut what forward runs."""

    def __init__(self, route):
        super().__init__()
        if route == "alias":
            self.same_blocks = self.blocks
        else:
            self._order = list(self.blocks)
        self.route = route

    def forward(self, x):
        x = self.inp(x)
        for block in self.same_blocks if self.route == "alias" else self._order:
            x = block(x)
        return x


@pytest.mark.parametrize("route", ["alias", "unregistered"])
def test_layers_reached_another_way_are_traced(route):
    torch.manual_seed(0)
    model = Rerouted(route).eval()
    x = torch.randn(3, 16)
    gm = _assert_traced_whole(model, "the model ran layers [0, 1, 2, 3, 4, 5] of blocks", x=x)
    torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-6, atol=1e-6)
    assert not any(block._forward_pre_hooks for block in model.blocks)  # capture's own hooks are gone


def test_a_plain_module_stack_is_copied():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(5, 16)
    gm = fxopt.capture(model, (x,))
    assert gm.meta["fxopt"].layers == "blocks: 3 of 6 layers traced, 3 copied"
    assert nodes(gm) == nodes(fxopt.capture(model, (x,), trace_every_layer=True))
    y = torch.randn(7, 16)
    torch.testing.assert_close(gm(y)[0], model(y), rtol=1e-6, atol=1e-6)


def test_a_layer_computing_with_its_index_is_traced():
    # the index is no part of how a layer is built, so the layers look alike until traced: the
    # traced layers 1 and 2 differ (a multiply by 2, by 3), and the whole model is traced instead
    torch.manual_seed(0)
    model = Stack(IndexedBlock).eval()
    x = torch.randn(5, 16)
    gm = _assert_traced_whole(model, "differs from %", x=x)
    assert gm.meta["fxopt"].layers.startswith("blocks: all 6 layers traced (")
    y = torch.randn(3, 16)
    torch.testing.assert_close(gm(y)[0], model(y), rtol=1e-6, atol=1e-6)


def test_layers_built_otherwise_and_models_that_need_their_depth_are_traced():
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    odd = Stack().eval()
    odd.blocks[4].fc = nn.Linear(16, 16, bias=False)
    gm = _assert_traced_whole(odd, "blocks.4 is built unlike blocks.2: fc's parameters or buffers differ", x=x)
    torch.testing.assert_close(gm(x)[0], odd(x), rtol=1e-6, atol=1e-6)
    other = Stack().eval()
    other.blocks[5] = nn.Sequential(nn.Linear(16, 16))  # another class: no stack of like layers
    assert fxopt.capture(other, (x,)).meta["fxopt"].layers == ""
    strict = Stack(depth_check=True).eval()
    gm = _assert_traced_whole(strict, "cut to 3 layers it did not trace", x=x)
    assert len(strict.blocks) == 6
    torch.testing.assert_close(gm(x)[0], strict(x), rtol=1e-6, atol=1e-6)


def test_shallow_stacks_and_shared_layers_are_traced_as_they_are():
    assert fxopt.capture(tiny("llama", layers=3)).meta["fxopt"].layers == ""  # nothing to copy
    model = Stack().eval()
    shared = model.blocks[2]
    model.blocks = nn.ModuleList([model.blocks[0], model.blocks[1]] + [shared] * 4)
    x = torch.randn(2, 16)
    gm = fxopt.capture(model, (x,))
    assert gm.meta["fxopt"].layers == ""  # one layer object four times: not a stack of like layers
    torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-6, atol=1e-6)


def test_the_report_and_the_dumps_say_how_the_layers_were_captured(tmp_path):
    compiled = fxopt.compile(tiny("gpt2", layers=4), passes=["canonicalize", "dce"], dump_dir=tmp_path)
    first = str(compiled.report()).splitlines()[0]
    assert first.startswith("capture: ") and first.endswith("nodes; transformer.h: 3 of 4 layers traced, 1 copied")
    assert "captured GPT2LMHeadModel; transformer.h: 3 of 4 layers traced, 1 copied" in (tmp_path / "index.html").read_text()


def test_two_layers_differing_in_a_node_kind_are_not_the_same_layer():
    from fxopt.repeated_layers import _Layer, _same_layer
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w1 = graph.get_attr("blocks.1.w")
    h1 = graph.call_function(torch.ops.aten.mul.Tensor, (x, w1))
    n2 = graph.call_function(torch.ops.aten.neg.default, (h1,))  # where layer 1 has its weight
    h2 = graph.call_function(torch.ops.aten.mul.Tensor, (h1, n2))
    a = _Layer("blocks.1", [w1, h1], hidden_in=x, hidden_out=h1)
    b = _Layer("blocks.2", [n2, h2], hidden_in=h1, hidden_out=h2)
    assert _same_layer(a, b) == f"%{n2.name} (aten.neg.default) differs from %{w1.name} (get_attr)"
    assert _same_layer(a, a) is None
