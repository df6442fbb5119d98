"""Tensor parallelism: the ``shard`` pass, sharded checkpoint loading, torchrun runs, the CLI.

Single-process tests plan one rank's graph with ``rank=`` (no process group) and check what that
rank holds against slices of the full weights. The multi-process tests batch their checks into a
few torchrun launches (gloo on the CPU) of tests/tp_worker.py, one per world size; the worker's
rank 0 saves its inputs and outputs and the TP=1 reference is computed here, on the same inputs.
A launch only runs the jobs of the tests that were selected.
"""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as T

import fxopt
import tp_worker
from test_checkpoint import _edited_copy
from families import VOCAB, tiny
from fxopt.checkpoint import CheckpointError, CheckpointFiles, compile_from_checkpoint, load_checkpoint
from fxopt.passes.shard import check

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARD = ["canonicalize", "shard", "dce"]  # nothing after shard adds nodes: every node has its spec
REFERENCE = ["canonicalize", "kv_cache", "dce"]  # TP=1
TIGHT = 1e-5  # fp32 relative error of TP=N logits against TP=1

# what each family's layers are made of (2 layers each): column-parallel linears per layer
COLUMNS_PER_LAYER = {"llama": 5, "mistral": 5, "gpt2": 2, "opt": 4}  # q,k,v,gate,up / c_attn,c_fc / q,k,v,fc1


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_planned = {}


def planned(family: str, tp: int, rank: int, dump_dir=None):
    """fxopt.compile(tiny(family), SHARD, tp=tp, rank=rank), once per (family, tp, rank)."""
    key = (family, tp, rank)
    if key not in _planned or dump_dir is not None:
        _planned[key] = fxopt.compile(tp_worker.model_for(family), SHARD, tp=tp, rank=rank, dump_dir=dump_dir)
    return _planned[key]


def shard_stats(compiled) -> dict:
    return next(r for r in compiled.report() if r.name == "shard").stats


def params(compiled) -> dict:
    return dict(compiled.graph_module.named_parameters())


def vocab_rows(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's rows of a vocabulary table, padded with zero rows to ceil(V / tp)."""
    per = -(-full.shape[0] // tp)
    rows = full[rank * per:(rank + 1) * per]
    return torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])])


def rows(full, rank, tp, blocks=1):
    """Rank ``rank``'s share of each of ``blocks`` equal blocks of rows, concatenated."""
    return torch.cat([b.chunk(tp)[rank] for b in full.chunk(blocks)])


def columns(full, rank, tp):
    return full.chunk(tp, dim=1)[rank]


