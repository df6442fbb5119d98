"""The `quantize` pass (INT8 / INT4 weight-only, grouped scales), its report, save/load, and the
tensor-parallel group rule; on tiny random models of every family and on the real SmolLM2.

Bounds on the tiny models come from measurements (tests/families.py draws weights with std 0.2):
a Gaussian weight quantized symmetrically loses ‖W − deq(Q)‖/‖W‖ ≈ 0.5–0.7 % at INT8 and
≈ 10–12 % at INT4 (round-off of max|w|/127 resp. /7 per group); two blocks amplify that to
≈ 1.5–2.2 % (INT8) and ≈ 25–39 % (INT4) on the logits. The bounds sit about 1.3× above the worst
measured value, far below the error of unrelated logits (≈ 1.4).
"""
import inspect
import importlib
import heapq
import re

import pytest
import torch
import transformers as T
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import fxopt
from families import VOCAB, tiny
from fxopt.ir import is_op
from fxopt.kernels.quant import dequantize_weight, quantize_weight
from fxopt.passes.quantize import (Quantize, QuantOptions, aligned_group_size, format_quant_report,
                                   group_aligned_split, head_linears, layer_error_estimate, quant_report,
                                   quantize_compiled, verify_bound)
from fxopt.quantized_io import QuantizedFileError, load_quantized, read_metadata, save_quantized
from fxopt.verify import rel_error
from test_generate import LENGTHS, left_padded_batch

aten = torch.ops.aten
QL = torch.ops.fxopt.quant_linear.default
PLAIN = ["canonicalize", "kv_cache", "quantize", "dce"]
FUSED = ["canonicalize", "kv_cache", "fuse", "quantize", "dce"]
BASE = ["canonicalize", "kv_cache", "fuse", "dce"]
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

LINEARS_PER_LAYER = {"llama": 7, "gpt2": 4, "opt": 6}  # q k v o gate up down | c_attn c_proj c_fc c_proj | q k v o fc1 fc2
FUSED_LINEARS_PER_LAYER = {"llama": 4, "gpt2": 4, "opt": 4}  # qkv o gate_up down | (gpt2 has nothing to fuse) | qkv o fc1 fc2
LOGITS_BOUND = {8: 3e-2, 4: 0.5}  # measured worst: 2.2e-2 / 3.9e-1 (llama, lm_head included)
LAYER_BOUND = {8: 9e-3, 4: 0.16}  # measured worst: 6.9e-3 / 1.24e-1 (gpt2, whole rows)

_cache = {}


def float_compiled(family, fused=True):
    """Each tiny family compiled once without `quantize` (fused or not); tests quantize copies of
    it with `quantize_compiled`, which runs the same pass without capturing again."""
    key = (family, fused)
    if key not in _cache:
        model = odd_llama() if family == "odd_llama" else tiny(family)
        passes = [p for p in (FUSED if fused else PLAIN) if p != "quantize"]
        _cache[key] = model, fxopt.compile(model, passes=passes, max_batch_size=4, max_seq_len=64)
    return _cache[key]


def quantized(family, fused=True, **options):
    model, base = float_compiled(family, fused)
    return model, quantize_compiled(base, **options)


def nodes(compiled, op):
    return [n for n in compiled.graph.nodes if is_op(n, op)]


def row(compiled, name="quantize"):
    return next(r for r in compiled.report() if r.name == name)


