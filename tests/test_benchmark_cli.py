"""benchmarks/decode.py's command line, which needs no GPU until it measures: settings are checked
before a run starts, and a saved run's table can be printed anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def decode_py(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--gemv", "foo=1"], "--gemv: linear_triton: unknown tile keys ['foo']"),
    (["--gemv", "preload=100"], "--gemv: linear_triton: preload must be 0 or a power of two >= 128"),
    (["--gemv", "trigger_steps"], "expected KEY=VALUE, got 'trigger_steps'"),
    (["--int8-gemv", "convert=nope"], "config convert must be one of"),
    (["--attn-preload", "48"], "--attn-preload: 0 or a power of two, got 48"),
    (["--attn-split-blocks", "4", "0"], "--attn-split-blocks: at least 1, got 0"),
    (["--no-eager"], "--no-eager: the prefill table needs its eager anchor; pass --prefill 0 too"),
    (["--int8-folded-rows", "16", "24"], "--int8-folded-rows: a power of two, got 24"),
])
def test_bad_settings_are_refused_before_a_run(args, message):
    result = decode_py(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_list_runs_names_every_combination_of_settings():
    result = decode_py("--variants", "fxopt", "fxopt-int8-nofold", "--gemv", "trigger_steps=1,preload=1024",
                       "--int8-gemv", "scales_ahead=1", "convert=magic", "--attn-split-blocks", "1", "8", "--list-runs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "fxopt{trigger_steps=1,preload=1024}+sb1",
        "fxopt{trigger_steps=1,preload=1024}+sb8",
        # INT8 settings only for INT8 variants, the bf16 GEMV's for every variant
        "fxopt-int8-nofold[scales_ahead=1]{trigger_steps=1,preload=1024}+sb1",
        "fxopt-int8-nofold[scales_ahead=1]{trigger_steps=1,preload=1024}+sb8",
        "fxopt-int8-nofold[convert=magic]{trigger_steps=1,preload=1024}+sb1",
        "fxopt-int8-nofold[convert=magic]{trigger_steps=1,preload=1024}+sb8",
    ]
    plain = decode_py("--variants", "fxopt", "--pdl", "off", "on", "--attn-preload", "64", "--list-runs")
    assert plain.stdout.split() == ["fxopt/off+ap64", "fxopt/on+ap64"]
    folded = decode_py("--variants", "fxopt", "fxopt-int8", "--int8-folded-rows", "8", "32", "--list-runs")
    assert folded.stdout.split() == ["fxopt", "fxopt-int8+fr8", "fxopt-int8+fr32"]


def test_int8_gemv_rows_picks_the_entry_the_settings_override(monkeypatch):
    result = decode_py("--variants", "fxopt-int8-nofold", "--int8-gemv-rows", "8", "--int8-gemv", "num_stages=4",
                       "block_n=32,num_stages=4", "--list-runs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fxopt-int8-nofold[m8:num_stages=4]",
                                     "fxopt-int8-nofold[m8:block_n=32,num_stages=4]"]
    refused = decode_py("--int8-gemv-rows", "5", "--int8-gemv", "num_stages=4")
    assert refused.returncode == 2 and "--int8-gemv-rows: invalid choice: 5" in refused.stderr

    # What a run applies: the 8-row entry changes, the one-row and larger entries do not; None restores.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import decode
    from fxopt.kernels import quant_triton
    monkeypatch.setitem(quant_triton.DECODE_TILES, 8, quant_triton.DECODE_TILES[8])
    before = {m: quant_triton.decode_tiles(m, 8) for m in (1, 5, 8, 16)}
    decode.set_int8_gemv((8, dict(block_n=32, num_stages=4)))
    after = {m: quant_triton.decode_tiles(m, 8) for m in (1, 5, 8, 16)}
    assert after[1] == before[1] and after[16] == before[16]
    for m in (5, 8):
        assert after[m] == {**before[m], "block_n": 32, "num_stages": 4} != before[m]
    decode.set_int8_gemv(None)
    assert {m: quant_triton.decode_tiles(m, 8) for m in (1, 5, 8, 16)} == before


def test_table_reprints_a_saved_run(tmp_path):
    rows = [dict(model="llama-1b", system="fxopt{trigger_steps=1,preload=1024}+ap64", batch=1, ms_per_token=0.913,
                 tokens_per_s=1095.3, floor_ms=0.58, pct_of_floor=63.5, compile_s=7.9, peak_GB=3.1, ready_s=11.2),
            dict(model="llama-1b", system="fxopt-int8", error="RuntimeError('out of memory')"),
            dict(model="llama-1b", system="fxopt", batch=8, ms_per_token=1.406, tokens_per_s=5690.7, floor_ms=0.829,
                 pct_of_floor=59.0, compile_s=9.2, peak_GB=4.0,
                 notes=["fuse near miss: gated_act:silu: matched 5 of 5 nodes; stopped at aten.mul"])]
    prefill = [dict(model="llama-1b", tokens=2048, hf_eager_ms=13.4, fxopt_ms=8.22, matmul_floor_ms=5.06),
               dict(model="llama-1b", tokens=2048, hf_eager_ms=13.4, fxopt_ms=8.41, matmul_floor_ms=5.06, in_place="off")]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "date": "2026-12-07"}, "decode": rows, "prefill": prefill}))
    result = decode_py("--table", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "gpu NVIDIA H200, date 2026-12-07"
    row = next(line for line in lines if "+ap64" in line).split()
    assert row == ["llama-1b", "fxopt{trigger_steps=1,preload=1024}+ap64", "1", "0.913", "1095.3", "0.580", "63.5%",
                   "7.9", "11.2", "3.1"]
    assert next(line for line in lines if " fxopt " in line).split()[-3:] == ["9.2", "-", "4.0"]  # a run of old: no ready
    assert any("fxopt-int8" in line and "ERROR" in line and "out of memory" in line for line in lines)
    assert [line.split(None, 3) for line in lines if "NOTE" in line] == [
        ["llama-1b", "fxopt", "NOTE", "fuse near miss: gated_act:silu: matched 5 of 5 nodes; stopped at aten.mul"]]
    assert any(line.split() == ["llama-1b", "2048", "13.4", "8.22", "5.06"] for line in lines)  # a run of old
    assert any(line.split() == ["llama-1b", "2048", "13.4", "8.41", "5.06", "residuals", "in", "place:", "off"]
               for line in lines)


def test_pipeline_notes_name_near_misses_and_re_propagations(monkeypatch):
    """What decode.py's table notes under a run: read from a real compile's report."""
    import fxopt
    from families import tiny
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import decode
    compiled = fxopt.compile(tiny("llama"), max_seq_len=32)
    assert decode.pipeline_notes(compiled.report()) == []
    record = next(r for r in compiled.report() if r.name == "fuse")
    monkeypatch.setitem(record.stats, "propagated_for", "%linear_2")
    monkeypatch.setitem(record.stats, "near_miss", "gated_act:silu: matched 5 of 5 nodes")
    assert decode.pipeline_notes(compiled.report()) == ["fuse near miss: gated_act:silu: matched 5 of 5 nodes",
                                                        "fuse propagated for: %linear_2"]


def _chrome_trace(path, names_grids, seed=0):
    """A Chrome trace of GPU kernels run back to back, random durations, 0.5 µs apart."""
    import random
    rng = random.Random(seed)
    events, t = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 1.0}], 0.0
    for name, grid in names_grids:
        dur = rng.uniform(1.0, 9.0)
        events.append({"cat": "kernel", "name": name, "ts": t, "dur": dur, "args": {"grid": list(grid)}})
        t += dur + 0.5
    rng.shuffle(events)  # the profiler does not promise start order
    path.write_text(json.dumps({"traceEvents": events}))
    return sorted((e for e in events if e["cat"] == "kernel"), key=lambda e: e["ts"])


def test_profile_step_finds_the_steps_and_the_layer(tmp_path):
    """benchmarks/profile_step.py's parsing: the decode steps at the end of a trace (after a
    prefill, before a few trailing kernels) and the decoder layer repeated inside them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step
    n_layers = 5
    layer = [("gemv", (512, 1, 1)), ("attention", (8, 32, 1)), ("merge", (32, 1, 1)), ("gemv", (512, 1, 1)),
             ("gemv", (1376, 1, 1)), ("gemv", (512, 1, 1))]
    step = [("embed", (1, 1, 1))] + layer * n_layers + [("norm", (1, 1, 1)), ("head", (4000, 1, 1)),
                                                        ("argmax", (1, 1, 1))]
    kernels = _chrome_trace(tmp_path / "trace.json", [("prefill", (9, 1, 1))] * 7 + step * 6 + [("cat", (1, 1, 1))] * 2)

    events = profile_step.kernel_events(str(tmp_path / "trace.json"))
    assert [e["ts"] for e in events] == [k["ts"] for k in kernels]
    steps = profile_step.decode_steps(events, n_layers)
    assert len(steps) == 5  # six steps, the first dropped
    assert all([(k["name"], k["grid"]) for k in s] == step for s in steps)
    last = kernels[7 + 5 * len(step):7 + 6 * len(step)]
    assert [k["dur"] for k in steps[-1]] == [k["dur"] for k in last]
    assert all(k["gap"] == pytest.approx(0.5) for s in steps for k in s)

    mean = profile_step.mean_step(steps)
    per_layer, rest = profile_step.layer_table(mean, n_layers)
    assert [(k["name"], k["grid"]) for k in per_layer] == layer
    assert [k["name"] for k in rest] == ["embed", "norm", "head", "argmax"]
    # The layer's o-projection (its 4th kernel): the mean over every layer of every step.
    o_proj = [k["dur"] for s in steps for i in range(n_layers) for k in [s[1 + 6 * i + 3]]]
    assert per_layer[3]["dur"] == pytest.approx(sum(o_proj) / len(o_proj))
    text = profile_step.report("m", "fxopt", 1, steps, layer_floor_us=50.0, step_floor_us=300.0, n_layers=n_layers)
    span = sum(k["dur"] + k["gap"] for k in mean)
    assert f"step: span {span:.1f} us" in text and "6 a layer x 5, 4 outside" in text


