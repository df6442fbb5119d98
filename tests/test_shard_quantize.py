"""``quantize`` after tensor-parallel ``shard``: each rank quantizes its local slices, and the groups
of a row-parallel slice (split along the input features, the groups' axis) stay the unsharded
model's (``tp_group_size``, option ``quant_tp_groups``).

Single-process tests plan one rank's graph with ``rank=`` (no process group: the graph cannot run
its collectives, but its buffers can be read) and compare them with the unsharded quantized model
compiled from the same model (one test compiles ``SHARDED`` with ``quantize`` in it; the others
quantize copies of one float compilation per rank with ``quantize_compiled``: the same passes,
without capturing again). One torchrun launch (2 ranks, gloo) compares TP=2 INT8 logits and
greedy tokens with TP=1 INT8; this file is its worker too:

    torchrun --nproc-per-node 2 test_shard_quantize.py OUT_DIR family=llama+quantize+g8 [...]
"""
import json
import math
import os
import sys
import types

import pytest
import torch

import fxopt
import tp_worker
from fxopt.checkpoint import Slice
from fxopt.kernels.quant import quantize_weight
from fxopt.passes.quantize import MIN_ALIGNED_GROUP, QuantOptions, quant_report, quantize_compiled, tp_group_size

QUANT = ["canonicalize", "kv_cache", "fuse", "quantize", "dce"]
SHARDED = ["canonicalize", "shard", "kv_cache", "fuse", "quantize", "dce"]
TIGHT = 1e-5  # fp32 relative error of TP=2 logits against TP=1 (test_shard.py)

_base, _quantized = {}, {}


def quantized(family: str, tp: int = 1, rank: int = 0, **options):
    """tp_worker.model_for(family) compiled in float (with shard when tp > 1; once per family, tp
    and rank), then quantized with ``options`` by ``quantize_compiled`` (the same passes on a copy,
    no second capture)."""
    key = (family, tp, rank)
    if key not in _base:
        passes = [p for p in (SHARDED if tp > 1 else QUANT) if p != "quantize"]
        extra = dict(tp=tp, rank=rank) if tp > 1 else {}
        _base[key] = fxopt.compile(tp_worker.model_for(family), passes=passes, max_seq_len=32, **extra)
    qkey = key + (tuple(sorted(options.items())),)
    if qkey not in _quantized:
        _quantized[qkey] = quantize_compiled(_base[key], **options)
    return _quantized[qkey]


def quantized_buffers(c) -> dict:
    """``{float weight target: (qweight, scales, qweight node)}`` of a compiled model."""
    gm, out = c.graph_module, {}
    for node in gm.graph.find_nodes(op="get_attr"):
        spec = node.meta.get("quant")
        if spec and spec["role"] == "qweight":
            scales = next(iter(node.users)).args[2]  # the quant_linear reading it: (x, qweight, scales, ...)
            out[spec["of"]] = (gm.get_buffer(node.target), gm.get_buffer(scales.target), node)
    return out


def unsharded_rows(sources) -> dict:
    """``{parameter name: first row}`` of each source in an unsharded (fused) weight."""
    return {entry[0]: entry[1] for entry in sources or ()}


