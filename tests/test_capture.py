"""fxopt.capture: the IR contract on every family, plain modules, and clear errors."""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.ir import static_dim
from families import ALL, VOCAB, main_output, tiny

aten = torch.ops.aten


@pytest.mark.parametrize("family", ALL)
def test_capture_keeps_the_ir_contract(family):
    model = tiny(family)
    gm = fxopt.capture(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert attrs, "weights must be get_attr nodes"
    for node in attrs:
        assert node.meta["param"] == node.target
        if node.target in params:
            assert tuple(params[node.target].shape) == tuple(node.meta["val"].shape)
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, f"{node.name} has no meta['val']"
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.scaled_dot_product_attention.default in targets
    assert aten.linear.default in targets or aten.addmm.default in targets  # GPT-2 Conv1D is addmm
    paths = {n.meta.get("nn_module_stack") and list(n.meta["nn_module_stack"].values())[-1][0]
             for n in gm.graph.nodes if n.op == "call_function"}
    assert any(p and ".0." in p for p in paths), "module paths of layer 0 must be kept"
    # symbolic batch and sequence: the input placeholder has non-int dims
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    assert all(static_dim(d) is None for d in ids.meta["val"].shape)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 11)])
def test_captured_graph_runs_any_batch_and_length(family, shape):
    model = tiny(family)
    gm = fxopt.capture(model)
    sig = gm.meta["fxopt"].signature
    ids = torch.randint(0, VOCAB, shape)
    got = sig.call(gm, ids)
    want = model(ids)
    assert type(got) is type(want)
    torch.testing.assert_close(main_output(got), main_output(want), rtol=1e-5, atol=1e-5)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.norm = nn.LayerNorm(24)

    def forward(self, x, scale):
        return {"y": self.norm(torch.relu(self.proj(x))) * scale, "mean": x.mean(-1)}


def test_plain_module_with_dict_output():
    model = TwoInputs().eval()
    gm = fxopt.capture(model, (torch.randn(4, 16), torch.randn(4, 1)))
    sig = gm.meta["fxopt"].signature
    for batch in (1, 7):
        x, s = torch.randn(batch, 16), torch.randn(batch, 1)
        got, want = sig.call(gm, x, scale=s), model(x, s)
        assert set(got) == {"y", "mean"}
        torch.testing.assert_close(got["y"], want["y"])
        torch.testing.assert_close(got["mean"], want["mean"])
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"][:2] == ["proj.weight", "proj.bias"]


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on values: not capturable
            return x * 2
        return x


def test_uncapturable_model_names_the_line_and_a_fix():
    with pytest.raises(fxopt.CaptureError) as e:
        fxopt.capture(DataDependent(), (torch.randn(3, 4),))
    msg = str(e.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg
    assert "torch.where" in msg or "torch.cond" in msg


def test_example_inputs_of_the_wrong_type():
    with pytest.raises(fxopt.CaptureError, match="example_inputs must be a tuple"):
        fxopt.capture(TwoInputs(), "not a tensor")
    with pytest.raises(fxopt.CaptureError, match="example input .* is a object"):
        fxopt.capture(TwoInputs(), (torch.randn(2, 16), object()))
    with pytest.raises(fxopt.CaptureError, match="do not fit forward"):
        fxopt.capture(TwoInputs(), (torch.randn(2, 16),))  # 'scale' missing


def test_example_inputs_of_the_wrong_shape():
    with pytest.raises(fxopt.CaptureError) as e:
        fxopt.capture(TwoInputs(), (torch.randn(2, 15), torch.randn(2, 1)))
    assert "could not capture TwoInputs" in str(e.value)
    assert "test_capture.py" in str(e.value)  # the line of forward that failed


def test_call_with_wrong_inputs_is_an_input_error():
    gm = fxopt.capture(TwoInputs(), (torch.randn(4, 16), torch.randn(4, 1)))
    sig = gm.meta["fxopt"].signature
    with pytest.raises(fxopt.InputError, match="'x' has size 15 in dim 1"):
        sig.call(gm, torch.randn(4, 15), torch.randn(4, 1))
    with pytest.raises(fxopt.InputError, match="dtype"):
        sig.call(gm, torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 1))
    with pytest.raises(fxopt.InputError, match="must be a tensor"):
        sig.call(gm, [1.0] * 16, torch.randn(4, 1))
    with pytest.raises(fxopt.InputError, match="3 dims"):
        sig.call(gm, torch.randn(2, 4, 16), torch.randn(4, 1))
