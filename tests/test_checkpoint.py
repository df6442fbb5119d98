"""Checkpoint loading (fxopt.checkpoint): load plans, safetensors reading, compile_from_checkpoint.

Every comparison is against ``fxopt.compile`` of the eagerly loaded model with the same passes:
the weights are the same bits, so the logits must be equal, not close.
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
import transformers as T
from safetensors.torch import load_file, save_file

import fxopt
from families import VOCAB, tiny
from fxopt.checkpoint import (CheckpointError, CheckpointFiles, Slice, compile_from_checkpoint, compile_on_meta,
                              load_checkpoint, load_plan, parameters_on_meta, retarget_device)

PLAIN = ["canonicalize", "kv_cache", "dce"]
FUSED = ["canonicalize", "kv_cache", "fuse", "dce"]
OPTS = dict(max_batch_size=2, max_seq_len=48)
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family → a directory with the tiny model saved as one model.safetensors (and 'llama-sharded':
    the same llama in shards with an index)."""
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {}
    for family in ("llama", "gpt2", "opt"):
        dirs[family] = root / family
        tiny(family).save_pretrained(dirs[family], safe_serialization=True)
    dirs["llama-sharded"] = root / "llama-sharded"
    tiny("llama").save_pretrained(dirs["llama-sharded"], safe_serialization=True, max_shard_size="20KB")
    return dirs


_eager = {}


def eager_compiled(ckpt, family, passes, dtype=torch.float32, **options):
    """fxopt.compile of the model loaded eagerly by transformers from the same directory."""
    key = (family, tuple(passes), dtype, tuple(sorted(options.items())))
    if key not in _eager:
        model = T.AutoModelForCausalLM.from_pretrained(ckpt[family], dtype=dtype).eval()
        _eager[key] = fxopt.compile(model, passes, **OPTS, **options)
    return _eager[key]


def assert_same(ours, theirs):
    assert torch.equal(ours(IDS).logits, theirs(IDS).logits)
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(IDS, **kw), theirs.generate(IDS, **kw))


def no_meta_left(compiled):
    gm = compiled.graph_module
    return [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.device.type == "meta"]


# ---------------------------------------------------------------------------------------------
# compile_from_checkpoint == fxopt.compile(eagerly loaded model)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,passes", [("llama", PLAIN), ("llama", FUSED), ("gpt2", PLAIN), ("gpt2", FUSED),
                                           ("opt", FUSED)], ids=["llama-plain", "llama-fuse", "gpt2-plain",
                                                                 "gpt2-fuse", "opt-fuse"])
def test_same_logits_and_tokens_as_eager(ckpt, family, passes):
    ours = compile_from_checkpoint(ckpt[family], passes, dtype=torch.float32, progress=False, **OPTS)
    assert not no_meta_left(ours)
    caches = [getattr(ours.graph_module, n) for pair in ours.kv_cache["layers"] for n in pair]
    assert all(c.device.type == "cpu" and not c.any() for c in caches)  # re-allocated as zeros
    assert_same(ours, eager_compiled(ckpt, family, passes))
    stats = ours.info.state["checkpoint"]
    assert stats.recipes > 0 and stats.bytes_read > 0
    if family in ("gpt2", "opt"):  # lm_head is tied to the input embedding and not in the file
        assert "lm_head.weight" not in load_file(ckpt[family] / "model.safetensors")
        assert set(stats.tied) == {"lm_head.weight"}
    if family == "gpt2":  # Conv1D weights stored [in, out], transposed by the recipe
        recipe = load_plan(ours).recipe_for("transformer.h.0.attn.c_attn.weight")
        assert recipe.sources[0].transpose


def test_sharded_checkpoint_with_index(ckpt):
    files = CheckpointFiles(ckpt["llama-sharded"])
    assert files.path.name == "model.safetensors.index.json" and len(files.files) > 3
    ours = compile_from_checkpoint(ckpt["llama-sharded"], FUSED, dtype=torch.float32, progress=False, **OPTS)
    assert len(ours.info.state["checkpoint"].files) == len(files.files)
    assert_same(ours, eager_compiled(ckpt, "llama", FUSED))


def test_reload_into_a_graph_compiled_from_a_model(ckpt):
    """load_checkpoint also refills a graph compiled the usual way (e.g. with fine-tuned weights):
    the tie comes from the config (tie_word_embeddings and the class's _tied_weights_keys)."""
    compiled = eager_compiled(ckpt, "opt", FUSED)
    before = compiled(IDS).logits
    for p in compiled.graph_module.parameters():
        p.data.zero_()
    stats = load_checkpoint(compiled, ckpt["opt"], progress=False)
    assert stats.tied == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    assert torch.equal(compiled(IDS).logits, before)