def odd_llama(hidden=100, intermediate=75):
    """In-features no group size divides: 100 (attention, gate/up) and 75 (down: odd, so INT4
    packs a half byte of padding)."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, initializer_range=0.2, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------
# Which linears
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_block_linears_are_quantized_and_the_lm_head_only_on_request(family):
    model, compiled = quantized(family, fused=False)
    qnodes = nodes(compiled, QL)
    (head,) = nodes(compiled, aten.linear)  # the LM head, and only it, stays float
    assert len(qnodes) == 2 * LINEARS_PER_LAYER[family]
    assert head.args[1].target == "lm_head.weight"
    assert all(n.args[1].meta["quant"]["of"].startswith(("model.", "transformer.")) for n in qnodes)
    state = compiled.info.state["quantize"]
    assert state["kept_float"] == [{"name": "lm_head.weight", "module": "lm_head", "node": head.name, "head": True,
                                    "reason": "head (quant_lm_head=False)"}]
    stats = row(compiled).stats
    assert stats["quantized"] == len(qnodes) and stats["kept_float"] == 1 and stats["bits"] == 8
    assert stats["group_size"] == 128
    float_weights = {n for n, _ in compiled.graph_module.named_parameters()}
    assert not any(n.split(".")[-2:] in (["q_proj", "weight"], ["c_attn", "weight"], ["fc1", "weight"],
                                        ["down_proj", "weight"]) for n in float_weights)

    _, with_head = quantized(family, fused=False, quant_lm_head=True)
    assert not nodes(with_head, aten.linear) and len(nodes(with_head, QL)) == len(qnodes) + 1
    assert quant_report(with_head)[-1]["head"] is True
    names = {n for n, _ in with_head.graph_module.named_parameters()}
    tied = family in ("gpt2", "opt")  # the embedding still reads the tied float weight
    assert ("lm_head.weight" in names) == tied
    assert rel_error(with_head(IDS).logits, model(IDS).logits) < LOGITS_BOUND[8]


def test_the_head_is_found_from_the_dataflow_not_the_name():
    class Net(torch.nn.Module):  # the head is called `a`; a block linear is called `lm_head`
        def __init__(self):
            super().__init__()
            self.lm_head, self.mid, self.a = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.a(torch.relu(self.mid(torch.relu(self.lm_head(x)))))

    compiled = fxopt.compile(Net(), passes=["canonicalize", "quantize", "dce"], example_inputs=(torch.randn(3, 16),))
    assert [n.args[1].target for n in nodes(compiled, aten.linear)] == ["a.weight"]
    assert [r["name"] for r in quant_report(compiled)] == ["lm_head.weight", "mid.weight"]
    assert [n.args[1].target for n in head_linears(compiled.graph_module)] == ["a.weight"]


def test_include_and_exclude_globs():
    _, attn_only = quantized("llama", fused=False, quant_exclude=["*.mlp.*"])
    assert {r["name"].split(".")[-2] for r in quant_report(attn_only)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    _, down = quantized("llama", fused=False, quant_include=["*.down_proj.weight"], quant_lm_head=True)
    assert [r["name"] for r in quant_report(down)] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    # a glob that splits a concatenated q/k/v weight: all or none, and the report says why
    _, split = quantized("llama", quant_exclude=["*.k_proj.weight"])
    kept = {k["name"]: k["reason"] for k in split.info.state["quantize"]["kept_float"]}
    assert kept["model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight"] == \
        "in quant_exclude (model.layers.0.self_attn.k_proj.weight)"
    assert len(quant_report(split)) == 2 * 3  # o, gate/up, down per layer
    _, partial = quantized("llama", quant_include=["*.q_proj.weight", "*.o_proj.weight"])
    assert [r["name"].split(".")[-2] for r in quant_report(partial)] == ["o_proj", "o_proj"]
    kept = {k["name"]: k["reason"] for k in partial.info.state["quantize"]["kept_float"]}
    assert kept["model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight"].startswith(
        "quant_include matches only model.layers.0.self_attn.q_proj.weight of the concatenated")


@pytest.mark.parametrize("options, message", [
    (dict(quant_bits=3), "quant_bits must be 8 or 4"),
    (dict(quant_group_size=0), "quant_group_size must be a positive int"),
    (dict(quant_group_size="big"), "quant_group_size must be a positive int"),
    (dict(quant_exclude=[3]), "quant_exclude must be a list"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(fxopt.PassError, match=message):
        quantized("llama", **options)


def test_group_size_spellings():
    parse = lambda **o: QuantOptions.from_ctx(fxopt.CompileContext(options=o))  # noqa: E731
    assert parse().group_size == 128 and parse().bits == 8 and not parse().lm_head
    assert parse(quant_group_size=None).group_size is None and parse(quant_group_size="row").group_label == "row"
    assert parse(quant_group_size="64").group_size == 64 and parse(quant_include="*.q_proj.*").include == ("*.q_proj.*",)


# ---------------------------------------------------------------------------------------------
# Fusion, accuracy, odd sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, qkv_rows", [("llama", 48 + 16 + 16), ("opt", 3 * 48)])
def test_fused_qkv_and_gate_up_are_quantized_as_one(family, qkv_rows):
    model, compiled = quantized(family, quant_group_size=32)
    qnodes = nodes(compiled, QL)
    assert len(qnodes) == 2 * FUSED_LINEARS_PER_LAYER[family] and len(nodes(compiled, aten.linear)) == 1
    qkv = next(n for n in qnodes if n.meta["fxopt"].get("pattern") == "qkv_concat")
    x, qweight, scales, bias, group, bits, in_features = qkv.args
    assert (group, bits, in_features) == (32, 8, 48)
    assert tuple(qweight.meta["val"].shape) == (qkv_rows, 48) and qweight.meta["val"].dtype == torch.int8
    assert tuple(scales.meta["val"].shape) == (qkv_rows, 2)  # ceil(48 / 32) groups: the last one 16 wide
    p = "model.layers.0.self_attn" if family == "llama" else "model.decoder.layers.0.self_attn"
    assert qweight.meta["param_sources"][0] == (f"{p}.q_proj.weight", 0, 48) == scales.meta["param_sources"][0]
    assert qweight.meta["quant"] == {"of": f"{p}.fused_q_proj_k_proj_v_proj_weight", "role": "qweight",
                                     "group_size": 32, "bits": 8, "in_features": 48}
    assert scales.meta["quant"]["role"] == "scales"
    assert qweight.target == f"{p}.fused_q_proj_k_proj_v_proj_qweight"
    if family == "llama":
        gate_up = next(n for n in qnodes if n.meta["fxopt"].get("pattern") == "gate_up_concat")
        assert tuple(gate_up.args[1].meta["val"].shape) == (2 * 80, 48)
        assert any(is_op(u, torch.ops.fxopt.gated_act) for u in gate_up.users)
    # the concatenated weight is quantized row by row exactly as its parts would be
    layer = model.model.layers[0].self_attn if family == "llama" else model.model.decoder.layers[0].self_attn
    q_alone, s_alone = quantize_weight(layer.q_proj.weight.detach(), 32)
    gm = compiled.graph_module
    assert torch.equal(gm.get_buffer(qweight.target)[:48], q_alone)
    assert torch.equal(gm.get_buffer(scales.target)[:48], s_alone)
    _, plain = quantized(family, fused=False, quant_group_size=32)
    torch.testing.assert_close(compiled(IDS).logits, plain(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_outputs_stay_close_to_float(family):
    model, _ = float_compiled(family)
    want = model(IDS).logits
    errors = {}
    for bits in (8, 4):
        for group in (32, 128, "row"):
            _, compiled = quantized(family, quant_bits=bits, quant_group_size=group, quant_lm_head=group == 32)
            errors[bits, group] = err = rel_error(compiled(IDS).logits, want)
            assert 0 < err < LOGITS_BOUND[bits], (bits, group, err)
            stats = row(compiled).stats
            assert float(stats["max_output_rel_err"]) < LAYER_BOUND[bits]
            assert float(stats["max_weight_rel_err"]) < LAYER_BOUND[bits]
            # one scale per group of the input features: ceil(in / group), whole rows for "row"
            for r in quant_report(compiled):
                g = r["in_features"] if group == "row" else group
                assert r["group_size"] == g and r["n_groups"] == -(-r["in_features"] // g)
    assert max(errors[8, g] for g in (32, 128, "row")) < 0.2 * min(errors[4, g] for g in (32, 128, "row"))


def test_quantize_compiled_equals_compiling_with_the_pass():
    model, copy = quantized("opt", quant_group_size=32, quant_lm_head=True)
    direct = fxopt.compile(model, passes=FUSED, max_seq_len=64, quant_group_size=32, quant_lm_head=True)
    assert torch.equal(copy(IDS).logits, direct(IDS).logits)
    _, base = float_compiled("opt")
    assert "quantize" not in base.info.state and not nodes(base, QL), "the float compilation is left alone"
    with pytest.raises(fxopt.PassError, match="quantized already"):
        quantize_compiled(copy)


@pytest.mark.parametrize("bits", [8, 4])
def test_in_features_the_group_size_does_not_divide(bits):
    model, _ = float_compiled("odd_llama")
    want = model(IDS).logits
    for group in (32, 64, 128, "row"):
        _, compiled = quantized("odd_llama", quant_bits=bits, quant_group_size=group, quant_lm_head=True)
        err = rel_error(compiled(IDS).logits, want)
        assert err < LOGITS_BOUND[bits], (group, err)
        down = next(r for r in quant_report(compiled) if r["name"].endswith("down_proj.weight"))
        gm = compiled.graph_module
        q, s = gm.get_buffer(down["qweight"]), gm.get_buffer(down["scales"])
        g = 75 if group == "row" else group
        assert s.shape == (100, -(-75 // g))
        assert q.shape == ((100, 75) if bits == 8 else (100, 38))  # two values a byte: 75 → 38 bytes
        assert down["output_rel_err"] < LAYER_BOUND[bits]


def test_report_meta_and_dumps(tmp_path):
    model = tiny("llama")
    compiled = fxopt.compile(model, passes=FUSED, max_seq_len=64, quant_group_size=32, dump_dir=tmp_path)
    stats = row(compiled).stats
    assert set(stats) == {"quantized", "bits", "group_size", "kept_float", "weight_MiB_before", "weight_MiB_after",
                          "max_weight_rel_err", "max_output_rel_err", "worst"}
    rows = quant_report(compiled)
    assert len(rows) == 8 and stats["worst"] == max(rows, key=lambda r: r["output_rel_err"])["name"]
    assert float(stats["max_output_rel_err"]) == pytest.approx(max(r["output_rel_err"] for r in rows), rel=1e-2)
    for r in rows:
        assert 1e-3 < r["weight_rel_err"] < LAYER_BOUND[8] and 1e-3 < r["output_rel_err"] < LAYER_BOUND[8]
        assert r["quant_bytes"] < 0.3 * r["float_bytes"]  # int8 + fp32 scales vs fp32
    # the weight error is what it says: recompute one from the float weight
    r = rows[-1]
    gm = compiled.graph_module
    w = model.get_parameter(r["name"]).detach()
    deq = dequantize_weight(gm.get_buffer(r["qweight"]), gm.get_buffer(r["scales"]), 32, 8, r["in_features"],
                            torch.float32)
    assert r["weight_rel_err"] == pytest.approx(float((w - deq).norm() / w.norm()), rel=1e-5)
    node = next(n for n in nodes(compiled, QL) if n.name == r["node"])
    assert node.meta["fxopt"]["quant"] == "int8 g32" and node.meta["fxopt"]["out_err"] == f"{r['output_rel_err']:.2e}"
    listing = (tmp_path / "04_quantize.txt").read_text()
    assert "fxopt.quant_linear" in listing and "quant=int8 g32" in listing and "out_err=" in listing
    assert "max_output_rel_err=" in str(compiled.report())
    assert "down_proj.weight" in format_quant_report(rows)


def test_generate_after_quantize():
    _, base = float_compiled("llama")
    ids, mask = left_padded_batch(LENGTHS)
    want = base.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    sequences = [seq[m.bool().tolist() + [True] * 24] for seq, m in zip(want, mask)]
    float_choice = [lg.argmax(-1) for lg in continuation_logits(base, sequences, 24)]
    for bits, least in ((8, 0.8), (4, 0.2)):  # measured: 0.875 .. 1.0 and 0.33 .. 0.67
        _, compiled = quantized("llama", quant_bits=bits, quant_group_size=32)
        got = compiled.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
        assert got.shape == want.shape and torch.equal(got[:, :9], ids)
        if bits == 8:
            assert torch.equal(got[:, 9:12], want[:, 9:12])  # free running: the first tokens are the same
        choice = continuation_logits(compiled, sequences, 24)
        agreement = [float((c.argmax(-1) == f).float().mean()) for c, f in zip(choice, float_choice)]
        assert min(agreement) >= least, agreement  # greedy agreement, defined at `smol` below


def bf16_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def test_weight_memory_against_bf16_at_group_128():
    base = fxopt.compile(bf16_llama(), passes=["canonicalize", "kv_cache", "fuse", "dce"], max_seq_len=64)
    for bits, low, high in ((8, 0.50, 0.56), (4, 0.25, 0.29)):
        compiled = quantize_compiled(base, quant_bits=bits)
        rows = quant_report(compiled)
        ratio = sum(r["quant_bytes"] for r in rows) / sum(r["bf16_bytes"] for r in rows)
        assert low <= ratio <= high, ratio  # int8: (128 + 2) / 256 = 0.508; int4: (64 + 2) / 256 = 0.258
        gm = compiled.graph_module
        stored = sum(gm.get_buffer(r["qweight"]).nbytes + gm.get_buffer(r["scales"]).nbytes for r in rows)
        assert stored == sum(r["quant_bytes"] for r in rows)
        assert gm.get_buffer(rows[0]["scales"]).dtype == torch.bfloat16
        assert compiled(IDS).logits.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Meta device, save and load
# ---------------------------------------------------------------------------------------------


def meta_copy(model):
    with torch.device("meta"):
        return type(model)(model.config)


def test_a_meta_model_is_planned_with_placeholders():
    model, plain = quantized("llama", quant_group_size=64)
    compiled = fxopt.compile(meta_copy(model), passes=FUSED, max_seq_len=64, quant_group_size=64)
    stats = row(compiled).stats
    assert stats["placeholders"] == stats["quantized"] == 8 and "max_weight_rel_err" not in stats
    gm, ref = compiled.graph_module, plain.graph_module
    for r, want in zip(quant_report(compiled), quant_report(plain)):
        for key in ("qweight", "scales"):
            got, exp = gm.get_buffer(r[key]), ref.get_buffer(want[key])
            assert got.is_meta and (got.shape, got.dtype) == (exp.shape, exp.dtype)
        assert r["weight_rel_err"] is None and r["output_rel_err"] is None
    qnode = nodes(compiled, QL)[0].args[1]
    assert qnode.meta["quant"]["role"] == "qweight" and qnode.meta["param_sources"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    # gpt2: tied embedding, Conv1D weights transposed at compile time, biases; the head quantized too
    model, compiled = quantized("gpt2", quant_group_size=32, quant_lm_head=True)
    path = save_quantized(compiled, tmp_path_factory.mktemp("q") / "gpt2.safetensors")
    return model, compiled, path


def test_save_then_load_gives_identical_logits(saved):
    model, compiled, path = saved
    meta = read_metadata(path)
    assert meta["bits"] == "8" and meta["group_size"] == "32" and meta["passes"] == BASE + ["quantize", "dce"]
    assert meta["fxopt_version"] == fxopt.__version__ and len(meta["layers"]) == 9
    assert meta["aliases"] == {}  # the tied weight is read through one get_attr
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("transformer.h.0.attn.c_attn.qweight").get_dtype() == "I8"
        assert "transformer.h.0.attn.c_attn.weight" not in f.keys()
    for source in (model, meta_copy(model)):
        loaded = load_quantized(source, path)
        assert torch.equal(loaded(IDS).logits, compiled(IDS).logits)
        ids, mask = left_padded_batch(LENGTHS)
        assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0),
                           compiled.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0))
        assert quant_report(loaded)[0]["weight_rel_err"] == quant_report(compiled)[0]["weight_rel_err"]
        assert loaded.info.state["quantize"]["loaded"] == str(path)


def test_load_a_meta_llama_with_int4(tmp_path):
    model, compiled = quantized("llama", quant_bits=4, quant_group_size=64)
    path = save_quantized(compiled, tmp_path / "llama.safetensors")
    loaded = load_quantized(meta_copy(model), path, max_seq_len=32)
    assert loaded.kv_cache["max_seq_len"] == 32
    assert torch.equal(loaded(IDS).logits, compiled(IDS).logits)
    assert not any(t.is_meta for t in loaded.graph_module.state_dict().values())
    with pytest.raises(QuantizedFileError, match="quant_bits=4"):
        load_quantized(meta_copy(model), path, quant_bits=8)


def rewrite(path, out, drop=None, change=None):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    if drop:
        del tensors[drop]
    if change:
        tensors[change] = tensors[change][:-1].clone()
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_missing_misshapen_or_corrupt_tensors_are_named(saved, tmp_path):
    model, _compiled, path = saved
    name = "transformer.h.1.mlp.c_fc.scales"
    missing = rewrite(path, tmp_path / "missing.safetensors", drop=name)
    with pytest.raises(QuantizedFileError, match=re.escape(f"{missing}: no tensor '{name}'")):
        load_quantized(meta_copy(model), missing)
    short = rewrite(path, tmp_path / "short.safetensors", change=name)
    with pytest.raises(QuantizedFileError, match=re.escape(f"{short}: tensor '{name}' has shape [191, 2]")):
        load_quantized(meta_copy(model), short)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # a truncated download
    with pytest.raises(QuantizedFileError, match=re.escape(f"{broken}: not a readable safetensors file")):
        load_quantized(meta_copy(model), broken)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(QuantizedFileError, match="not an fxopt quantized file"):
        load_quantized(meta_copy(model), plain)
    with pytest.raises(QuantizedFileError, match="no such file"):
        load_quantized(meta_copy(model), tmp_path / "nowhere.safetensors")
    with pytest.raises(QuantizedFileError, match="was not compiled with the 'quantize' pass"):
        save_quantized(float_compiled("gpt2")[1], tmp_path / "f.safetensors")


# ---------------------------------------------------------------------------------------------
# verify=True: quantize declares its tolerance (Pass.tolerance, verify_bound)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("bits", [8, 4])
def test_verify_passes_with_quantize(family, bits):
    """The pass is checked against the graph before it with its declared bound; dce after it
    tightly against the quantized graph; the report shows both errors."""
    compiled = fxopt.compile(tiny(family), passes=FUSED, verify=True, max_seq_len=64, quant_bits=bits)
    by_name = {r.name: r for r in compiled.report()}
    q, dce = by_name["quantize"], by_name["dce"]
    assert q.approximate and q.reference == "eager"
    assert q.tolerance == pytest.approx(verify_bound(compiled.ctx, torch.float32))
    assert LOGITS_BOUND[bits] / 20 < q.step_error < q.tolerance, (q.step_error, q.tolerance)  # measured 1.3e-2 .. 0.41
    assert q.max_error == pytest.approx(q.step_error, rel=1e-2)  # the exact passes before it add ~1e-7
    assert not dce.approximate and dce.reference == "quantize" and dce.tolerance == 1e-4 and dce.step_error < 1e-6
    assert dce.max_error == pytest.approx(q.max_error, rel=1e-3)
    assert all(r.reference == "eager" and r.max_error < 1e-4 for r in compiled.report()[:3])
    text = str(compiled.report())
    assert f"{q.tolerance:.2e}*" in text and "step err" in text


def test_verify_bound_follows_bits_and_group_size():
    """The bound grows with the step: INT4 ≈ 18x INT8 (127 / 7), larger groups a little (their max
    |w| grows like √(2 ln g)); a whole row counts as a group of its in-features; the dtype's own
    tolerance is added; quant_verify_tolerance overrides it."""
    bound = lambda dtype=torch.float32, **o: verify_bound(fxopt.CompileContext(options=o), dtype)  # noqa: E731
    assert 0.03 < bound(quant_group_size=32) < bound(quant_group_size=64) < bound() < 0.05  # INT8 g128: 0.042
    assert 0.6 < bound(quant_bits=4, quant_group_size=32) < bound(quant_bits=4) < 0.8
    assert bound(quant_bits=4) / bound() == pytest.approx(127 / 7, rel=0.02)
    assert bound(torch.bfloat16) == pytest.approx(bound() - 1e-4 + 2e-2)
    assert bound(quant_verify_tolerance=0.01) == 0.01
    assert layer_error_estimate(8, 128) == pytest.approx(7.07e-3, rel=1e-2)  # the measured weight errors: 5-9e-3
    # after a run, the largest group actually used: rows of 48 and 80 at g128 / "row"
    _, compiled = quantized("llama", quant_group_size="row")
    assert verify_bound(compiled.ctx, torch.float32) == pytest.approx(6 * layer_error_estimate(8, 80) + 1e-4)


class QuantizeWithBadScales(Quantize):
    """A quantize-like pass with a bug: one layer's scales 1.5x too large (its weight dequantizes
    1.5x too large), declaring quantize's tolerance."""
    name = "quantize_bad_scales"

    def __init__(self, weight: str):
        self.weight = weight

    def run(self, gm, ctx):
        result = super().run(gm, ctx)
        layer = next(r for r in ctx.info.state["quantize"]["layers"] if r["name"] == self.weight)
        with torch.no_grad():
            gm.get_buffer(layer["scales"]).mul_(1.5)
        return result


