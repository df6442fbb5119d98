"""Human-readable dumps of fxopt graphs, one set of files per compiler step.

When the user passes ``dump_dir``, the pass manager calls :class:`GraphDumper`
after capture (step 0, ``"capture"``) and after every pass.  Each step writes::

    00_capture.txt      the graph, one node per line (see format_graph)
    00_capture.diff     unified diff against the previous step's .txt
    00_capture.json     networkx node-link data (see graph_to_json)
    index.html          rewritten every step: a browsable overview of all steps
    index.json          the same overview, machine readable

A graph line looks like::

    %linear = call_function aten.linear.default(%x, %model.layers.0.mlp.up_proj.weight)  :: [s0, s1, 128] float32  # model.layers.0.mlp

The text contains no object ids or addresses, so two dumps of the same graph
are byte-identical and the diff between two passes shows only what the pass
changed.  Nothing in the formatting functions raises on unusual ``meta``:
anything that cannot be described is printed as ``?``.

The module reads top to bottom:

1. small value formatters (shapes, dtypes, args, targets, module paths),
2. ``format_node`` / ``format_graph``       (text listing),
3. ``graph_to_json``                         (networkx node-link data),
4. ``GraphDumper``                           (files + index.html).
"""

from __future__ import annotations

import difflib
import html
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx

__all__ = [
    "format_node",
    "format_graph",
    "graph_to_json",
    "GraphDumper",
    "sanitize_name",
]

UNKNOWN = "?"

# Addresses such as "<function f at 0x7f...>" would make every dump differ.
_ADDRESS_RE = re.compile(r"\s+at\s+0x[0-9a-fA-F]+")


# ---------------------------------------------------------------------------
# 1. Small formatters.  Every one of them returns a str and never raises.
# ---------------------------------------------------------------------------


def _safe_repr(x: Any) -> str:
    """``repr(x)`` on one line, without memory addresses; ``?`` if repr fails.

    >>> _safe_repr("a\\nb")
    "'a\\\\nb'"
    """
    try:
        text = repr(x)
    except Exception:
        return UNKNOWN
    text = _ADDRESS_RE.sub("", text)
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _format_dim(d: Any) -> str:
    """One dimension: ``128`` or a symbol / expression such as ``s44``, ``2*s0``."""
    try:
        return str(d)
    except Exception:
        return UNKNOWN


def _format_dtype(dtype: Any) -> str:
    """``torch.float32`` -> ``float32``."""
    if dtype is None:
        return UNKNOWN
    text = str(dtype)
    return text[len("torch."):] if text.startswith("torch.") else text


def _shape_list(shape: Any) -> list[int | str] | None:
    """A JSON-friendly shape: ints stay ints, symbolic dims become strings.

    >>> _shape_list(torch.Size([2, 3]))
    [2, 3]
    """
    try:
        out: list[int | str] = []
        for d in shape:
            out.append(d if type(d) is int else _format_dim(d))
        return out
    except Exception:
        return None


def _is_tensor_like(v: Any) -> bool:
    """A real/fake tensor, or a ShapeProp ``TensorMetadata`` (has shape+dtype)."""
    if isinstance(v, torch.Tensor):
        return True
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, type)


def _format_tensor_type(v: Any) -> str:
    """``[s0, 128] float32`` for a tensor (fake or real) or TensorMetadata."""
    try:
        dims = _shape_list(v.shape)
        shape = UNKNOWN if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"
    except Exception:
        shape = UNKNOWN
    try:
        dtype = _format_dtype(v.dtype)
    except Exception:
        dtype = UNKNOWN
    return f"{shape} {dtype}"


def _format_val(v: Any) -> str:
    """Describe a ``meta['val']``-like value.

    >>> _format_val(torch.empty(2, 3))
    '[2, 3] float32'
    >>> _format_val((torch.empty(2), None, 3))
    '([2] float32, None, int 3)'
    """
    try:
        if v is None:
            return "None"
        if _is_tensor_like(v):
            return _format_tensor_type(v)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return f"{type(v).__name__} {_format_dim(v)}"
        if isinstance(v, bool):
            return f"bool {v}"
        if isinstance(v, (int, float, complex)):
            return f"{type(v).__name__} {v!r}"
        if isinstance(v, (list, tuple)):
            inner = ", ".join(_format_val(x) for x in v)
            if isinstance(v, list):
                return f"[{inner}]"
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {_format_val(x)}" for k, x in v.items()) + "}"
        return type(v).__name__
    except Exception:
        return UNKNOWN