def expected_local(full_q, full_s, full_sources, local_sources, group: int, bits: int):
    """The slice of the unsharded ``qweight`` / ``scales`` that one rank's local weight must hold:
    row-parallel (Slice dim 1): columns ``[s, e)`` of qweight (bytes ``s/2 : e/2`` at INT4) and the
    scale columns of the groups ``[s/g, ceil(e/g))``; column-parallel (dim 0): its rows of each
    source, in the local order."""
    rows = unsharded_rows(full_sources)
    q_parts, s_parts = [], []
    for name, _a, _b, sl in local_sources:
        if sl.dim == 0:
            first, last = rows.get(name, 0) + sl.start, rows.get(name, 0) + sl.end
            q_parts.append((0, full_q[first:last]))
            s_parts.append((0, full_s[first:last]))
        else:
            assert sl.start % group == 0, "only aligned slices have an expected slice"
            cols = slice(sl.start, sl.end) if bits == 8 else slice(sl.start // 2, -(-sl.end // 2))
            q_parts.append((1, full_q[:, cols]))
            s_parts.append((1, full_s[:, sl.start // group:-(-sl.end // group)]))
    dim = q_parts[0][0]
    return torch.cat([t for _, t in q_parts], dim), torch.cat([t for _, t in s_parts], dim)


# ---------------------------------------------------------------------------------------------
# The rule, on the shapes that matter
# ---------------------------------------------------------------------------------------------


def fake_weight(in_features: int, tp: int, rank: int, out_features: int = 8):
    """A stand-in for a row-parallel weight node of rank ``rank``: shard's provenance only."""
    per = in_features // tp
    sources = [("w", 0, out_features, Slice(1, rank * per, (rank + 1) * per, in_features))]
    return types.SimpleNamespace(target="layer.weight", meta={"param_sources": sources}), per


@pytest.mark.parametrize("in_features, tp, group, status, used", [
    (1536, 3, 128, "aligned", 128),    # SmolLM2's down_proj at tp=3: 512 a rank
    (576, 3, 128, "regrouped", 64),    # SmolLM2's o_proj at tp=3: 192 a rank, groups 128 → 64
    (576, 2, 128, "regrouped", 32),    # 288 a rank
    (576, 3, None, "regrouped", 192),  # whole rows → one group a rank's row (the grid of 192)
    (48, 2, 128, "regrouped", 24),     # a group wider than the row is the whole row: 48 → 24
    (48, 2, 16, "differ", 16),         # gcd(16, 24) = 8 < MIN_ALIGNED_GROUP: kept, reported
])
def test_rule_is_the_same_on_every_rank(in_features, tp, group, status, used):
    decisions = set()
    for rank in range(tp):
        node, per = fake_weight(in_features, tp, rank)
        d = tp_group_size(node, per, group)
        assert d.ranges == ((rank * per, (rank + 1) * per),) and d.size == in_features
        decisions.add((d.status, d.group_size))
        if status == "differ":
            assert f"groups of {math.gcd(group, per)} (< {MIN_ALIGNED_GROUP})" in d.reason
    assert decisions == {(status, used)}  # rank 0 starts at 0 and the last rank ends at the row's end: no matter
    # column-parallel and unsliced weights are not concerned
    node = types.SimpleNamespace(target="w", meta={"param_sources": [("w", 0, 4, Slice(0, 4, 8, 16))]})
    assert tp_group_size(node, 48, 128) is None and tp_group_size(types.SimpleNamespace(meta={}), 48, 128) is None


def test_modes_local_and_error():
    node, per = fake_weight(576, 3, 1)
    local = tp_group_size(node, per, 128, "local")
    assert (local.status, local.group_size) == ("differ", 128) and "quant_tp_groups='local'" in local.reason
    with pytest.raises(fxopt.PassError, match=r"layer.weight holds input features 192:384 of 576 .*groups of 64"):
        tp_group_size(node, per, 128, "error")
    assert tp_group_size(node, per, 64, "error").status == "aligned"  # nothing to complain about
    with pytest.raises(fxopt.PassError, match="quant_tp_groups must be one of"):
        QuantOptions.from_ctx(fxopt.CompileContext(options={"quant_tp_groups": "nearest"}))


# ---------------------------------------------------------------------------------------------
# One rank's plan, against the unsharded quantized model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_aligned_split_each_rank_holds_slices_of_the_unsharded_quantization(bits):
    """A tiny llama (llama-kv: hidden 64, intermediate 96, 8 heads, 2 kv heads) at tp=2, groups of
    16: o_proj (64 → 32 a rank) and down_proj (96 → 48) split on group boundaries; every rank's
    qweight / scales are exact slices of the unsharded ones: rows of the fused q/k/v and gate/up
    (each rank's share of q, of k and of v), columns (and scale columns) of o_proj and down_proj."""
    full = quantized("llama-kv", quant_group_size=16, quant_bits=bits)
    full_buffers = quantized_buffers(full)
    for rank in (0, 1):
        local = quantized("llama-kv", 2, rank, quant_group_size=16, quant_bits=bits)
        state = local.info.state["quantize"]
        assert state["regrouped"] == [] and state["groups_differ"] == [] and state["tp_groups"] == "align"
        rows = {r["name"]: r for r in quant_report(local)}
        assert len(rows) == len(full_buffers) == 4
        row_parallel = 0
        for name, (q, s, qnode) in quantized_buffers(local).items():
            fq, fs, fnode = full_buffers[name]
            want_q, want_s = expected_local(fq, fs, fnode.meta.get("param_sources"), qnode.meta["param_sources"], 16,
                                            bits)
            assert q.shape == want_q.shape and torch.equal(q, want_q), name
            assert s.shape == want_s.shape and torch.equal(s, want_s), name
            if rows[name]["tp_slice"] is not None:
                row_parallel += 1
                assert rows[name]["tp_groups"] == "aligned" and rows[name]["group_size"] == 16
        assert row_parallel == 2  # o_proj and down_proj
        stats = next(r for r in local.report() if r.name == "quantize").stats
        assert "regrouped" not in stats and "groups_differ" not in stats


def _down(c):
    return next(r for r in quant_report(c) if r["name"].endswith("down_proj.weight"))


def test_unaligned_split_regroups_to_keep_the_unsharded_grid(tmp_path):
    """llama-kv (hidden 64, intermediate 96) at tp=2, groups of 32, compiled with quantize in the
    pipeline on rank 1: o_proj's 32 columns a rank are aligned; down_proj's 48 are not (the cut at
    48 falls inside the group 32:64), so down_proj is quantized with groups of gcd(32, 48) = 16:
    its buffers are exact slices of the unsharded weight quantized with groups of 16, and the
    report says so. A checkpoint loader (planning on the meta device) quantizes with the same size."""
    model = tp_worker.model_for("llama-kv")
    down_w = model.model.layers[0].mlp.down_proj.weight.detach()
    o_w = model.model.layers[0].self_attn.o_proj.weight.detach()
    rank = 1
    local = fxopt.compile(model, passes=SHARDED, tp=2, rank=rank, max_seq_len=32, quant_group_size=32)
    down = _down(local)
    assert (down["group_size"], down["requested_group_size"], down["tp_groups"]) == (16, 32, "regrouped")
    assert down["tp_slice"] == "columns 48:96 of 96" and down["n_groups"] == 3
    assert "groups of 16 keep the unsharded grid" in down["tp_note"]
    state = local.info.state["quantize"]
    assert state["regrouped"] == ["model.layers.0.mlp.down_proj.weight"] and state["groups_differ"] == []
    assert "without a process group" in state["note"]  # no output errors: the graph cannot run alone
    stats = next(r for r in local.report() if r.name == "quantize").stats
    assert stats["regrouped"] == 1 and stats["group_size"] == 32
    gm = local.graph_module
    q, s = gm.get_buffer(down["qweight"]), gm.get_buffer(down["scales"])
    fq, fs = quantize_weight(down_w, 16)
    assert torch.equal(q, fq[:, 48:96]) and torch.equal(s, fs[:, 3:6])
    node = next(n for n in local.graph.nodes if n.name == down["node"])
    assert node.args[4] == 16 and node.meta["fxopt"]["tp_groups"] == "g32→g16"
    o = next(r for r in quant_report(local) if r["name"].endswith("o_proj.weight"))
    assert (o["group_size"], o["tp_groups"]) == (32, "aligned")
    fq, fs = quantize_weight(o_w, 32)
    assert torch.equal(gm.get_buffer(o["qweight"]), fq[:, 32:64])
    assert torch.equal(gm.get_buffer(o["scales"]), fs[:, 1:2])

    # compile_from_checkpoint plans on the meta device and quantizes while loading: the same tensors
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = fxopt.compile_from_checkpoint(tmp_path, SHARDED, tp=2, rank=rank, dtype=torch.float32, progress=False,
                                           max_seq_len=32, quant_group_size=32)
    assert _down(loaded)["group_size"] == 16
    for r in quant_report(loaded):
        for key in ("qweight", "scales"):
            assert torch.equal(loaded.graph_module.get_buffer(r[key]), gm.get_buffer(r[key])), r[key]


def test_unaligned_split_local_mode_keeps_the_size_and_reports_it():
    """quant_tp_groups='local': groups of 32 from each rank's first column; the layer's groups are
    not the unsharded model's and the report and info.state say so. 'error' refuses, naming it."""
    model = tp_worker.model_for("llama-kv")
    down_w = model.model.layers[0].mlp.down_proj.weight.detach()
    local = quantized("llama-kv", 2, 1, quant_group_size=32, quant_tp_groups="local")
    down = _down(local)
    assert (down["group_size"], down["tp_groups"], down["n_groups"]) == (32, "differ", 2)  # 48 = 32 + 16
    (differ,) = local.info.state["quantize"]["groups_differ"]
    assert differ == {"name": "model.layers.0.mlp.down_proj.weight", "slice": "columns 48:96 of 96", "group_size": 32,
                      "reason": down["tp_note"]}
    assert next(r for r in local.report() if r.name == "quantize").stats["groups_differ"] == 1
    gm = local.graph_module
    q, s = gm.get_buffer(down["qweight"]), gm.get_buffer(down["scales"])
    lq, ls = quantize_weight(down_w[:, 48:], 32)  # the rank's columns quantized on their own
    assert torch.equal(q, lq) and torch.equal(s, ls)
    fq, fs = quantize_weight(down_w, 32)
    assert not torch.equal(s[:, 0], fs[:, 1])  # the unsharded group 32:64 spans both ranks
    with pytest.raises(fxopt.PassError, match=r"model.layers.0.mlp.down_proj.weight holds input features 48:96 of 96"):
        quantized("llama-kv", 2, 1, quant_group_size=32, quant_tp_groups="error")


# ---------------------------------------------------------------------------------------------
# torchrun: TP=2 INT8 against TP=1 INT8
# ---------------------------------------------------------------------------------------------

TP_JOBS = ["family=llama+quantize+g8"]


def parse_job(job: str):
    """``family=NAME+quantize[+gN][+int4]`` → (family, quant options)."""
    name, *flags = job.partition("=")[2].split("+")
    assert "quantize" in flags, job
    options = {"quant_bits": 4 if "int4" in flags else 8}
    for f in flags:
        if f.startswith("g") and f[1:].isdigit():
            options["quant_group_size"] = int(f[1:])
    return name, options


@pytest.fixture(scope="module")
def tp2_quantized(tmp_path_factory):
    from test_shard import torchrun
    out = tmp_path_factory.mktemp("tp2q")
    run = torchrun(2, ["test_shard_quantize.py", out, *TP_JOBS], timeout=180)
    assert run.returncode == 0 and not run.timed_out, run.tail()
    results = json.loads((out / "results.json").read_text())
    for ranks in results.values():
        ranks[0]["payload"] = torch.load(out / ranks[0]["file"], weights_only=False)
    print(f"torchrun x2 (quantize): {run.seconds:.0f}s", file=sys.stderr)
    return results


def test_tp2_int8_logits_and_tokens_equal_tp1_int8(tp2_quantized):
    from test_shard import one_thread
    for job in TP_JOBS:
        ranks = tp2_quantized[job]
        assert not [r["error"] for r in ranks if "error" in r], ranks
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["quantized"] == 8 and r["row_parallel"] == {"aligned": 4} for r in ranks), ranks
        family, options = parse_job(job)
        payload = ranks[0]["payload"]
        single = fxopt.compile(tp_worker.model_for(family), passes=QUANT, **tp_worker.OPTS, **options)
        with one_thread():
            ref = tp_worker.run_model(single, payload["calls"], payload["prompt"])
        errors = [float((a - b).norm() / b.norm()) for a, b in zip(payload["logits"], ref["logits"])]
        assert len(errors) == 3 and max(errors) < TIGHT, errors
        assert torch.equal(payload["tokens"], ref["tokens"]), (payload["tokens"], ref["tokens"])


def _worker(out_dir: str, jobs: list) -> None:
    rank, world = fxopt.distributed.setup()
    results = {}
    for job in jobs:
        safe = job.replace("=", "-").replace("+", "_")
        try:
            family, options = parse_job(job)
            c = fxopt.compile(tp_worker.model_for(family), passes=SHARDED, tp=world, **tp_worker.OPTS, **options)
            calls, prompt = tp_worker.inputs()
            payload = tp_worker.run_model(c, calls, prompt)
            if rank == 0:
                torch.save(payload, os.path.join(out_dir, f"{safe}.pt"))
            rows = quant_report(c)
            kinds = {}
            for r in rows:
                if r["tp_groups"] is not None:
                    kinds[r["tp_groups"]] = kinds.get(r["tp_groups"], 0) + 1
            results[job] = {"rank": rank, "quantized": len(rows), "row_parallel": kinds, "file": f"{safe}.pt"}
        except Exception as e:  # noqa: BLE001 - reported to the test
            import traceback
            traceback.print_exc()
            results[job] = {"rank": rank, "error": f"{type(e).__name__}: {e}"}
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, results)
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({job: [r[job] for r in everyone] for job in jobs}, f, default=str)
    fxopt.distributed.teardown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