def test_verify_catches_a_broken_quantize_pass_and_names_the_node():
    bad = QuantizeWithBadScales("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(fxopt.VerificationError) as e:
        fxopt.compile(tiny("llama"), passes=["canonicalize", "kv_cache", "fuse", bad, "dce"], verify=True,
                      max_seq_len=64)
    msg = str(e.value)
    assert "after pass 'quantize_bad_scales', output 0 diverges from the graph before it by more than the pass " \
           "declares it may" in msg, msg
    err, bound = map(float, re.search(r"relative error ([\d.e-]+) > ([\d.e-]+)", msg).groups())
    assert 0.1 < err and bound == pytest.approx(verify_bound(fxopt.CompileContext(), torch.float32), rel=0.1)
    # the layer itself, not a node downstream of it: its quant_linear against the linear it replaced
    assert re.search(r"first diverging node: %quant_linear_default_\d+ \(fxopt.quant_linear.default in "
                     r"model.layers.1.mlp.down_proj\): relative error 0.5\d* against %linear_\d+, which it replaced",
                     msg), msg


def test_verify_holds_an_exact_pass_after_quantize_to_the_tight_tolerance():
    """A pass after quantize that moves the logits by ~1e-3 — 40x inside quantize's bound — is
    caught at fp32's 1e-4 against the quantized graph, and the node is named."""
    def nudge(gm):
        last = [n for n in gm.graph.nodes if is_op(n, QL)][-1]
        with gm.graph.inserting_after(last):
            scaled = gm.graph.call_function(aten.mul.Tensor, (last, 1.002))
        last.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        return gm

    with pytest.raises(fxopt.VerificationError) as e:
        fxopt.compile(tiny("llama"), passes=["canonicalize", "kv_cache", "fuse", "quantize", nudge, "dce"],
                      verify=True, max_seq_len=64)
    msg = str(e.value)
    assert "after pass 'nudge', output 0 diverges from the graph after 'quantize'" in msg and "> 0.0001" in msg, msg
    err = float(re.search(r"relative error ([\d.e-]+)", msg).group(1))
    assert 1e-4 < err < 2e-3
    assert ("first diverging node: %mul_tensor (aten.mul.Tensor): relative error 0.002 against "
            "%quant_linear_default_7, which it replaced") in msg


@pytest.mark.slow
def test_smollm2_verify_with_int8(smollm2):
    """The real model at INT8 g64, where the measured error sits closest to the bound (1.5x)."""
    model, _ = smollm2
    compiled = fxopt.compile(model, passes=FUSED, verify=True, max_batch_size=2, max_seq_len=16, quant_group_size=64)
    q = next(r for r in compiled.report() if r.name == "quantize")
    print(f"\nSmolLM2 verify int8 g64: logits error {q.step_error:.3e}, bound {q.tolerance:.3e}")
    assert q.approximate and 1e-2 < q.step_error < q.tolerance / 1.3  # measured 2.6e-2 against 3.9e-2
    assert compiled.report()[-1].reference == "quantize" and compiled.report()[-1].step_error < 1e-6


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: where a row-parallel split may cut
# ---------------------------------------------------------------------------------------------


def test_group_aligned_split_examples():
    even = group_aligned_split(1536, 128, 2)
    assert even.even and even.bounds == ((0, 768), (768, 1536)) and even.groups == ((0, 6), (6, 12))
    smol = group_aligned_split(576, 128, 2)  # 4.5 groups: the cut goes to the boundary nearest 288
    assert not smol.even and smol.bounds == ((0, 256), (256, 576)) and smol.groups == ((0, 2), (2, 5))
    assert group_aligned_split(576, 32, 2).even and aligned_group_size(576, 2) == 32
    assert aligned_group_size(1536, 4) == 128 and aligned_group_size(100, 3) is None
    with pytest.raises(ValueError, match="only 1 group"):
        group_aligned_split(576, "row", 2)
    with pytest.raises(ValueError, match="odd"):
        group_aligned_split(99, 33, 3, bits=4)


@settings(max_examples=60, deadline=None)
@given(in_features=st.integers(2, 300), group=st.sampled_from([2, 4, 8, 32, 64, 128]), parts=st.integers(1, 4),
       bits=st.sampled_from([8, 4]))
def test_a_group_aligned_split_computes_what_the_whole_weight_does(in_features, group, parts, bits):
    try:
        split = group_aligned_split(in_features, group, parts, bits)
    except ValueError:
        assert parts > -(-in_features // group)
        return
    assert split.bounds[0][0] == 0 and split.bounds[-1][1] == in_features
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(split.bounds, split.bounds[1:] + ((in_features, 0),)))
    assert all(s % group == 0 for s, _ in split.bounds)
    gen = torch.Generator().manual_seed(in_features)
    w, x = torch.randn(6, in_features, generator=gen), torch.randn(3, in_features, generator=gen)
    q, s = quantize_weight(w, group, bits)
    whole = x @ dequantize_weight(q, s, group, bits, in_features, torch.float32).T
    total = torch.zeros_like(whole)
    for (start, end), (g0, g1) in zip(split.bounds, split.groups):
        q_part = q[:, start:end] if bits == 8 else q[:, start // 2:-(-end // 2)]
        part = dequantize_weight(q_part, s[:, g0:g1], group, bits, end - start, torch.float32)
        total += x[:, start:end] @ part.T
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2
# ---------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
NEW_TOKENS = 128
TEXT_TOKENS = 1024


def english_text() -> str:
    """Real English prose available offline: the essay on heaps in ``heapq.__about__`` and the
    module docstrings of a few standard-library modules, paragraph by paragraph, leaving out
    diagrams, tables and code (paragraphs of < 12 words or < 93 % letters and punctuation)."""
    docs = [heapq.__about__] + [inspect.getdoc(importlib.import_module(name)) for name in
                                ("socketserver", "copy", "subprocess", "json", "csv", "uuid", "http.cookiejar",
                                 "pydoc")]
    paragraphs = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            if len(text.split()) >= 12 and sum(c.isalpha() or c in " ,.;:'\"()-" for c in text) >= 0.93 * len(text):
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def perplexity(compiled, ids) -> float:
    with torch.no_grad():
        logits = compiled(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp())


def continuation_logits(compiled, sequences, new_tokens) -> list:
    """Per sequence (prompt + the float model's greedy continuation), the logits that choose each
    of the ``new_tokens`` continuation tokens, all in one forward (teacher forcing)."""
    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = compiled(input_ids=seq[None], position_ids=torch.arange(len(seq))[None]).logits[0]
            out.append(logits[-new_tokens - 1:-1].float())
    return out


@pytest.fixture(scope="module")
def smol(smollm2):
    """SmolLM2 compiled once in float; each quantized configuration is a `quantize_compiled` copy
    of it, measured once and dropped. Greedy token agreement (the metric asserted below): the
    float model generates NEW_TOKENS greedy tokens for each prompt; then, at each of those
    positions, given the same prefix, does the quantized model choose the same token as the float
    model? The fraction of positions where it does. (Comparing two free-running generations
    position by position instead counts every position after the first fork as a miss, and
    SmolLM2 forks at near-ties: INT8 g64 gives 0.18 / 0.06 / 0.62 that way, the fork of prompt 2 at
    its 5th token where the float model's top two logits are 0.10 apart; see docs/quantization.md.)"""
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    text = tokenizer(english_text(), return_tensors="pt").input_ids[:, :TEXT_TOKENS]
    assert text.shape[1] == TEXT_TOKENS
    base = fxopt.compile(model, passes=BASE, max_batch_size=len(PROMPTS), max_seq_len=TEXT_TOKENS)
    out = base.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=NEW_TOKENS,
                        eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    sequences = [seq[mask.bool().tolist() + [True] * NEW_TOKENS] for seq, mask in zip(out, batch.attention_mask)]
    float_logits = continuation_logits(base, sequences, NEW_TOKENS)
    float_choice = [lg.argmax(-1) for lg in float_logits]
    top2 = [lg.topk(2, dim=-1).values for lg in float_logits]
    margins = [t[:, 0] - t[:, 1] for t in top2]
    float_ppl = perplexity(base, text)
    results = {}

    def measure(bits, group):
        if (bits, group) not in results:
            q = quantize_compiled(base, quant_bits=bits, quant_group_size=group)
            choice = [lg.argmax(-1) for lg in continuation_logits(q, sequences, NEW_TOKENS)]
            rows = quant_report(q)
            results[bits, group] = dict(
                agreement=[float((c == f).float().mean()) for c, f in zip(choice, float_choice)],
                fork_margin=max([float(m[c != f].max()) for c, f, m in zip(choice, float_choice, margins)
                                 if (c != f).any()], default=0.0),
                ppl=perplexity(q, text), float_ppl=float_ppl, layers=rows, stats=row(q).stats,
                memory=sum(r["quant_bytes"] for r in rows) / sum(r["bf16_bytes"] for r in rows))
        return results[bits, group]

    return measure


def _say(bits, group, r):
    print(f"\nSmolLM2 int{bits} g{group}: greedy agreement {[round(a, 3) for a in r['agreement']]}, largest float "
          f"margin where they differ {r['fork_margin']:.3f}, perplexity {r['float_ppl']:.4f} -> {r['ppl']:.4f} "
          f"({100 * (r['ppl'] / r['float_ppl'] - 1):+.3f} %), weights {r['memory']:.4f}x bf16, {r['stats']}")


@pytest.mark.slow
@pytest.mark.parametrize("group", [64, 128])
def test_smollm2_int8_greedy_agreement_and_perplexity(smol, group):
    r = smol(8, group)
    _say(8, group, r)
    assert len(r["layers"]) == 30 * 4 and {x["in_features"] for x in r["layers"]} == {576, 1536}  # qkv o gate_up down
    assert min(r["agreement"]) >= 0.9, r["agreement"]  # measured: 0.969 .. 0.992
    assert r["fork_margin"] < 0.5  # INT8 only flips near-ties (measured: <= 0.27 logits)
    assert abs(r["ppl"] / r["float_ppl"] - 1) < 0.005  # measured: +0.01 % (g64), +0.28 % (g128)
    assert 0.50 <= r["memory"] <= 0.54  # fp32 scales: (64 + 4) / 128 = 0.531, (128 + 4) / 256 = 0.516


@pytest.mark.slow
@pytest.mark.parametrize("group", [64, 128])
def test_smollm2_int4_numbers(smol, group):
    r = smol(4, group)
    _say(4, group, r)
    # reported, loosely bounded: round-to-nearest INT4 without calibration costs real accuracy on a
    # 135M model (measured: perplexity +52 % at g64, +68 % at g128; agreement 0.54 .. 0.80)
    assert r["ppl"] / r["float_ppl"] < 2.0 and min(r["agreement"]) >= 0.4
    assert 0.25 <= r["memory"] <= 0.29