def test_profile_step_says_when_no_step_repeats(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step
    _chrome_trace(tmp_path / "trace.json", [(f"k{i}", (1, 1, 1)) for i in range(60)])
    with pytest.raises(RuntimeError, match="no repeating decode step"):
        profile_step.decode_steps(profile_step.kernel_events(str(tmp_path / "trace.json")), 4)


def test_profile_step_sums_a_prefills_kernels_by_name(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step
    names = [("gemm", (64, 32, 1)), ("norm", (2048, 1, 1)), ("gemm", (64, 86, 1)), ("attention", (32, 16, 1))] * 3
    kernels = _chrome_trace(tmp_path / "trace.json", names + [(f"odd{i}", (1, 1, 1)) for i in range(3)])
    events = profile_step.kernel_events(str(tmp_path / "trace.json"))
    totals = profile_step.kernel_totals(events)
    expected = {}
    for k in kernels:
        n, us = expected.get(k["name"], (0, 0.0))
        expected[k["name"]] = (n + 1, us + k["dur"])
    assert {name: (n, pytest.approx(us)) for name, n, us in totals} == expected
    assert [us for _, _, us in totals] == sorted((us for _, _, us in totals), reverse=True)
    assert totals[0][:2] == ("gemm", 6)
    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    text = profile_step.prefill_report("m", "fxopt", 2048, events, floor_us=span / 2, top=3)
    assert text.strip().splitlines()[1].split() == ["kernel", "n", "us", "share"]
    assert "(3 other kernels)" in text  # 6 names, 3 shown
    assert f"busy {busy / 1e3:.2f} ms, span {span / 1e3:.2f} ms" in text and "(2.00x)" in text


def test_compile_time_times_both_ways_of_capturing_the_same_graph(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import compile_time
    import transformers as T
    T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path)
    copied, whole = compile_time.one(str(tmp_path), False), compile_time.one(str(tmp_path), True)
    assert copied["layers"] == "model.layers: 3 of 5 layers traced, 2 copied"
    assert whole["layers"] == "every layer traced (trace_every_layer=True)"
    assert copied["nodes"] == whole["nodes"] and copied.keys() == whole.keys()
    assert all(copied[k] > 0 for k in ("total", "capture", "canonicalize", "fuse", "fold_linear"))
    assert copied["total"] > copied["capture"] + copied["fuse"]
    rows = [dict(model="tiny", way=way, median=r) for way, r in (("copied layers", copied), ("every layer traced", whole))]
    text = compile_time.table(rows)
    assert text.splitlines()[0].split()[:5] == ["model", "capture", "way", "total", "capture"]
    assert "tiny       copied layers" in text and "tiny       every layer traced" in text


def test_compile_time_refuses_an_unknown_model():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_time.py"), "--models", "gpt5"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 2 and "unknown model 'gpt5'" in result.stderr


def test_cold_start_table_and_kernel_count(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import cold_start
    for i, name in enumerate(["a/k.cubin", "a/k.json", "b/k.cubin", "c/other.ptx"]):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(str(i))
    assert cold_start.count_kernels(str(tmp_path)) == 2
    rows = [dict(model="llama2-7b", pipeline="bf16", way=way,
                 median={"compile": 8.04, "first generate": first, "ready": 8.04 + first, "kernels": 31,
                         "captures": first - 1.02, "dry runs": dry})
            for way, first, dry in (("ahead", 3.46, 1.24), ("one by one", 12.93, 0.0))]
    lines = cold_start.table(rows).splitlines()
    assert lines[0].split() == ["model", "weights", "kernels", "compiled", "compile", "s", "first", "generate", "s",
                                "ready", "s", "captures", "s", "dry", "runs", "s", "kernels"]
    assert lines[2].split() == ["llama2-7b", "bf16", "ahead", "8.0", "3.5", "11.5", "2.4", "1.2", "31"]
    assert lines[3].split() == ["llama2-7b", "bf16", "one", "by", "one", "8.0", "12.9", "21.0", "11.9", "0.0", "31"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cold_start_needs_a_gpu():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cold_start.py"), "--models", "llama-1b"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 2 and "a cold start is timed on a CUDA device; none is visible" in result.stderr


def test_cold_start_times_each_call_and_passes_results_and_errors_on(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import cold_start
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    spent = {"captures": 0.0}

    def step(x):
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    timed = cold_start._timed(spent, "captures", step)
    assert timed(3) == 6 and timed(x=4) == 8 and spent["captures"] > 0
    before = spent["captures"]
    with pytest.raises(ValueError, match="negative"):
        timed(-1)
    assert spent["captures"] >= before
