"""Tests for fxopt.dump: text listing, JSON export and the per-step dumper."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx

from fxopt.dump import GraphDumper, format_graph, format_node, graph_to_json, sanitize_name


# ---------------------------------------------------------------------------
# fixtures / helpers
# ---------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 16)

    def forward(self, x):
        return torch.relu(self.lin(x))


class WithParam(torch.nn.Module):
    """symbolic_trace turns ``self.w`` into a get_attr node (no meta at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return torch.relu(x @ self.w) + x.size(0)


def exported_gm() -> torch.fx.GraphModule:
    ep = torch.export.export(
        Tiny(), (torch.randn(4, 8),), dynamic_shapes={"x": {0: torch.export.Dim.AUTO}}
    )
    return ep.module()


def traced_gm() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(WithParam())


def node_named(gm, name) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def line_of(text: str, name: str) -> str:
    return next(l for l in text.splitlines() if l.startswith(f"%{name} = "))


def swap_relu_for_sigmoid(gm: torch.fx.GraphModule) -> None:
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        sig = gm.graph.call_function(torch.ops.aten.sigmoid.default, relu.args)
    sig.meta = dict(relu.meta)
    relu.replace_all_uses_with(sig)
    gm.graph.erase_node(relu)
    gm.recompile()


def read_json_graph(data: dict) -> nx.DiGraph:
    try:
        return nx.node_link_graph(data, directed=True, multigraph=False, edges="links")
    except TypeError:  # networkx < 3.4
        return nx.node_link_graph(data, directed=True, multigraph=False)


class LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k == "href" and v:
                self.hrefs.append(v)
            if k == "src" and v:
                self.srcs.append(v)


# ---------------------------------------------------------------------------
# format_node / format_graph
# ---------------------------------------------------------------------------


def test_one_line_per_node_exported():
    gm = exported_gm()
    text = format_graph(gm)
    lines = text.splitlines()
    nodes = list(gm.graph.nodes)
    assert len(lines) == len(nodes)
    for line, node in zip(lines, nodes):
        assert line.startswith(f"%{node.name} = {node.op} ")
        assert line == format_node(node)


def test_shapes_dtypes_modules_exported():
    gm = exported_gm()
    text = format_graph(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    batch = str(x.meta["val"].shape[0])
    assert re.fullmatch(r"s\d+", batch), batch  # really symbolic

    assert line_of(text, x.name).endswith(f":: [{batch}, 8] float32")
    linear = line_of(text, "linear")
    assert "aten.linear.default(" in linear
    assert f":: [{batch}, 16] float32" in linear
    assert "# lin" in linear
    # weights are referenced by their parameter name, and their own line has shape
    assert "%lin.weight" in linear and "%lin.bias" in linear
    w_line = next(l for l in text.splitlines() if " get_attr lin.weight" in l)
    assert w_line.endswith(":: [16, 8] float32")
    assert "output output((%relu,))" in text


def test_plain_symbolic_trace_no_meta():
    gm = traced_gm()
    text = format_graph(gm)
    lines = text.splitlines()
    assert len(lines) == len(gm.graph.nodes)
    # no meta['val'] anywhere: unknown types print '?'
    assert ":: ?" in line_of(text, "relu")
    # get_attr without meta falls back to the actual parameter on gm
    w = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert "val" not in w.meta
    assert line_of(text, w.name).endswith(":: [8, 4] float32")
    assert "call_method size(%x, 0)" in text


def test_shape_prop_tensor_meta_is_used():
    from torch.fx.passes.shape_prop import ShapeProp

    gm = traced_gm()
    ShapeProp(gm).propagate(torch.randn(3, 8))
    text = format_graph(gm)
    assert line_of(text, "relu").endswith(":: [3, 4] float32")


def test_annotations_appended_sorted():
    gm = exported_gm()
    lin = node_named(gm, "linear")
    lin.meta["fxopt"] = {"shard": "col(0)", "pattern": "rmsnorm", "src": lin}
    line = format_node(lin)
    assert line.endswith("# lin  {pattern=rmsnorm, shard=col(0), src=%linear}")


def test_deterministic_and_address_free():
    class Weird:
        def __repr__(self):
            return object.__repr__(self)  # contains "at 0x..."

    gm = traced_gm()
    relu = node_named(gm, "relu")
    relu.meta["fxopt"] = {"obj": Weird()}
    assert format_graph(gm) == format_graph(gm)
    assert "0x" not in format_graph(gm)
    assert format_graph(exported_gm()) == format_graph(exported_gm())


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")

    def __str__(self):
        raise RuntimeError("no str either")


class _BadShape:
    dtype = torch.float32

    @property
    def shape(self):
        raise RuntimeError("boom")


ODD_METAS = [
    {},
    {"val": None},
    {"val": 3},
    {"val": 2.5},
    {"val": True},
    {"val": "a string"},
    {"val": object()},
    {"val": (torch.empty(2, 3), None, 4)},
    {"val": [torch.empty(1), [torch.empty(2, dtype=torch.int64)]]},
    {"val": {"a": torch.empty(1)}},
    {"val": _BadRepr()},
    {"val": _BadShape()},
    {"val": torch.empty(0)},
    {"tensor_meta": None},
    {"tensor_meta": "garbage"},
    {"nn_module_stack": None},
    {"nn_module_stack": {}},
    {"nn_module_stack": {"a": "just_a_string"}},
    {"nn_module_stack": {"a": (None, None)}},
    {"nn_module_stack": "not a dict"},
    {"fxopt": None},
    {"fxopt": "not a dict"},
    {"fxopt": {1: _BadRepr(), "x": [1, (2,)], "t": torch.empty(2)}},
]


@pytest.mark.parametrize("meta", ODD_METAS, ids=range(len(ODD_METAS)))
def test_odd_meta_never_raises(meta, tmp_path):
    gm = exported_gm()
    for node in gm.graph.nodes:
        node.meta = dict(meta)
    # an argument whose repr/str raise, and a nested-structure argument
    lin = node_named(gm, "linear")
    lin.kwargs = {"weird": _BadRepr(), "nested": [(1, 2.0), {"k": slice(None, 3)}]}
    text = format_graph(gm)
    assert len(text.splitlines()) == len(gm.graph.nodes)
    json.dumps(graph_to_json(gm))
    d = GraphDumper(tmp_path)
    d.dump(0, "capture", gm)
    d.dump(1, "again", gm, stats={"odd": _BadRepr.__name__}, note=None)


def test_newlines_in_args_stay_on_one_line():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.add, (x, "two\nlines"))
    g.output(y)
    text = format_graph(g)  # a bare Graph is accepted too
    assert len(text.splitlines()) == 3


# ---------------------------------------------------------------------------
# graph_to_json
# ---------------------------------------------------------------------------


def _expected_edges(gm):
    return {(inp.name, n.name) for n in gm.graph.nodes for inp in n.all_input_nodes}


@pytest.mark.parametrize("make", [exported_gm, traced_gm])
def test_json_roundtrip(make):
    gm = make()
    data = graph_to_json(gm)
    data = json.loads(json.dumps(data))  # really json-able
    G = read_json_graph(data)
    assert isinstance(G, nx.DiGraph)
    assert G.number_of_nodes() == len(gm.graph.nodes)
    assert set(G.nodes) == {n.name for n in gm.graph.nodes}
    assert set(G.edges) == _expected_edges(gm)
    assert G.number_of_edges() == len(_expected_edges(gm))
    assert nx.is_directed_acyclic_graph(G)


def test_json_attributes():
    gm = exported_gm()
    G = read_json_graph(graph_to_json(gm))
    lin = G.nodes["linear"]
    assert lin["op"] == "call_function"
    assert lin["target"] == "aten.linear.default"
    assert lin["dtype"] == "float32"
    assert isinstance(lin["shape"][0], str) and lin["shape"][1] == 16
    assert lin["module"] == "lin"
    assert G.nodes["lin_weight"]["shape"] == [16, 8]
    # edge attribute: argument index of the input in its user
    assert G.edges["x", "linear"]["arg"] == 0
    assert G.edges["lin_weight", "linear"]["arg"] == 1
    assert G.edges["lin_bias", "linear"]["arg"] == 2


def test_json_repeated_input_and_annotations():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.add, (x, x), {"alpha": x})
    y.meta["fxopt"] = {"pattern": "double"}
    g.output(y)
    G = read_json_graph(json.loads(json.dumps(graph_to_json(g))))
    assert G.number_of_edges() == 2
    assert G.edges["x", "add"]["args"] == [0, 1, "alpha"]
    assert G.nodes["add"]["annotations"] == {"pattern": "double"}


