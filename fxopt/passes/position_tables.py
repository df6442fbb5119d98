"""``position_tables``: values computed from the token positions alone become table lookups.

A decoder recomputes, every step, tensors that depend on nothing but the positions: the rotary
embedding's cos and sin (``position_ids → float → × inv_freq → cat → cos / sin → × scale →
bf16``, seven small kernels a decode step on a GPU). Positions are bounded by the KV cache
(``0 <= p < max_seq_len``), so each such tensor can be computed once, for every position, at
compile time and gathered per step: one ``aten.embedding`` kernel per tensor instead of the
chain.

    position_ids ─ unsqueeze ─ to ─ mul(inv_freq) ─ cat ┬ cos ─ to(bf16) ─→ attention
                                                         └ sin ─ to(bf16) ─→ attention
    becomes
    position_ids ┬ embedding(position_table_0) ─→ attention
                 └ embedding(position_table_1) ─→ attention

What is tabulated is read from the dataflow: the nodes computed only from ``position_ids``
(its shape included) and constants, whose values leave that set and are laid out
``[batch, seq, ...]`` like the positions. Those are evaluated at positions ``0 .. max_seq - 1``
(one row), and the result must be *position-wise*: the pass evaluates the same nodes on a probe
(a few rows of random positions, the first and last included) and requires the gathered table to
equal them bit for bit; anything else (a cumulative sum over positions, a value mixing rows) is
left alone and reported. The table holds exactly the values the chain computed, so the pass is
exact.

Runs after ``kv_cache`` (which bounds the positions); a table larger than
``position_table_max_mib`` (default 64 MiB) is not made. Stats: the tables made, the nodes
removed, the tables' MiB, or why nothing was done.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir import describe, fake_mode_of, is_op, set_attribute, val
from .base import CompileContext, Pass, PassResult, register_pass
from .canonicalize import getattr_path
from .kv_cache import positions_node

aten = torch.ops.aten
DEFAULT_MAX_MIB = 64
PROBE_SHAPE = (3, 5)  # rows x tokens of the position-wise check


def position_derived(gm: fx.GraphModule, positions: fx.Node) -> list[fx.Node]:
    """The nodes computed from ``positions`` (its shape included) and constants only, in graph
    order, ``positions`` first. Constants are ``get_attr`` nodes and what is computed from them
    alone (``inv_freq.to(float32)``). Impure nodes (mutations, random ops) end the set."""
    derived, constant = {positions}, set()
    order = [positions]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        if node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        inputs = node.all_input_nodes
        if not all(i in derived or i in constant for i in inputs):
            continue
        if any(i in derived for i in inputs):
            derived.add(node)
            order.append(node)
        else:
            constant.add(node)
    return order


def _laid_out_like(node: fx.Node, positions: fx.Node) -> bool:
    """A tensor whose leading dims are the positions' [batch, seq]."""
    v, p = val(node), val(positions)
    if not isinstance(v, torch.Tensor) or not isinstance(p, torch.Tensor) or v.dim() < p.dim():
        return False
    return [str(d) for d in v.shape[:p.dim()]] == [str(d) for d in p.shape]


def frontier(derived: list[fx.Node], positions: fx.Node) -> list[fx.Node]:
    """The derived tensors that the rest of the graph reads, each laid out like the positions.

    Raises nothing: a derived value read outside in another layout (a position-derived mask,
    say) is simply not a frontier node, and the chain behind it stays."""
    inside = set(derived)
    out = []
    for node in derived[1:]:
        if any(u not in inside for u in node.users) and _laid_out_like(node, positions):
            out.append(node)
    return out


def _worth_it(node: fx.Node) -> bool:
    """False for a gather from a weight (a learned position embedding, ``wpe(position_ids)``):
    it is one kernel already, and its table would only copy the weight's rows."""
    return not (is_op(node, aten.embedding.default, aten.index.Tensor, aten.index_select.default)
                and node.args[0].op == "get_attr")


