"""On the CPU, call the fxopt ops' own Python functions instead of going through the dispatcher.

An fxopt op (``torch.ops.fxopt.linear``, ``cached_attention``, ...) runs on the CPU the function it
was defined with, its plain-PyTorch reference, or its CPU kernel (``kernels/linear_cpu.py``).
Reaching that function through the custom-op dispatcher (torch.library's wrapper around a Python
kernel) costs about 90 µs a call on a two-core CPU: SmolLM2 makes 151 such calls a decode step, about 14 ms of a 65 ms step.

:func:`direct_graph` copies a graph with each ``torch.ops.fxopt.*`` target replaced by that
function (or CPU kernel), which is exactly what the CPU dispatch would have run::

    %linear_3 = call_function[target=torch.ops.fxopt.linear.default](args = (...))
    # becomes
    %linear_3 = call_function[target=fxopt.kernels.linear.linear](args = (...))

and :func:`direct_forward` compiles that graph into a forward bound to the original module: it
reads the weights and buffers from that module at every call, so weights loaded into it later
(``load_checkpoint`` replaces parameters) are seen. ``CompiledModel`` runs it when its weights are
on the CPU; the compiled graph itself (what the report, the dumps and ``compiled.graph`` show)
keeps the ops. On CUDA nothing changes: there the ops run their Triton kernels.
``fxopt.all_reduce`` keeps its dispatch (a collective).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.fx as fx

from ..kernels import linear_cpu

KEEP = {"fxopt::all_reduce"}


def _functions() -> dict:
    """``{OpOverload: the Python function the op runs on the CPU}`` for every fxopt op: its CPU
    kernel from ``kernels/linear_cpu.py``, else the function it was defined with (not for an op
    with some other CPU kernel registered: that one keeps the dispatcher)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # a torch without custom ops' registry: keep the dispatcher
        return {}
    out = {}
    for name, opdef in OPDEFS.items():
        namespace, _, op = name.partition("::")
        if namespace != "fxopt" or name in KEEP:
            continue
        overload = getattr(torch.ops.fxopt, op).default
        fn = linear_cpu.KERNELS.get(overload)
        if fn is None and "cpu" not in getattr(opdef, "_backend_fns", {}):  # another CPU kernel: dispatch to it
            fn = getattr(opdef, "_init_fn", None)
        if fn is not None:
            out[overload] = fn
    return out


def direct_graph(gm: fx.GraphModule) -> fx.Graph | None:
    """A copy of ``gm``'s graph whose fxopt op calls are direct Python calls; None when it has none."""
    functions = _functions()
    if not any(n.op == "call_function" and n.target in functions for n in gm.graph.nodes):
        return None
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in functions:
            node.target = functions[node.target]
    return graph


def direct_forward(gm: fx.GraphModule) -> Callable:
    """``gm``'s forward over :func:`direct_graph`, bound to ``gm`` (``gm`` itself when there is
    nothing to call directly). Called like ``gm``: ``direct_forward(gm)(*flat_inputs)``."""
    graph = direct_graph(gm)
    if graph is None:
        return gm
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<fxopt direct forward of {type(gm).__name__}>", "exec"), scope)  # noqa: S102
    return functools.partial(scope["forward"], gm)


def on_cpu(gm: fx.GraphModule) -> bool:
    """Whether the graph's weights and buffers all live on the CPU (and it has some)."""
    tensors = [*gm.parameters(), *gm.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)