def test_load_plan_lists_every_recipe(meta_llama):
    compiled = meta_llama
    plan = load_plan(compiled)
    text = str(plan)
    targets = {n.target for n in compiled.graph.find_nodes(op="get_attr")}
    state = {n for pair in compiled.kv_cache["layers"] for n in pair}
    assert {t.name for r in plan for t in r.targets} == targets - state
    assert set(plan.state) == state
    for r in plan:
        assert r.targets[0].name in text and r.describe_lines()[0] in text
    qkv = plan.recipe_for("model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight")
    assert [(s.name, s.rows) for s in qkv.sources] == [
        ("model.layers.0.self_attn.q_proj.weight", (0, 48)), ("model.layers.0.self_attn.k_proj.weight", (48, 64)),
        ("model.layers.0.self_attn.v_proj.weight", (64, 80))]
    assert "48:64 ← model.layers.0.self_attn.k_proj.weight" in text
    assert "runtime state" in text and "kv_cache_0_k" in text
    assert plan.recipe_for("model.rotary_emb.inv_freq").optional  # computed by the model, not in the file
    _untouched(compiled)  # nothing was loaded: the plan of a model compiled on the meta device


def test_loading_holds_one_source_tensor_at_a_time(ckpt):
    """The reader counts the bytes of the checkpoint tensors it handed out that are still alive
    (weakref finalizers): loading never holds more than the largest recipe's sources (here: never
    more than one tensor, each is freed once copied into its rows), far below the checkpoint."""
    compiled = compile_on_meta(ckpt["llama"], FUSED, dtype=torch.float32, **OPTS)
    files = CheckpointFiles(ckpt["llama"])
    largest_tensor = max(files.nbytes(n) for n in files.weight_map)
    total = sum(files.nbytes(n) for n in files.weight_map)
    stats = load_checkpoint(compiled, files, progress=False)
    assert files.alive_bytes == 0  # everything read was freed
    assert stats.bytes_read == total  # each tensor read once
    assert stats.peak_source_bytes <= stats.largest_recipe_bytes
    assert stats.peak_source_bytes == largest_tensor
    assert stats.largest_recipe_bytes < total / 4
    assert stats.checkpoint_bytes >= total


# ---------------------------------------------------------------------------------------------
# Quantize while loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,bits,dtype", [("llama", 8, torch.bfloat16), ("gpt2", 4, torch.float32)])
def test_quantize_while_loading(ckpt, family, bits, dtype):
    """The float32 checkpoint is cast to the compile dtype, then quantized (scales in that dtype)."""
    pytest.importorskip("fxopt.passes.quantize")
    passes = ["canonicalize", "kv_cache", "fuse", "quantize", "dce"]
    quant = dict(quant_bits=bits, quant_group_size=16)
    ours = compile_from_checkpoint(ckpt[family], passes, dtype=dtype, progress=False, **OPTS, **quant)
    plan = load_plan(ours)
    quantized = [r for r in plan if r.quant is not None]
    assert quantized and all({t.role for t in r.targets} == {"qweight", "scales"} for r in quantized)
    if family == "gpt2":
        assert all(r.sources[0].transpose for r in quantized)  # Conv1D: transposed, then quantized
    else:
        assert any(len(r.sources) > 1 for r in quantized)  # concatenated q/k/v, then quantized
    assert not no_meta_left(ours)
    assert all(t.dtype == dtype for r in quantized for t in r.targets if t.role == "scales")
    assert_same(ours, eager_compiled(ckpt, family, passes, dtype, **quant))


# ---------------------------------------------------------------------------------------------
# Hand-made graphs: transposed sources concatenated, missing biases, tensor-parallel slices
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Two GPT-2 Conv1D (stored [in, out]) and two linears, one without a bias, reading one input:
    `fuse` concatenates all four (param_transforms, and a None source for the missing bias)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.a, self.b = Conv1D(24, 16), Conv1D(8, 16)
        self.q, self.k = nn.Linear(16, 12), nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.a(x), self.b(x), self.q(x), self.k(x)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    torch.manual_seed(0)
    model = Mixed().eval()
    for p in model.parameters():
        nn.init.normal_(p)
    path = tmp_path_factory.mktemp("mixed") / "mixed.safetensors"
    save_file(model.state_dict(), path)
    return model, path


def meta_compiled(passes):
    with parameters_on_meta():
        model = Mixed().eval()
    compiled = fxopt.compile(model, passes, example_inputs=(torch.empty(2, 5, 16, device="meta"),))
    retarget_device(compiled.graph_module, "cpu")
    return compiled