def evaluator(gm: fx.GraphModule, derived: list[fx.Node], outputs: list[fx.Node]) -> tuple[fx.GraphModule, set]:
    """A GraphModule ``positions -> tuple(outputs)`` holding copies of the derived nodes and of
    the constants they read (its ``get_attr`` nodes read ``gm``'s attributes), and the set of
    ``gm``'s nodes it copied."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {derived[0]: graph.placeholder("position_ids")}

    def copy(node):
        if node not in env:
            env[node] = graph.node_copy(node, copy)
        return env[node]

    for node in derived[1:]:
        copy(node)
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph), set(env)


def _device_of(*modules: torch.nn.Module) -> torch.device:
    """The device of the first real tensor of the first module that holds one (the CPU if none)."""
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def _probe(max_seq: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, max_seq, PROBE_SHAPE, generator=g)
    probe[0, 0], probe[-1, -1] = 0, max_seq - 1
    return probe.to(device)


def _real_values(run: fx.GraphModule, buffer_values: dict) -> bool:
    """Give the evaluator's meta attributes their real values from ``buffer_values`` (by the
    checkpoint name in ``meta['param']``); False if one has none."""
    for node in run.graph.find_nodes(op="get_attr"):
        value = getattr_path(run, node.target)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            real = buffer_values.get(node.meta.get("param"))
            if real is None:
                return False
            set_attribute(run, node.target, real)
    return True


def tabulate(gm: fx.GraphModule, max_seq: int, max_mib: float = DEFAULT_MAX_MIB,
             buffer_values: dict | None = None) -> dict:
    """Replace the position-only values of ``gm`` by gathers from tables over ``0 .. max_seq-1``;
    returns the stats (``tables``, ``removed``, ``MiB``, or ``skipped`` with the reason).
    ``buffer_values``: real values of buffers the graph holds on the meta device, by checkpoint
    name (``compile_on_meta`` passes the rotary ``inv_freq`` this way)."""
    positions = positions_node(gm)
    if positions is None:
        return {"skipped": "no position_ids input"}
    derived = position_derived(gm, positions)
    edge = frontier(derived, positions)
    outputs = [n for n in edge if _worth_it(n)]
    if not outputs:
        return {"skipped": "nothing computed from the positions alone" + (" but gathers from a weight" if edge else "")}
    run, copied = evaluator(gm, derived, outputs)
    if not _real_values(run, buffer_values or {}):
        return {"skipped": "the positions' chain reads a tensor on the meta device"}
    # Evaluate where the chain's real buffers are (else the model's): compiled on the meta
    # device (compile_from_checkpoint), the chain's device constants say meta, and its tables
    # follow the weights to their device when they are loaded (checkpoint's "kept" attributes).
    device = _device_of(run, gm)
    from ..checkpoint import retarget_device
    retarget_device(run, device)
    p_dtype = getattr(val(positions), "dtype", torch.long)
    with torch.no_grad():
        every = torch.arange(max_seq, device=device, dtype=p_dtype)[None]
        tables = [t[0].to(device).contiguous() for t in run(every)]
        size = sum(t.nbytes for t in tables)
        if size > max_mib * 2**20:
            return {"skipped": f"tables of {size / 2**20:.3g} MiB exceed position_table_max_mib={max_mib:g}"}
        probe = _probe(max_seq, device).to(p_dtype)
        for node, table, direct in zip(outputs, tables, run(probe)):
            if not torch.equal(table[probe], direct):
                return {"skipped": f"{describe(node)} is not a function of each position alone "
                                   f"(a table lookup differs from computing it)"}
    graph, mode = gm.graph, fake_mode_of(gm)
    for i, (node, table) in enumerate(zip(outputs, tables)):
        name = _free_name(gm, f"position_table_{i}")
        gm.register_buffer(name, table, persistent=False)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
            lookup = graph.call_function(aten.embedding.default, (attr, positions)) if table.dim() == 2 \
                else graph.call_function(aten.index.Tensor, (attr, [positions]))
        # The lookup's value is the replaced node's, to the bit and in meta: no re-propagation
        # of the whole graph (a second or more on a 32-layer model).
        with mode:
            attr.meta["val"] = torch.empty(table.shape, dtype=table.dtype, device=val(node).device)
        lookup.meta.update(node.meta)
        lookup.meta["fxopt"] = {**node.meta.get("fxopt", {}), "position_table": name}
        node.replace_all_uses_with(lookup)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    left = set(graph.nodes)
    return {"tables": len(tables), "removed": sum(n not in left for n in copied), "MiB": round(size / 2**20, 3)}


def _free_name(gm: fx.GraphModule, name: str) -> str:
    base, k = name, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


@register_pass("position_tables")
class PositionTables(Pass):
    name = "position_tables"
    preserves_meta = True  # the new nodes carry the values of the nodes they replace

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        state = getattr(ctx.info, "state", {}) if ctx.info is not None else {}
        cache = state.get("kv_cache")
        if not cache:
            return PassResult(changed=False, stats={"skipped": "run kv_cache first: it bounds the positions"})
        stats = tabulate(gm, int(cache["max_seq_len"]), float(ctx.option("position_table_max_mib", DEFAULT_MAX_MIB)),
                         ctx.option("buffer_values"))
        return PassResult(changed="tables" in stats, stats=stats)