def expected_local(family: str, name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """What rank ``rank`` must hold of parameter ``name`` (graph orientation: [out, in])."""
    leaf = name.split(".")[-2]
    is_weight = name.endswith(".weight")
    if leaf in ("embed_tokens", "lm_head", "wte"):
        return vocab_rows(full, rank, tp)
    if family in ("llama", "mistral", "llama-kv"):
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            return rows(full, rank, tp)
        if leaf in ("o_proj", "down_proj"):
            return columns(full, rank, tp)
    if family == "opt":
        if leaf in ("q_proj", "k_proj", "v_proj", "fc1"):
            return rows(full, rank, tp)
        if leaf in ("out_proj", "fc2") and is_weight:
            return columns(full, rank, tp)  # the bias is added once, after the all-reduce
    if family == "gpt2":
        if leaf == "c_attn":  # one fused [q; k; v]: rank r's rows of each
            return rows(full, rank, tp, blocks=3)
        if leaf == "c_fc":
            return rows(full, rank, tp)
        if leaf == "c_proj" and is_weight:
            return columns(full, rank, tp)
    return full  # norms, positions, row-parallel biases: replicated


def full_weights(model) -> dict:
    """The model's parameters in the graph's orientation (GPT-2's Conv1D weights transposed)."""
    from transformers.pytorch_utils import Conv1D
    conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return {n: (p.detach().t() if n in conv else p.detach()) for n, p in model.named_parameters(remove_duplicate=False)}


def rel_error(got, want) -> float:
    return float((got - want).norm() / want.norm())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def tail(self, n: int = 3000) -> str:
        return (f"exit {self.returncode} after {self.seconds:.0f}s\n--- stdout\n{self.stdout[-n:]}\n"
                f"--- stderr\n{self.stderr[-n:]}")


def torchrun(nproc: int, args: list, *, timeout: float, env: dict | None = None) -> Run:
    """Launch ``torchrun --nproc-per-node nproc ARGS`` in its own session; past ``timeout`` the
    whole session (torchrun and its workers) is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")) if p), **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=TESTS, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started
        out, err = proc.communicate()
    return Run(proc.returncode, out, err, time.monotonic() - t0, timed_out)


def launch_worker(request, tmp_path_factory, nproc: int, jobs_of_tests: dict, timeout: float) -> dict:
    """One torchrun launch of tp_worker.py with the jobs of the selected tests; returns
    ``{job: [result of each rank]}``, each result with ``payload`` (rank 0's saved tensors)."""
    selected = {item.originalname for item in request.session.items}
    jobs = []
    for test, test_jobs in jobs_of_tests.items():
        if test in selected:
            jobs += [j for j in test_jobs() if j not in jobs]
    if not jobs:
        return {}
    out = tmp_path_factory.mktemp(f"tp{nproc}")
    run = torchrun(nproc, ["tp_worker.py", out, *jobs], timeout=timeout)
    assert run.returncode == 0 and not run.timed_out, run.tail()
    results = json.loads((out / "results.json").read_text())
    for job, ranks in results.items():
        payload = out / ranks[0]["file"]
        ranks[0]["payload"] = torch.load(payload, weights_only=False) if payload.exists() else None
    print(f"torchrun x{nproc}: {run.seconds:.0f}s; " + ", ".join(f"{j}: {r[0]['seconds']}s" for j, r in results.items()),
          file=sys.stderr)  # (shown with -s)
    return results


def job(results: dict, name: str) -> list:
    ranks = results[name]
    errors = [r.get("error") for r in ranks if "error" in r]
    assert not errors, f"{name}: {errors}"
    return ranks


_references = {}


class one_thread:
    """Compute references with one intra-op thread, like the torchrun workers (OMP_NUM_THREADS=1):
    two OpenMP threads on two shared cores can be many times slower than one."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def reference_family(family: str, payload: dict) -> dict:
    """TP=1 logits and tokens of a tiny model on the worker's inputs (computed once)."""
    if family not in _references:
        single = fxopt.compile(tp_worker.model_for(family), REFERENCE, **tp_worker.OPTS)
        with one_thread():
            _references[family] = tp_worker.run_model(single, payload["calls"], payload["prompt"])
    ref = _references[family]
    for (a, _), (b, _) in zip(ref["calls"], payload["calls"]):
        assert torch.equal(a, b)
    return ref


def assert_matches_checkpoint(payload: dict, path) -> None:
    """The TP=1 model of the checkpoint at ``path`` (loaded by transformers) on the worker's inputs
    gives the worker's logits and tokens."""
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    single = fxopt.compile(model, REFERENCE, **tp_worker.OPTS)
    with one_thread():
        assert_matches_reference(payload, tp_worker.run_model(single, payload["calls"], payload["prompt"]))


def assert_matches_reference(payload: dict, ref: dict, tol: float = TIGHT) -> None:
    errors = [rel_error(got, want) for got, want in zip(payload["logits"], ref["logits"])]
    assert len(errors) == len(ref["logits"]) and max(errors) < tol, errors
    assert payload["tokens"].shape == ref["tokens"].shape
    assert torch.equal(payload["tokens"], ref["tokens"]), (payload["tokens"], ref["tokens"])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def memory_config():
    """A llama big enough to measure resident memory: ~130 MB in fp32."""
    return T.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8192, max_position_embeddings=64, tie_word_embeddings=False)


def nine_heads_config():
    """SmolLM2-135M's attention layout at a tiny size: 9 heads, 3 kv heads, the LM head tied."""
    return T.LlamaConfig(hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name → a checkpoint directory: 'llama' (one file), 'llama-sharded' (index + files),
    'gpt2' (Conv1D weights stored [in, out], lm_head tied), 'memory' (the big llama),
    'nine-heads' (SmolLM2's head layout: 9 heads, 3 kv heads, tied LM head)."""
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {name: root / name for name in ("llama", "llama-sharded", "gpt2", "memory", "nine-heads")}
    tiny("llama").save_pretrained(dirs["llama"], safe_serialization=True)
    tiny("llama").save_pretrained(dirs["llama-sharded"], safe_serialization=True, max_shard_size="20KB")
    tiny("gpt2").save_pretrained(dirs["gpt2"], safe_serialization=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(memory_config()).save_pretrained(dirs["memory"], safe_serialization=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(nine_heads_config()).save_pretrained(dirs["nine-heads"], safe_serialization=True)
    return dirs


# ---------------------------------------------------------------------------------------------
# torchrun launches (module fixtures): the jobs each test needs
# ---------------------------------------------------------------------------------------------

def _smollm2_dir(request):
    try:
        return request.getfixturevalue("smollm2_dir")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def tp2(request, tmp_path_factory, ckpt):
    """The TP=2 launch; the memory job first, in a fresh process."""
    def smollm2():
        path = _smollm2_dir(request)
        return [] if path is None else [f"smollm2={path}"]

    jobs = {
        "test_peak_host_memory_per_rank_while_loading": lambda: [f"memory={ckpt['memory']}"],
        "test_tp2_logits_and_tokens_equal_tp1": lambda: [f"family={f}" for f in TP2_FAMILIES] + ["family=llama+fuse+symm"],
        "test_tp2_every_rank_loads_its_slices_from_the_checkpoint": lambda: [f"checkpoint={ckpt['llama-sharded']}"],
        "test_smollm2_tp2_replicated_attention_split_mlp": smollm2,
    }
    return launch_worker(request, tmp_path_factory, 2, jobs, timeout=240)


@pytest.fixture(scope="module")
def tp4(request, tmp_path_factory):
    jobs = {"test_tp4_logits_and_tokens_equal_tp1": lambda: [f"family={f}" for f in TP4_FAMILIES]}
    return launch_worker(request, tmp_path_factory, 4, jobs, timeout=180)


@pytest.fixture(scope="module")
def tp3(request, tmp_path_factory, ckpt):
    jobs = {"test_tp3_splits_nine_heads_and_three_kv_heads": lambda: [f"checkpoint={ckpt['nine-heads']}"]}
    return launch_worker(request, tmp_path_factory, 3, jobs, timeout=180)


class Background:
    """A torchrun launch that runs while the single-process tests do: it mostly waits (process
    start-up, a collective's timeout), so it costs little time on two cores."""

    def __init__(self, *args, **kwargs):
        self.run, self.error = None, None
        self.thread = threading.Thread(target=self._go, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _go(self, *args, **kwargs):
        try:
            self.run = torchrun(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def result(self) -> Run:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.run


@pytest.fixture(scope="module", autouse=True)
def background(request):
    """Starts the failure-injection runs and the CLI run (those the selected tests need) with
    the module's first test; each test waits for its own."""
    selected = {item.originalname for item in request.session.items}
    runs = {}
    if "test_a_rank_that_raises_fails_the_run" in selected:
        runs["raise"] = Background(2, ["tp_worker.py", "unused", "raise"], timeout=120)
    if "test_a_rank_that_hangs_fails_the_run_after_the_timeout" in selected:
        runs["hang"] = Background(2, ["tp_worker.py", "unused", "hang"], timeout=150, env={"FXOPT_DIST_TIMEOUT": "10"})
    if "test_cli_tp2_under_torchrun_prints_once" in selected:
        try:
            model = request.getfixturevalue("cli_model")
        except pytest.skip.Exception:
            model = None  # the test skips too
        if model is not None:
            runs["cli"] = Background(2, ["-m", "fxopt", *cli_args(model), "--tp", "2"], timeout=150)
    yield runs
    for run in runs.values():
        run.thread.join()


# =============================================================================================
# 1. One rank's plan, in one process
# =============================================================================================


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral"])
def test_plan_stats_annotations_and_dump(family, tmp_path):
    dump = tmp_path / "dump" if family == "llama" else None  # (dumps take time: one family)
    compiled = planned(family, 2, 0, dump_dir=dump)
    stats = shard_stats(compiled)
    layers = 2
    assert stats["tp"] == 2 and stats["rank"] == 0
    assert stats["column"] == COLUMNS_PER_LAYER[family] * layers + 1  # + the LM head
    assert stats["row"] == 2 * layers  # attention output and MLP down projections
    assert stats["vocab"] == 1 and stats["gather"] == 1  # the embedding, the logits
    assert stats["all_reduce"] == stats["row"] + stats["vocab"]
    assert stats["replicated"] == 0 and "notes" not in stats
    state = compiled.info.state["shard"]
    assert state["tp"] == 2 and state["rank"] == 0 and state["notes"] == []
    kinds = list(state["decisions"].values())
    assert kinds.count("column") == stats["column"] and kinds.count("row") == stats["row"]

    gm = compiled.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    unannotated = [n.name for n in nodes if not isinstance((n.meta.get("fxopt") or {}).get("shard"), str)]
    assert not unannotated
    c10d = torch.ops._c10d_functional
    reduces = [n for n in nodes if n.target is c10d.all_reduce.default]
    assert len(reduces) == stats["all_reduce"]
    assert len([n for n in nodes if n.target is c10d.all_gather_into_tensor.default]) == 1
    specs = [n.meta["fxopt"]["shard"] for n in nodes]
    assert sum(s == "row-parallel" for s in specs) == stats["row"]
    assert sum(s == "vocab-parallel" for s in specs) == 1
    assert sum(s.startswith("S(") for s in specs) > stats["column"]  # the linears and what flows from them
    assert any("padded from 101" in s for s in specs)  # the LM head's logits before the gather
    # check() re-derives the same thing: every row-parallel linear is a partial sum, all-reduced
    derived = check(gm, 2)
    assert all(derived[n.args[0]].partial for n in reduces)
    assert all(n.args[0].meta["fxopt"]["shard"] in ("row-parallel", "P") for n in reduces)

    if dump is not None:
        text = next(dump.glob("*_shard.txt")).read_text()
        assert "shard=S(2; 2 parts)" in text and "shard=S(1; 2 parts)" in text and "padded from 101" in text
        assert "shard=row-parallel" in text and "shard=vocab-parallel" in text and "all_reduce" in text


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral"])
@pytest.mark.parametrize("rank", [0, 1])
def test_local_weights_are_this_ranks_slices(family, rank):
    """Every parameter rank r holds is the right slice of the full weight, by value: column
    linears by rows, row linears by columns, GPT-2's fused c_attn by blocks of q, k and v, the
    vocabulary (101: odd) by rows padded with one zero row."""
    model = tiny(family)
    full = full_weights(model)
    local = params(planned(family, 2, rank))
    assert set(local) <= set(full) and len(local) == len(dict(model.named_parameters()))  # (tied: one name)
    for name, got in local.items():
        want = expected_local(family, name, full[name], rank, 2)
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        assert torch.equal(got, want), name
    share = sum(p.numel() for p in local.values()) / sum(p.numel() for p in model.parameters())
    assert 0.45 < share < 0.65, share  # positions and norms stay whole


def test_named_shapes_and_padding():
    """The numbers the issue spells out: llama (6 heads, 2 kv heads, head_dim 8), GPT-2's
    c_attn, and the padded vocabulary on rank 1."""
    for rank in (0, 1):
        p = params(planned("llama", 2, rank))
        attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
        assert p[f"{attn}.q_proj.weight"].shape == (24, 48) and p[f"{attn}.k_proj.weight"].shape == (8, 48)
        assert p[f"{attn}.v_proj.weight"].shape == (8, 48) and p[f"{attn}.o_proj.weight"].shape == (48, 24)
        assert p[f"{mlp}.down_proj.weight"].shape == (48, 40) and p[f"{mlp}.up_proj.weight"].shape == (40, 48)
        assert p["model.embed_tokens.weight"].shape == p["lm_head.weight"].shape == (51, 48)
    llama = tiny("llama")
    last = params(planned("llama", 2, 1))["lm_head.weight"]
    assert torch.equal(last[:50], llama.lm_head.weight[51:]) and not last[50].any()  # 101 = 51 + 50 + 1 zero row
    gpt2 = tiny("gpt2")
    w = gpt2.transformer.h[1].attn.c_attn.weight.detach()  # Conv1D: [in 48, out 3 * 48]
    for rank in (0, 1):
        got = params(planned("gpt2", 2, rank))["transformer.h.1.attn.c_attn.weight"]
        q, k, v = (w[:, 48 * b + 24 * rank: 48 * b + 24 * (rank + 1)].t() for b in range(3))
        assert torch.equal(got, torch.cat([q, k, v]))
    # the provenance the loader reads: one slice of each block
    node = next(n for n in planned("gpt2", 2, 1).graph.find_nodes(op="get_attr")
                if n.target == "transformer.h.1.attn.c_attn.weight")
    assert [(s[0], s[3].start, s[3].end) for s in node.meta["param_sources"]] == [
        ("transformer.h.1.attn.c_attn.weight", a, b) for a, b in ((24, 48), (72, 96), (120, 144))]


# =============================================================================================
# 2. GQA
# =============================================================================================


def test_tp4_six_heads_replicates_attention_with_a_note():
    """6 heads on 4 ranks: the attention stays whole on every rank (with a note naming the node
    where it could not be split), the MLP is still split; shard_strict=True makes it an error."""
    compiled = planned("llama", 4, 1)
    stats = shard_stats(compiled)
    assert stats["replicated"] == 8  # q, k, v, o of 2 layers
    assert stats["column"] == 2 * 2 + 1 and stats["row"] == 2  # gate, up; down; + the LM head
    notes = stats["notes"]
    assert "%linear (model.layers.0.self_attn.q_proj)" in notes[0] and "%reshape_default" in notes[0]
    assert notes[-1] == "... 5 more"
    assert compiled.info.state["shard"]["notes"][0] == notes[0]
    llama, p = tiny("llama"), params(compiled)
    layer, local = llama.model.layers[1], "model.layers.1"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(p[f"{local}.self_attn.{proj}.weight"], getattr(layer.self_attn, proj).weight)
    assert torch.equal(p[f"{local}.mlp.gate_proj.weight"], layer.mlp.gate_proj.weight[20:40])
    assert torch.equal(p[f"{local}.mlp.down_proj.weight"], layer.mlp.down_proj.weight[:, 20:40])
    assert torch.equal(p["lm_head.weight"], vocab_rows(llama.lm_head.weight.detach(), 1, 4))  # 26 rows

    with pytest.raises(fxopt.PassError) as e:
        fxopt.compile(tiny("llama"), SHARD, tp=4, rank=1, shard_strict=True)
    assert "shard_strict" in str(e.value) and "%linear (model.layers.0.self_attn.q_proj)" in str(e.value)
    assert "%reshape_default" in str(e.value)


def test_tp_a_multiple_of_kv_heads_shares_one_kv_head():
    """8 query heads, 2 kv heads (head_dim 8), tp=4: each rank has 2 query heads and keeps the one
    kv head they read: rank r's k/v rows are kv head r // 2."""
    model = tp_worker.model_for("llama-kv")
    attn = model.model.layers[0].self_attn
    for rank in (1, 2):  # the last rank of kv head 0's group, the first of kv head 1's
        compiled = planned("llama-kv", 4, rank)
        stats = shard_stats(compiled)
        assert stats["replicated"] == 0 and stats["column"] == 5 + 1 and stats["row"] == 2, stats  # 1 layer
        p = params(compiled)
        head = rank // 2
        for proj in ("k_proj", "v_proj"):
            got = p[f"model.layers.0.self_attn.{proj}.weight"]
            assert got.shape == (8, 64)
            assert torch.equal(got, getattr(attn, proj).weight[8 * head:8 * (head + 1)])
        assert torch.equal(p["model.layers.0.self_attn.q_proj.weight"], attn.q_proj.weight[16 * rank:16 * (rank + 1)])
        assert torch.equal(p["model.layers.0.self_attn.o_proj.weight"], attn.o_proj.weight[:, 16 * rank:16 * (rank + 1)])


# =============================================================================================
# 3. Errors
# =============================================================================================


def test_tp_without_process_group_or_rank():
    with pytest.raises(fxopt.PassError, match="torchrun --nproc-per-node 2"):
        fxopt.compile(tiny("llama"), SHARD, tp=2)


def test_pipeline_without_shard():
    with pytest.raises(fxopt.FxoptError, match="needs the 'shard' pass"):
        fxopt.compile(tiny("llama"), ["canonicalize", "kv_cache", "dce"], tp=2, rank=0)


def test_shard_after_fuse_or_kv_cache():
    with pytest.raises(fxopt.PassError, match="put 'shard' right after 'canonicalize'") as e:
        fxopt.compile(tiny("llama"), ["canonicalize", "fuse", "shard"], tp=2, rank=0)
    assert "rms_norm" in str(e.value)  # names the node fuse made


@pytest.mark.parametrize("rank", [2, -1])
def test_rank_out_of_range(rank):
    with pytest.raises(fxopt.PassError, match=r"rank -?\d is not in 0\.\.1"):
        fxopt.compile(tiny("opt"), SHARD, tp=2, rank=rank)


def test_check_finds_a_missing_all_reduce():
    """Bypass the all-reduce after the first row-parallel linear: check() refuses the graph and
    names the node where the partial sums meet the residual."""
    gm = copy.deepcopy(planned("llama", 2, 0).graph_module)
    check(gm, 2)
    c10d = torch.ops._c10d_functional
    reduce = next(n for n in gm.graph.nodes if n.target is c10d.all_reduce.default and
                  n.args[0].target is torch.ops.aten.linear.default)
    (wait,) = reduce.users
    row = reduce.args[0]
    user = next(iter(wait.users))
    wait.replace_all_uses_with(row)
    gm.graph.erase_node(wait)
    gm.graph.erase_node(reduce)
    with pytest.raises(fxopt.PassError) as e:
        check(gm, 2)
    msg = str(e.value)
    assert f"inconsistent at %{user.name}" in msg and f"partial sums %{row.name}" in msg, msg


# =============================================================================================
# 4. Sharded loading, one process per rank planned here
# =============================================================================================


_from_ckpt = {}


def from_ckpt(ckpt, name: str, rank: int):
    """compile_from_checkpoint(tp=2, rank=rank) of a tiny checkpoint, once."""
    if (name, rank) not in _from_ckpt:
        _from_ckpt[name, rank] = compile_from_checkpoint(ckpt[name], SHARD, tp=2, rank=rank, dtype=torch.float32,
                                                         progress=False)
    return _from_ckpt[name, rank]


def _check_sharded_load(compiled, stats, family, rank, files) -> int:
    """Asserts what one rank's load read; returns the bytes it read of replicated tensors."""
    plan = fxopt.load_plan(compiled)
    text = str(plan)
    if family == "llama":
        for where, proj, n in (("self_attn", "q_proj", 24), ("self_attn", "k_proj", 8), ("mlp", "gate_proj", 40)):
            assert f"model.layers.1.{where}.{proj}.weight[{n * rank}:{n * (rank + 1)}]" in text
        assert f"model.layers.0.mlp.down_proj.weight[:, {40 * rank}:{40 * (rank + 1)}]" in text
        assert f"model.embed_tokens.weight[{51 * rank}:{min(101, 51 * (rank + 1))}]" in text
    else:  # Conv1D: stored [in, out], read transposed, one slice per q/k/v block
        for block in range(3):
            a = 48 * block + 24 * rank
            assert f"transformer.h.0.attn.c_attn.weight.T[{a}:{a + 24}]" in text
        assert f"lm_head.weight[{51 * rank}:{min(101, 51 * (rank + 1))}]" in text  # tied: read from wte
    split = [s for r in plan for s in r.sources if s.name is not None and s.slice is not None]
    whole = [s for r in plan for s in r.sources if s.name is not None and s.slice is None and s.name in files]
    assert len(split) >= 2 * 5 + 2
    # read whole on purpose only: 1-d norms and row-parallel biases, GPT-2's positions
    assert all(len(files.shape(s.name)) == 1 or s.name == "transformer.wpe.weight" for s in whole), whole
    held = sum(p.numel() * p.element_size() for p in compiled.graph_module.parameters())
    largest = max(files.nbytes(n) for n in files.weight_map)
    assert stats.bytes_read <= held and stats.bytes_read < 0.65 * stats.checkpoint_bytes, (stats, held)
    assert stats.peak_source_bytes <= min(largest, held)
    # the same weights as the eager model compiled with the same tp / rank
    eager, loaded = params(planned(family, 2, rank)), params(compiled)
    assert loaded.keys() == eager.keys()
    for key in eager:
        assert torch.equal(loaded[key], eager[key]), key
    return sum(files.nbytes(s.name) for s in whole)


def test_load_reads_only_this_ranks_slices(ckpt):
    """compile_from_checkpoint(tp=2, rank=r) of a one-file checkpoint reads only rank r's slices
    and gets the weights of the eager model sharded the same way; so does reloading the graph
    from the same model saved as an index and 5+ files."""
    for name in ("llama", "llama-sharded"):
        files = CheckpointFiles(ckpt[name])
        read = []
        for rank in (0, 1):
            compiled = from_ckpt(ckpt, "llama", rank)
            if name == "llama":
                stats = compiled.info.state["checkpoint"]
            else:
                assert len(files.files) > 3
                for p in compiled.graph_module.parameters():
                    p.data.zero_()
                stats = load_checkpoint(compiled, ckpt[name], progress=False)
                assert len(stats.files) == len(files.files)
            replicated = _check_sharded_load(compiled, stats, "llama", rank, files)
            read.append(stats.bytes_read)
        assert sum(read) <= stats.checkpoint_bytes + replicated, (read, stats.checkpoint_bytes)


def test_load_gpt2_transposed_blocks_and_tied_head(ckpt):
    files = CheckpointFiles(ckpt["gpt2"])
    compiled = from_ckpt(ckpt, "gpt2", 1)
    stats = compiled.info.state["checkpoint"]
    assert stats.tied == {"lm_head.weight": "transformer.wte.weight"}
    _check_sharded_load(compiled, stats, "gpt2", 1, files)




def test_bad_checkpoint_names_the_tensor_and_the_file(ckpt, tmp_path):
    compiled = from_ckpt(ckpt, "llama", 1)
    before = {k: v.clone() for k, v in params(compiled).items()}
    name = "model.layers.1.mlp.down_proj.weight"  # split by columns
    bad = _edited_copy(ckpt["llama"], tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(compiled, bad, progress=False)
    assert f"tensor '{name}'" in str(e.value) and str(bad / "model.safetensors") in str(e.value)
    # a wrong size along the split dim too: rank 1 would still find rows 8:16 in a [17, 48] tensor
    name = "model.layers.0.self_attn.k_proj.weight"
    for i, shape in enumerate([(17, 48), (16, 47)]):
        bad = _edited_copy(ckpt["llama"], tmp_path / f"shape{i}", lambda t: t.update({name: torch.zeros(shape)}))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(compiled, bad, progress=False)
        msg = str(e.value)
        assert f"tensor '{name}'" in msg and str(bad / "model.safetensors") in msg and str(list(shape)) in msg, msg
        assert "[16, 48]" in msg
    after = params(compiled)  # checked before anything was loaded: the graph is as it was
    assert all(torch.equal(after[k], v) for k, v in before.items())


# =============================================================================================
# 5. torchrun: numerics against TP=1
# =============================================================================================


# (fuse after shard is covered for every family by the single-process plans and test_shard_quantize;
# under torchrun once per family keeps CI short)
TP2_FAMILIES = ("llama", "llama+fuse", "gpt2+fuse", "opt")


def test_tp2_logits_and_tokens_equal_tp1(tp2):
    for spec in TP2_FAMILIES:
        family, _, fused = spec.partition("+")
        ranks = job(tp2, f"family={spec}")
        assert [r["stats"]["rank"] for r in ranks] == [0, 1]
        assert all(r["stats"]["column"] == COLUMNS_PER_LAYER[family] * 2 + 1 for r in ranks)
        assert ("fuse" in ranks[0]["passes"]) == bool(fused)
        assert all(0.45 < r["param_share"] < 0.65 for r in ranks), ranks
        assert_matches_reference(ranks[0]["payload"], reference_family(family, ranks[0]["payload"]))
    # tp_allreduce="symm_mem": fxopt.all_reduce (its reference: the functional all-reduce over gloo)
    ranks = job(tp2, "family=llama+fuse+symm")
    assert all(r["stats"]["all_reduce"] == 5 for r in ranks)
    assert_matches_reference(ranks[0]["payload"], reference_family("llama", ranks[0]["payload"]))


def test_tp_allreduce_symm_mem_emits_the_fxopt_op():
    compiled = fxopt.compile(tiny("llama"), passes=["canonicalize", "shard", "kv_cache", "dce"], tp=2, rank=0,
                             tp_allreduce="symm_mem", max_seq_len=32)
    ops = [n.target for n in compiled.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fxopt.all_reduce.default) == 5
    assert torch.ops._c10d_functional.all_reduce.default not in ops
    with pytest.raises(fxopt.PassError, match="tp_allreduce must be one of"):
        fxopt.compile(tiny("llama"), passes=["canonicalize", "shard"], tp=2, rank=0, tp_allreduce="mpi")


TP4_FAMILIES = ("gpt2", "llama", "llama-kv")  # all heads split; attention replicated; one shared kv head


def test_tp4_logits_and_tokens_equal_tp1(tp4):
    for family in TP4_FAMILIES:
        ranks = job(tp4, f"family={family}")
        assert [r["stats"]["rank"] for r in ranks] == [0, 1, 2, 3]
        if family == "llama":  # 6 heads on 4 ranks: attention replicated, the MLP split
            assert all(r["stats"]["replicated"] == 8 and r["stats"]["row"] == 2 for r in ranks)
        else:
            layers = 1 if family == "llama-kv" else 2
            assert all(r["stats"]["replicated"] == 0 and r["stats"]["row"] == 2 * layers for r in ranks)
            assert all(0.2 < r["param_share"] < 0.45 for r in ranks), ranks
        assert_matches_reference(ranks[0]["payload"], reference_family(family, ranks[0]["payload"]))


def test_tp3_splits_nine_heads_and_three_kv_heads(tp3, ckpt):
    """tp=3 divides SmolLM2's 9 heads and 3 kv heads: everything is split, each rank loads its
    slices (the tied LM head's rows too), and the logits and tokens are TP=1's. (The real SmolLM2
    runs sharded at tp=2 below, where its attention stays replicated.)"""
    ranks = job(tp3, f"checkpoint={ckpt['nine-heads']}")
    assert [r["stats"]["rank"] for r in ranks] == [0, 1, 2]
    assert all(r["stats"]["replicated"] == 0 and r["stats"]["row"] == 2 * 2 for r in ranks)
    assert all(r["stats"]["column"] == 2 * 5 + 1 for r in ranks)  # q, k, v, gate, up a layer; the LM head
    assert all(r["bytes_read"] < 0.5 * r["checkpoint_bytes"] for r in ranks)
    assert_matches_checkpoint(ranks[0]["payload"], ckpt["nine-heads"])


def test_tp2_every_rank_loads_its_slices_from_the_checkpoint(tp2, ckpt):
    ranks = job(tp2, f"checkpoint={ckpt['llama-sharded']}")
    files = CheckpointFiles(ckpt["llama-sharded"])
    assert all(r["files"] == len(files.files) > 3 for r in ranks)
    assert all(r["sliced_sources"] >= 2 * 7 + 2 for r in ranks)  # 7 linears a layer, embedding, LM head
    total = ranks[0]["checkpoint_bytes"]
    assert all(r["bytes_read"] < 0.65 * total and r["bytes_read"] <= r["local_bytes"] for r in ranks)
    assert sum(r["bytes_read"] for r in ranks) <= total + 2 * 5 * 48 * 4  # + the norms both read
    assert_matches_checkpoint(ranks[0]["payload"], ckpt["llama-sharded"])


def test_peak_host_memory_per_rank_while_loading(tp2, ckpt):
    """Each rank's resident-memory high-water mark while loading stays within its share of the
    checkpoint plus one tensor (+ 48 MiB of slack), below the whole checkpoint."""
    ranks = job(tp2, f"memory={ckpt['memory']}")
    files = CheckpointFiles(ckpt["memory"])
    largest = max(files.nbytes(n) for n in files.weight_map)
    total = sum(f.stat().st_size for f in files.files)
    assert total > 120 * 2**20
    for r in ranks:
        assert r["reset_ok"], r  # clear_refs reset the high-water mark
        assert r["logits_finite"] and r["logits_shape"] == [1, 5, 8192]
        assert r["checkpoint_bytes"] == total and r["bytes_read"] < 0.55 * total, r
        assert r["peak_source_bytes"] <= largest
        share = r["local_bytes"]
        assert 0.45 * total < share < 0.55 * total, (share, total)
        assert r["extra"] <= share + largest + 48 * 2**20, r
        assert r["extra"] < total, r
        print(f"rank {ranks.index(r)}: load peak +{r['extra'] / 2**20:.0f} MiB, holds {share / 2**20:.0f} MiB of a "
              f"{total / 2**20:.0f} MiB checkpoint (largest tensor {largest / 2**20:.0f} MiB)", file=sys.stderr)


# =============================================================================================
# 6. The real SmolLM2 (9 heads, 3 kv heads)
# =============================================================================================

_smollm2_reference = {}


def smollm2_reference(smollm2, payload):
    if not _smollm2_reference:
        model, tokenizer = smollm2
        single = fxopt.compile(model, REFERENCE, max_batch_size=2, max_seq_len=64)
        with one_thread():
            _smollm2_reference.update(tp_worker.run_smollm2(single, payload["ids"], payload["mask"],
                                                            payload["single"], tokenizer.pad_token_id))
    assert torch.equal(_smollm2_reference["ids"], payload["ids"])
    return _smollm2_reference


def _check_smollm2(ranks, smollm2):
    payload = ranks[0]["payload"]
    ref = smollm2_reference(smollm2, payload)
    assert payload["mask"].sum(1).tolist()[0] != payload["mask"].sum(1).tolist()[1]  # left padding in the batch
    errors = [rel_error(a, b) for a, b in zip(payload["logits"], ref["logits"])]
    assert len(errors) == 2 and max(errors) < 2e-5, errors  # (30 layers in fp32: ~3e-6)
    assert payload["tokens"].shape == (2, payload["ids"].shape[1] + 16)
    assert torch.equal(payload["tokens"], ref["tokens"])
    tokenizer = smollm2[1]
    assert "Paris" in tokenizer.decode(payload["tokens"][0, payload["ids"].shape[1]:])  # the real model, working
    assert all(r["bytes_read"] < 0.7 * r["checkpoint_bytes"] for r in ranks)


@pytest.mark.slow
def test_smollm2_tp2_replicated_attention_split_mlp(smollm2, tp2):
    """tp=2 divides neither 9 heads nor 3 kv heads: the attention stays replicated (the rule),
    the MLP is split, and the answer is the same."""
    key = next((k for k in tp2 if k.startswith("smollm2=")), None)
    assert key is not None, "the TP=2 launch did not run SmolLM2"
    ranks = job(tp2, key)
    for r in ranks:
        assert r["stats"]["replicated"] == 30 * 4  # q, k, v, o of every layer
        assert r["stats"]["row"] == 30 and r["stats"]["column"] == 30 * 2 + 1  # down; gate, up; + LM head
    _check_smollm2(ranks, smollm2)


# =============================================================================================
# 7. Failures end the run, in bounded time
# =============================================================================================


def test_a_rank_that_raises_fails_the_run(background):
    run = background["raise"].result()
    assert not run.timed_out and run.returncode != 0, run.tail()
    assert run.seconds < 60, run.tail()
    assert "rank 1: ready" in run.stderr and "injected failure on rank 1" in run.stderr, run.tail()


def test_a_rank_that_hangs_fails_the_run_after_the_timeout(background):
    """FXOPT_DIST_TIMEOUT=10: rank 0's all-reduce gives up after 10 s and the run ends."""
    run = background["hang"].result()
    assert not run.timed_out and run.returncode != 0, run.tail()
    assert run.seconds < 90, run.tail()
    assert "rank 0: ready" in run.stderr and "rank 1: ready" in run.stderr, run.tail()
    waited = float(run.stderr.split("the collective returned or failed after ")[1].split("s")[0])
    assert 9 <= waited < 60, run.tail()  # the 10 s timeout, not something else


# =============================================================================================
# 8. The command line
# =============================================================================================


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, smollm2_dir):
    """A tiny random llama with SmolLM2's tokenizer (vocabulary 49152)."""
    path = tmp_path_factory.mktemp("cli") / "tiny-llama"
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128, initializer_range=0.2,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    T.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / f, path / f)
    return path


def cli_args(model) -> list:
    return ["generate", "--model", str(model), "--prompt", "The capital of France is", "--max-new-tokens", "8"]


def test_cli_tp2_under_torchrun_prints_once(cli_model, background, capfd):
    """torchrun -m fxopt generate --tp 2 prints what --tp 1 prints, once (rank 0 only)."""
    from fxopt.cli import main as cli_main
    assert cli_main([*cli_args(cli_model), "--quiet"]) == 0  # TP=1, in this process
    expected = capfd.readouterr().out.strip()
    assert len(expected) > 8
    run = background["cli"].result()
    assert run.returncode == 0 and not run.timed_out, run.tail()
    assert run.stdout.count(expected) == 1, (expected, run.stdout)
    assert run.stdout.strip() == expected
    timing = [line for line in run.stderr.splitlines() if "tokens/s" in line]
    assert len(timing) == 1 and "tp 2" in timing[0], run.stderr  # rank 0's timing line only


def test_cli_tp_without_torchrun_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "fxopt", "generate", "--tp", "2", "--prompt", "hi"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxopt: error:") and "torchrun --nproc-per-node 2" in lines[0]