def test_concatenated_transposed_sources_and_zero_rows(mixed):
    model, path = mixed
    passes = ["canonicalize", "fuse", "dce"]
    compiled = meta_compiled(passes)
    plan = load_plan(compiled)
    (weight,) = [r for r in plan if r.name.endswith("_weight")]
    (bias,) = [r for r in plan if r.name.endswith("_bias")]
    assert [(s.name, s.transpose, s.rows) for s in weight.sources] == [
        ("a.weight", True, (0, 24)), ("b.weight", True, (24, 32)), ("q.weight", False, (32, 44)),
        ("k.weight", False, (44, 48))]
    assert bias.sources[-1].name is None and "zeros" in str(plan)
    load_checkpoint(compiled, path, progress=False)  # a single .safetensors file, no config
    x = torch.randn(3, 4, 16)
    for ours, theirs in zip(compiled(x), fxopt.compile(model, passes, example_inputs=(x,))(x)):
        assert torch.equal(ours, theirs)


def _meta_attr(gm, target, shape):
    owner, leaf = gm.get_submodule(target.rpartition(".")[0]), target.rpartition(".")[2]
    owner._parameters[leaf] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def test_slices_read_only_their_part(mixed):
    """What a tensor-parallel pass will do: mark the part of each source a rank holds
    (meta['param_slices'], in the graph's [out, in] orientation) and shrink the attribute; the
    loader reads just that part with get_slice (transposed sources sliced along the other dim)."""
    model, path = mixed
    state = model.state_dict()
    compiled = meta_compiled(["canonicalize", "dce"])
    gm = compiled.graph_module
    nodes = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    nodes["a.weight"].meta["param_slices"] = {"a.weight": (0, 4, 12)}  # rows of [out, in] = columns stored
    _meta_attr(gm, "a.weight", (8, 16))
    nodes["q.weight"].meta["param_slices"] = {"q.weight": Slice(1, 2, 10)}  # input features
    _meta_attr(gm, "q.weight", (12, 8))
    plan = load_plan(gm)
    assert "a.weight.T[4:12]" in str(plan) and "q.weight[:, 2:10]" in str(plan)
    files = CheckpointFiles(path)
    load_checkpoint(gm, files, progress=False)
    assert torch.equal(gm.a.weight, state["a.weight"].t()[4:12])
    assert torch.equal(gm.q.weight, state["q.weight"][:, 2:10])
    assert torch.equal(gm.b.weight, state["b.weight"].t())
    full = sum(t.numel() * 4 for t in state.values())
    assert files.bytes_read == full - (24 - 8) * 16 * 4 - 12 * (16 - 8) * 4  # only the slices left the file

    # a fused weight split along its input features: each source sliced, the rows stay
    compiled = meta_compiled(["canonicalize", "fuse", "dce"])
    gm = compiled.graph_module
    (node,) = [n for n in gm.graph.find_nodes(op="get_attr") if n.target.endswith("_weight")]
    node.meta["param_slices"] = {name: (1, 8, 16) for name, _, _ in node.meta["param_sources"]}
    _meta_attr(gm, node.target, (48, 8))
    load_checkpoint(gm, path, progress=False)
    want = torch.cat([state["a.weight"].t(), state["b.weight"].t(), state["q.weight"], state["k.weight"]])[:, 8:16]
    assert torch.equal(getattr(gm, node.target), want)


def test_retarget_device_rewrites_meta_device_constants():
    class Positions(nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1], device=x.device)

    compiled = fxopt.compile(Positions(), ["canonicalize"], example_inputs=(torch.empty(2, 5, device="meta"),))
    gm = compiled.graph_module
    assert "meta" in gm.code
    assert retarget_device(gm, "cpu") == 1 and "meta" not in gm.code
    assert gm.meta["fxopt_inputs"][0].device == torch.device("cpu")
    assert torch.equal(compiled(torch.zeros(3, 4)), torch.arange(4.0).expand(3, 4))