def _format_arg(a: Any) -> str:
    """Render a node argument.

    Nodes become ``%name``; a ``get_attr`` node becomes ``%<its target>`` so a
    weight reads as ``%model.layers.0.mlp.up_proj.weight``.  Lists, tuples
    and dicts are rendered recursively; constants with ``repr``.

    >>> _format_arg([1, (2,), "a"])
    "[1, (2,), 'a']"
    """
    try:
        if isinstance(a, torch.fx.Node):
            if a.op == "get_attr" and isinstance(a.target, str):
                return f"%{a.target}"
            return f"%{a.name}"
        if isinstance(a, list):
            return "[" + ", ".join(_format_arg(x) for x in a) + "]"
        if isinstance(a, tuple):
            inner = ", ".join(_format_arg(x) for x in a)
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{_format_arg(k)}: {_format_arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({_format_arg(a.start)}, {_format_arg(a.stop)}, {_format_arg(a.step)})"
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return _format_dim(a)
        if isinstance(a, (torch.dtype, torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, torch.Tensor):
            return f"tensor({_format_tensor_type(a)})"
        return _safe_repr(a)
    except Exception:
        return UNKNOWN


def _format_target(node: torch.fx.Node) -> str:
    """Readable, stable name of ``node.target``.

    ``aten.linear.default`` for ATen overloads, ``higher_order.cond`` for
    higher-order ops, ``operator.getitem`` / ``torch.relu`` for Python
    callables, and the plain string for placeholder/get_attr/call_method/...
    """
    target = node.target
    try:
        if isinstance(target, str):
            return target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(target)
        if isinstance(target, torch._ops.HigherOrderOperator):
            return f"higher_order.{target.name()}"
        try:
            from torch.fx.node import _get_qualified_name

            name = _get_qualified_name(target)
        except Exception:
            module = getattr(target, "__module__", None) or ""
            qual = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
            name = f"{module}.{qual}" if qual else _safe_repr(target)
        if name.startswith("_operator."):
            name = name[1:]
        return _ADDRESS_RE.sub("", name)
    except Exception:
        return UNKNOWN


def _module_path(node: torch.fx.Node) -> str:
    """Innermost ``nn_module_stack`` path, e.g. ``model.layers.0.mlp`` ('' if none).

    Values are ``(path, class_name)`` tuples in current torch; older versions
    stored plain strings, which are accepted too.
    """
    try:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, (tuple, list)) else last
        return "" if path is None else str(path)
    except Exception:
        return ""


def _annotations(node: torch.fx.Node) -> dict[str, str]:
    """``node.meta['fxopt']`` as sorted ``{str: str}``; ``{}`` when absent/not a dict."""
    try:
        ann = node.meta.get("fxopt")
        if not isinstance(ann, dict):
            return {}
        out = {}
        for k, v in ann.items():
            out[str(k)] = v if isinstance(v, str) else _format_arg(v)
        return dict(sorted(out.items()))
    except Exception:
        return {}


def _lookup_attr(node: torch.fx.Node) -> Any:
    """The object a ``get_attr`` node points at on its owning module, or None."""
    try:
        obj = node.graph.owning_module
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    except Exception:
        return None


_MISSING = object()


def _node_val(node: torch.fx.Node) -> Any:
    """Best description source for a node's output.

    ``meta['val']``, else ShapeProp's ``meta['tensor_meta']``, else (for
    ``get_attr``) the real attribute on the GraphModule; ``_MISSING`` if none.
    """
    try:
        meta = node.meta
        if "val" in meta:
            return meta["val"]
        if meta.get("tensor_meta") is not None:
            return meta["tensor_meta"]
        if node.op == "get_attr":
            attr = _lookup_attr(node)
            if attr is not None:
                return attr
    except Exception:
        pass
    return _MISSING


def _node_type(node: torch.fx.Node) -> str:
    """``[s0, 128] float32``-style type string for a node, ``?`` if unknown."""
    v = _node_val(node)
    return UNKNOWN if v is _MISSING else _format_val(v)


def _node_shape_dtype(node: torch.fx.Node) -> tuple[Any, Any]:
    """JSON-friendly (shape, dtype) for a node.

    Tensor -> (``[2, "s0"]``, ``"float32"``); tuple of tensors -> lists of
    those; SymInt/scalars -> (None, ``"SymInt"``/``"int"``); unknown -> (None, None).
    """

    def one(v: Any) -> tuple[Any, Any]:
        if _is_tensor_like(v):
            try:
                return _shape_list(v.shape), _format_dtype(v.dtype)
            except Exception:
                return None, None
        if isinstance(v, (list, tuple)):
            parts = [one(x) for x in v]
            return [p[0] for p in parts], [p[1] for p in parts]
        if v is None or v is _MISSING:
            return None, None
        return None, type(v).__name__

    try:
        return one(_node_val(node))
    except Exception:
        return None, None


# ---------------------------------------------------------------------------
# 2. Text listing.
# ---------------------------------------------------------------------------


def format_node(node: torch.fx.Node) -> str:
    """One line describing ``node``; never raises.

    Layout: ``%name = op target(args, kwargs)  :: type  # module.path  {k=v}``

    >>> print(format_node(linear_node))  # doctest: +SKIP
    %linear = call_function aten.linear.default(%x, %lin.weight, %lin.bias)  :: [s77, 16] float32  # lin

    * placeholders / get_attr have no argument list:
      ``%lin_weight = get_attr lin.weight  :: [16, 8] float32``
    * the output node: ``%output = output output((%relu,))  :: ?``
    * ``meta['fxopt']`` annotations are appended sorted by key:
      ``... # model.layers.0.mlp  {pattern=rmsnorm, shard=col(0)}``
    """
    try:
        name = getattr(node, "name", UNKNOWN)
        op = getattr(node, "op", UNKNOWN)
        head = f"%{name} = {op} {_format_target(node)}"
        args = tuple(getattr(node, "args", ()) or ())
        kwargs = dict(getattr(node, "kwargs", {}) or {})
        if args or kwargs or op not in ("placeholder", "get_attr"):
            parts = [_format_arg(a) for a in args]
            parts += [f"{k}={_format_arg(v)}" for k, v in kwargs.items()]
            head += "(" + ", ".join(parts) + ")"
        line = f"{head}  :: {_node_type(node)}"
        module = _module_path(node)
        if module:
            line += f"  # {module}"
        ann = _annotations(node)
        if ann:
            line += "  {" + ", ".join(f"{k}={v}" for k, v in ann.items()) + "}"
        # Guarantee the one-node-one-line contract whatever the reprs contained.
        return line.replace("\r", "\\r").replace("\n", "\\n")
    except Exception:
        return f"%{getattr(node, 'name', UNKNOWN)} = {UNKNOWN}"


def _graph_of(gm: Any) -> torch.fx.Graph:
    """Accept a GraphModule (anything with ``.graph``) or a bare Graph."""
    return gm if isinstance(gm, torch.fx.Graph) else gm.graph


def format_graph(gm: Any) -> str:
    """The whole graph, exactly one line per node, in graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> print(format_graph(gm), end="")
    %input_1 = placeholder input  :: ?
    %relu = call_function torch.nn.functional.relu(%input_1, inplace=False)  :: ?
    %output = output output(%relu)  :: ?
    """
    lines = [format_node(n) for n in _graph_of(gm).nodes]
    return "\n".join(lines) + ("\n" if lines else "")


# ---------------------------------------------------------------------------
# 3. JSON (networkx node-link data).
# ---------------------------------------------------------------------------


def _input_positions(node: torch.fx.Node) -> dict[str, list[int | str]]:
    """Map input node name -> argument positions in ``node`` where it is used.

    Positional args give their index (a node nested in a list at args[1]
    still reports 1); kwargs give their keyword name.
    """
    found: dict[str, list[int | str]] = {}

    def visit(a: Any, pos: int | str) -> None:
        torch.fx.node.map_arg(a, lambda n: found.setdefault(n.name, []).append(pos))

    for i, a in enumerate(node.args):
        visit(a, i)
    for k, a in node.kwargs.items():
        visit(a, str(k))
    return found


def build_nx_graph(gm: Any) -> nx.DiGraph:
    """A ``networkx.DiGraph`` mirroring the fx graph (node key = fx node name).

    Node attributes: ``index, op, target, shape, dtype, type, module,
    annotations, text``.  Edge ``u -> v`` means v uses u; attributes ``arg``
    (first argument position, int or kwarg name) and ``args`` (all positions).
    """
    graph = _graph_of(gm)
    G = nx.DiGraph()
    for i, n in enumerate(graph.nodes):
        shape, dtype = _node_shape_dtype(n)
        G.add_node(
            n.name,
            index=i,
            op=str(n.op),
            target=_format_target(n),
            shape=shape,
            dtype=dtype,
            type=_node_type(n),
            module=_module_path(n),
            annotations=_annotations(n),
            text=format_node(n),
        )
    for n in graph.nodes:
        for src, positions in _input_positions(n).items():
            G.add_edge(src, n.name, arg=positions[0], args=positions)
    return G


def _jsonable(x: Any) -> Any:
    """Recursively convert to str/int/float/bool/None/list/dict of those."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    return _safe_repr(x)


def graph_to_json(gm: Any) -> dict:
    """``networkx.node_link_data`` of :func:`build_nx_graph`, json.dump-able.

    Edges are always stored under the key ``"links"``, whatever the installed
    networkx version defaults to.  Read back with::

        nx.node_link_graph(data, edges="links")   # networkx >= 3.4
        nx.node_link_graph(data)                  # older networkx

    >>> data = graph_to_json(torch.fx.symbolic_trace(torch.nn.ReLU()))
    >>> [n["id"] for n in data["nodes"]], len(data["links"])
    (['input_1', 'relu', 'output'], 2)
    """
    G = build_nx_graph(gm)
    try:
        data = nx.node_link_data(G, edges="links")
    except TypeError:  # networkx < 3.4: no `edges` keyword, key is "links"
        data = nx.node_link_data(G)
    return _jsonable(data)


# ---------------------------------------------------------------------------
# 4. GraphDumper: files per step plus index.html.
# ---------------------------------------------------------------------------


def sanitize_name(name: Any) -> str:
    """A filename-safe version of a pass name.

    >>> sanitize_name("fuse rmsnorm / v2")
    'fuse_rmsnorm_v2'
    """
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return text[:80] or "step"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; font-size: 0.9em; }
th { background: #f0f0f0; }
tr.unchanged td { color: #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.yes { color: #1a7f37; font-weight: bold; }
.no { color: #888; }
.warn { color: #b35900; }
details { margin: 0.4em 0; border: 1px solid #ddd; border-radius: 4px; }
summary { cursor: pointer; padding: 4px 8px; background: #f7f7f7; }
pre.diff { margin: 0; padding: 6px 8px; overflow-x: auto; font-size: 0.8em; line-height: 1.35; }
pre.diff span { display: block; white-space: pre; }
.add { background: #e6ffec; color: #116329; }
.del { background: #ffebe9; color: #82071e; }
.hunk { color: #0550ae; background: #ddf4ff; }
.hdr { color: #555; font-weight: bold; }
.meta { color: #555; font-size: 0.85em; padding: 2px 8px; }
code { font-size: 0.9em; }
"""

# Diffs longer than this are truncated inline (the .diff file is complete).
_MAX_INLINE_DIFF_LINES = 3000


class GraphDumper:
    """Write a text/diff/json dump of the graph after each compiler step.

    Example::

        dumper = GraphDumper("dumps")
        dumper.dump(0, "capture", gm)
        run_my_pass(gm)
        dumper.dump(1, "fuse_rmsnorm", gm, changed=True,
                    stats={"matched": 32}, seconds=0.12, note="32 layers")
        dumper.files   # [.../00_capture.txt, .../00_capture.diff, ..., .../index.html]

    Files for step ``N`` and pass ``name``: ``NN_<name>.txt``,
    ``NN_<name>.diff`` (against the previously dumped step), ``NN_<name>.json``;
    ``index.html`` and ``index.json`` are rewritten after every step.
    Dumping the same step number and name twice replaces that step's entry.
    """

    def __init__(self, dump_dir: str | os.PathLike) -> None:
        self.dump_dir = Path(dump_dir)
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict[str, Any]] = []  # one record per dumped step, in order
        self._files: list[Path] = []
        self._prev_text: str | None = None
        self._prev_stem: str | None = None

    # -- public -------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        """Every file written so far (each path once, in first-written order)."""
        return list(self._files)

    @property
    def index_path(self) -> Path:
        return self.dump_dir / "index.html"

    def dump(
        self,
        step: int,
        name: str,
        gm: Any,
        *,
        changed: bool = True,
        stats: dict | None = None,
        seconds: float | None = None,
        note: str | None = None,
    ) -> None:
        """Write ``NN_<name>.{txt,diff,json}`` for this step and refresh the index."""
        stem = f"{int(step):02d}_{sanitize_name(name)}"
        text = format_graph(gm)

        diff_lines, added, removed = self._diff(stem, text)
        diff_text = "\n".join(diff_lines) + "\n"

        txt_path = self._write(f"{stem}.txt", text)
        diff_path = self._write(f"{stem}.diff", diff_text)
        json_path = self._write(
            f"{stem}.json", json.dumps(graph_to_json(gm), indent=1) + "\n"
        )

        record = {
            "step": int(step),
            "name": str(name),
            "stem": stem,
            "changed": bool(changed),
            "text_changed": self._prev_text is not None and added + removed > 0,
            "first": self._prev_text is None,
            "nodes": len(_graph_of(gm).nodes),
            "added": added,
            "removed": removed,
            "seconds": seconds,
            "stats": dict(stats) if stats else {},
            "note": note,
            "txt": txt_path.name,
            "diff": diff_path.name,
            "json": json_path.name,
            "diff_lines": diff_lines,
        }
        self.steps = [s for s in self.steps if s["stem"] != stem] + [record]
        self._prev_text, self._prev_stem = text, stem

        self._write("index.json", json.dumps(self._manifest(), indent=1, default=str) + "\n")
        self._write("index.html", self._render_index())

    # -- helpers ------------------------------------------------------------

    def _write(self, filename: str, content: str) -> Path:
        path = self.dump_dir / filename
        path.write_text(content, encoding="utf-8")
        if path not in self._files:
            self._files.append(path)
        return path

    def _diff(self, stem: str, text: str) -> tuple[list[str], int, int]:
        """Unified diff lines against the previous step, plus (+, -) line counts."""
        if self._prev_text is None:
            return [f"# {stem}: first step, nothing to diff against"], 0, 0
        lines = list(
            difflib.unified_diff(
                self._prev_text.splitlines(),
                text.splitlines(),
                fromfile=f"{self._prev_stem}.txt",
                tofile=f"{stem}.txt",
                lineterm="",
            )
        )
        if not lines:
            return [f"# no change between {self._prev_stem} and {stem}"], 0, 0
        added = sum(1 for l in lines if l.startswith("+") and not l.startswith("+++"))
        removed = sum(1 for l in lines if l.startswith("-") and not l.startswith("---"))
        return lines, added, removed

    def _manifest(self) -> dict:
        steps = [{k: v for k, v in s.items() if k != "diff_lines"} for s in self.steps]
        return {"dump_dir": str(self.dump_dir), "steps": _jsonable(steps)}

    # -- index.html ---------------------------------------------------------

    def _render_index(self) -> str:
        esc = html.escape
        total = sum(s["seconds"] or 0.0 for s in self.steps)
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>fxopt graph dump</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            "<h1>fxopt graph dump</h1>",
            f'<p class="meta">{len(self.steps)} steps, {total:.3f} s in passes. '
            "Each step links its graph listing (.txt), diff against the previous "
            "step (.diff) and networkx node-link JSON (.json).</p>",
            "<table>",
            "<tr><th>#</th><th>pass</th><th>changed</th><th>nodes</th><th>diff</th>"
            "<th>seconds</th><th>stats</th><th>note</th><th>files</th></tr>",
        ]
        prev_nodes = None
        for s in self.steps:
            delta = "" if prev_nodes is None else f" ({s['nodes'] - prev_nodes:+d})"
            prev_nodes = s["nodes"]
            out.append(
                f'<tr class="{"changed" if s["changed"] else "unchanged"}">'
                f'<td class="num">{s["step"]}</td>'
                f'<td><a href="#{esc(s["stem"])}">{esc(s["name"])}</a></td>'
                f"<td>{self._changed_cell(s)}</td>"
                f'<td class="num">{s["nodes"]}{delta}</td>'
                f'<td class="num">{self._diffstat(s)}</td>'
                f'<td class="num">{self._seconds(s)}</td>'
                f"<td>{self._stats_html(s['stats'])}</td>"
                f"<td>{esc(s['note'] or '')}</td>"
                f"<td>{self._links(s)}</td></tr>"
            )
        out.append("</table>")
        out.append("<h2>Diffs</h2>")
        for s in self.steps:
            out.append(self._step_section(s))
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    @staticmethod
    def _changed_cell(s: dict) -> str:
        cell = '<span class="yes">yes</span>' if s["changed"] else '<span class="no">no</span>'
        if not s["first"] and s["changed"] != s["text_changed"]:
            what = "text changed" if s["text_changed"] else "text unchanged"
            cell += f' <span class="warn" title="pass report disagrees with the listing">({what})</span>'
        return cell

    @staticmethod
    def _diffstat(s: dict) -> str:
        if s["first"]:
            return "&ndash;"
        return f'<span class="add">+{s["added"]}</span> <span class="del">-{s["removed"]}</span>'

    @staticmethod
    def _seconds(s: dict) -> str:
        sec = s["seconds"]
        return "" if sec is None else html.escape(f"{sec:.3f}" if isinstance(sec, (int, float)) else str(sec))

    @staticmethod
    def _stats_html(stats: dict) -> str:
        return "<br>".join(
            f"<code>{html.escape(str(k))}={html.escape(str(v))}</code>" for k, v in stats.items()
        )

    @staticmethod
    def _links(s: dict) -> str:
        from urllib.parse import quote

        return " ".join(
            f'<a href="{html.escape(quote(s[kind]))}">{kind}</a>' for kind in ("txt", "diff", "json")
        )

    def _step_section(self, s: dict) -> str:
        esc = html.escape
        lines = s["diff_lines"]
        shown = lines[:_MAX_INLINE_DIFF_LINES]
        body = []
        for line in shown:
            if line.startswith(("+++", "---")):
                cls = "hdr"
            elif line.startswith("@@"):
                cls = "hunk"
            elif line.startswith("+"):
                cls = "add"
            elif line.startswith("-"):
                cls = "del"
            else:
                cls = "ctx"
            body.append(f'<span class="{cls}">{esc(line) or " "}</span>')
        if len(lines) > len(shown):
            body.append(
                f'<span class="hdr">... {len(lines) - len(shown)} more lines, '
                f'see {esc(s["diff"])}</span>'
            )
        is_open = " open" if s["text_changed"] and len(lines) <= 400 else ""
        status = "changed" if s["changed"] else "unchanged"
        summary = (
            f'{s["step"]:02d} {esc(s["name"])} &mdash; {status}, {s["nodes"]} nodes, '
            f"{self._diffstat(s)}"
        )
        return (
            f'<details id="{esc(s["stem"])}"{is_open}><summary>{summary}</summary>'
            f'<div class="meta">{self._links(s)}'
            + (f" &middot; {esc(s['note'])}" if s["note"] else "")
            + "</div>"
            f'<pre class="diff">{"".join(body)}</pre></details>'
        )