# ---------------------------------------------------------------------------
# GraphDumper
# ---------------------------------------------------------------------------


def test_dumper_files_diff_and_index(tmp_path):
    out = tmp_path / "nested" / "dump"
    d = GraphDumper(str(out))  # str accepted, parents created
    assert out.is_dir()

    gm = exported_gm()
    d.dump(0, "capture", gm, seconds=0.5)
    swap_relu_for_sigmoid(gm)
    d.dump(1, "swap relu/sigmoid <x>", gm, changed=True, stats={"replaced": 1},
           seconds=0.0123, note="note with <b>html</b> & stuff")
    d.dump(2, "noop", gm, changed=False, seconds=0.001)

    s1 = "01_" + sanitize_name("swap relu/sigmoid <x>")
    assert "/" not in s1 and "<" not in s1
    for stem in ("00_capture", s1, "02_noop"):
        for ext in ("txt", "diff", "json"):
            assert (out / f"{stem}.{ext}").is_file(), (stem, ext)
    assert (out / "index.html").is_file()

    # text file equals format_graph
    assert (out / "02_noop.txt").read_text() == format_graph(gm)

    # diffs
    assert "first step" in (out / "00_capture.diff").read_text()
    diff1 = (out / f"{s1}.diff").read_text()
    assert "--- 00_capture.txt" in diff1 and f"+++ {s1}.txt" in diff1
    minus = [l for l in diff1.splitlines() if l.startswith("-") and not l.startswith("---")]
    plus = [l for l in diff1.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert any(l.startswith("-%relu = call_function aten.relu.default") for l in minus)
    assert any(l.startswith("+%sigmoid_default = call_function aten.sigmoid.default") for l in plus)
    diff2 = (out / "02_noop.diff").read_text()
    assert not any(l.startswith(("+", "-")) for l in diff2.splitlines())

    # json file round-trips
    G = read_json_graph(json.loads((out / f"{s1}.json").read_text()))
    assert "sigmoid_default" in G and "relu" not in G

    # index.html: self-contained, links every step's files, all links resolve
    page = (out / "index.html").read_text()
    p = LinkParser()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags
    assert p.srcs == []
    assert "<style>" in page
    files = [h for h in p.hrefs if not h.startswith("#")]
    for stem in ("00_capture", s1, "02_noop"):
        for ext in ("txt", "diff", "json"):
            assert f"{stem}.{ext}" in files
    for h in files:
        assert "://" not in h
        assert (out / h).is_file(), h
    for h in p.hrefs:
        if h.startswith("#"):
            assert f'id="{h[1:]}"' in page
    # browsable diff: collapsible, colored, escaped
    assert page.count("<details") == 3
    assert '<span class="add">+%sigmoid' in page
    assert '<span class="del">-%relu' in page
    assert "note with &lt;b&gt;html&lt;/b&gt; &amp; stuff" in page
    assert "<b>html</b>" not in page
    assert "replaced=1" in page
    assert "0.012" in page
    # steps in order
    assert page.index("00 capture") < page.index("01 swap") < page.index("02 noop")

    # files listing
    assert all(f.is_file() for f in d.files)
    assert {f.name for f in d.files} >= {"index.html", f"{s1}.diff", "00_capture.json"}
    assert len(d.files) == len(set(d.files))


def test_dumper_html_escapes_diff_lines(tmp_path):
    gm = exported_gm()
    d = GraphDumper(tmp_path)
    d.dump(0, "capture", gm)
    node_named(gm, "linear").meta["fxopt"] = {"tag": "<script>alert(1)</script>"}
    d.dump(1, "annotate", gm)
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page
    assert "tag=&lt;script&gt;" in page


def test_dumper_same_step_replaces_entry(tmp_path):
    gm = exported_gm()
    d = GraphDumper(tmp_path)
    d.dump(0, "capture", gm)
    d.dump(1, "p", gm)
    d.dump(1, "p", gm)
    assert [s["stem"] for s in d.steps] == ["00_capture", "01_p"]
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["capture", "p"]


def test_sanitize_name():
    assert sanitize_name("a b/c") == "a_b_c"
    assert sanitize_name("../..") == "step"
    assert sanitize_name("") == "step"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", sanitize_name("ünïcode ✓ pass"))