def test_quant_recipe_on_a_hand_made_graph(mixed):
    """The quant branch without the quantize pass: meta['quant'] set by hand on two buffers."""
    from fxopt.kernels.quant import quantize_weight
    model, path = mixed
    compiled = meta_compiled(["canonicalize", "dce"])
    gm = compiled.graph_module
    w = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target == "a.weight")
    graph = gm.graph
    gm.a.register_buffer("qweight", torch.empty(24, 8, dtype=torch.uint8, device="meta"))
    gm.a.register_buffer("scales", torch.empty(24, 2, device="meta"))
    with graph.inserting_after(w):  # (nothing reads the new nodes: the plan reads every get_attr all the same)
        for role in ("qweight", "scales"):
            n = graph.get_attr(f"a.{role}")
            n.meta.update(quant={"of": "a.weight", "role": role, "group_size": 8, "bits": 4, "in_features": 16},
                          param="a.weight", param_transform="transpose")
    plan = load_plan(gm)
    recipe = plan.recipe_for("a.qweight")
    assert recipe.quant.bits == 4 and {t.name for t in recipe.targets} == {"a.qweight", "a.scales"}
    load_checkpoint(gm, path, progress=False)
    q, s = quantize_weight(model.a.weight.detach().t().contiguous(), 8, 4)
    assert torch.equal(gm.a.qweight, q) and torch.equal(gm.a.scales, s)


# ---------------------------------------------------------------------------------------------
# Errors name the tensor and the file, and leave the graph as it was
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_llama(ckpt):
    """One llama compiled on the meta device; every error below happens while checking the file
    headers, before anything is loaded, so the graph can be shared."""
    return compile_on_meta(ckpt["llama"], FUSED, dtype=torch.float32, **OPTS)


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _untouched(compiled):
    gm = compiled.graph_module
    assert all(p.device.type == "meta" for p in gm.parameters())


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"])
def test_missing_tensor(ckpt, meta_llama, tmp_path, name):
    bad = _edited_copy(ckpt["llama"], tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(meta_llama, bad, progress=False)
    assert f"tensor '{name}'" in str(e.value) and str(bad / "model.safetensors") in str(e.value)
    _untouched(meta_llama)


def test_wrong_shape(ckpt, meta_llama, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _edited_copy(ckpt["llama"], tmp_path / "bad", lambda t: t.update({name: torch.zeros(17, 48)}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(meta_llama, bad, progress=False)
    msg = str(e.value)
    assert f"tensor '{name}'" in msg and str(bad / "model.safetensors") in msg and "[17, 48]" in msg and "16" in msg
    _untouched(meta_llama)


def test_truncated_file(ckpt, meta_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt["llama"], bad)
    file = bad / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(meta_llama, bad, progress=False)
    assert str(file) in str(e.value)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        compile_from_checkpoint(bad, progress=False)  # before compiling anything
    _untouched(meta_llama)


def test_missing_or_truncated_shard(ckpt, meta_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt["llama-sharded"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = bad / index[name]
    os.truncate(shard, 20)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(meta_llama, bad, progress=False)
    assert str(shard) in str(e.value)
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(meta_llama, bad, progress=False)
    assert str(shard) in str(e.value) and "does not exist" in str(e.value)
    _untouched(meta_llama)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointFiles(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointFiles(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="verify"):
        compile_from_checkpoint(tmp_path, verify=True)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 checkpoint
# ---------------------------------------------------------------------------------------------


def _rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


@pytest.mark.slow
def test_smollm2_from_checkpoint(smollm2, smollm2_dir, smollm2_compiled, monkeypatch):
    """compile_from_checkpoint(SmolLM2) generates the tokens fxopt.compile(load_model(...)) does;
    the resident memory that loading adds peaks at the weights it makes plus at most the largest
    recipe's sources (not the checkpoint again on top)."""
    import fxopt.checkpoint as checkpoint

    _, tokenizer = smollm2
    peak = {}
    load = checkpoint.load_checkpoint

    def measured(*args, **kwargs):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set (VmHWM)
        except OSError:
            pass
        before = _rss("VmRSS")
        stats = load(*args, **kwargs)
        peak["extra"], peak["after"] = _rss("VmHWM") - before, _rss("VmRSS") - before
        return stats

    monkeypatch.setattr(checkpoint, "load_checkpoint", measured)
    ours = compile_from_checkpoint(smollm2_dir, dtype=torch.float32, progress=False, max_batch_size=1, max_seq_len=32)
    stats = ours.info.state["checkpoint"]
    assert stats.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    weights = sum(t.numel() * t.element_size() for t in ours.graph_module.parameters())
    weights += sum(t.numel() * t.element_size() for t in ours.graph_module.buffers())
    if peak.get("extra") is not None and os.path.exists("/proc/self/clear_refs"):
        slack = 48 * 2**20
        assert peak["extra"] <= weights + stats.largest_recipe_bytes + slack, (peak, weights, stats)
        assert peak["extra"] < weights + stats.checkpoint_bytes / 2
    theirs = smollm2_compiled  # the default pipeline over the model load_model made
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=4, eos_token_id=None)
    assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))
