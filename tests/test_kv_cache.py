"""The kv_cache pass and the cached-attention op's reference implementation."""
import math

import pytest
import torch

import fxopt
from families import CAUSAL, VOCAB, tiny
from fxopt.ir import is_op
from fxopt.kernels.attention import cached_attention_reference

aten = torch.ops.aten


def naive_attention(q, keys, values, positions, scale, window=0):
    """Row by row, head by head, query by query: softmax(q·k) over slots j <= pos (and > pos - window)."""
    batch, hq, seq, _ = q.shape
    hkv = keys.shape[1]
    out = torch.empty(batch, hq, seq, values.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kvh = h // (hq // hkv)
            for s in range(seq):
                p = int(positions[b, s])
                lo = max(0, p - window + 1) if window else 0
                k = keys[b, kvh, lo:p + 1].double()
                w = torch.softmax(k @ q[b, h, s].double() * scale, dim=0)
                out[b, h, s] = w @ values[b, kvh, lo:p + 1].double()
    return out


@pytest.mark.parametrize("hq,hkv,dim,window", [(4, 4, 8, 0), (6, 2, 16, 0), (9, 3, 5, 0), (4, 2, 8, 3)])
def test_cached_attention_reference_prefill_then_decode(hq, hkv, dim, window):
    torch.manual_seed(hq * 100 + dim)
    batch, max_seq, prompt = 3, 19, 6
    kc = torch.full((4, hkv, max_seq, dim), float("nan"))  # poisoned: every read slot must be written first
    vc = torch.full((4, hkv, max_seq, dim), float("nan"))
    keys = torch.randn(batch, hkv, max_seq, dim)
    values = torch.randn(batch, hkv, max_seq, dim)
    q_all = torch.randn(batch, hq, max_seq, dim)
    scale = 1 / math.sqrt(dim)
    # prefill at positions 0..prompt-1, then three decode steps at per-row positions
    pos = torch.arange(prompt).expand(batch, prompt)
    out = cached_attention_reference(q_all[:, :, :prompt], keys[:, :, :prompt], values[:, :, :prompt], kc, vc, pos,
                                     scale, window)
    want = naive_attention(q_all[:, :, :prompt], keys, values, pos, scale, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for p in range(prompt, prompt + 3):
        pos = torch.full((batch, 1), p)
        out = cached_attention_reference(q_all[:, :, p:p + 1], keys[:, :, p:p + 1], values[:, :, p:p + 1], kc, vc,
                                         pos, scale, window)
        assert not torch.isnan(out).any()
        want = naive_attention(q_all[:, :, p:p + 1], keys, values, pos, scale, window)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:batch, :, :prompt + 3], keys[:, :, :prompt + 3])
    assert torch.isnan(kc[batch:]).all(), "rows beyond the batch are never touched"


def test_cached_attention_rejects_a_batch_beyond_the_cache():
    kc = torch.zeros(2, 2, 8, 4)
    with pytest.raises(ValueError, match="exceeds the KV cache's max_batch_size 2"):
        cached_attention_reference(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), kc,
                                   kc.clone(), torch.zeros(3, 1, dtype=torch.long), 0.5)


@pytest.mark.parametrize("family", CAUSAL)
def test_kv_cache_pass_rewrites_every_attention_and_kills_the_mask(family):
    model = tiny(family)
    compiled = fxopt.compile(model, verify=True, max_batch_size=3, max_seq_len=40)
    nodes = list(compiled.graph.nodes)
    assert not any(is_op(n, aten.scaled_dot_product_attention.default) for n in nodes)
    cached = [n for n in nodes if is_op(n, torch.ops.fxopt.cached_attention.default)]
    assert len(cached) == model.config.num_hidden_layers
    # the causal-mask subgraph (position comparisons, cumsum) is gone
    assert not any(is_op(n, aten.le.Tensor, aten.cumsum.default, aten.diff.default) for n in nodes)
    layout = compiled.kv_cache
    assert layout["max_batch_size"] == 3 and layout["max_seq_len"] == 40
    heads_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    for k_name, v_name in layout["layers"]:
        k = getattr(compiled.graph_module, k_name)
        assert k.shape[:3] == (3, heads_kv, 40)
    row = next(r for r in compiled.report() if r.name == "kv_cache")
    assert row.stats["attentions"] == model.config.num_hidden_layers and row.stats["removed"] > 0


def test_kv_cache_caches_only_kv_heads_before_the_gqa_repeat():
    model = tiny("llama")  # 6 query heads, 2 kv heads
    compiled = fxopt.compile(model, max_seq_len=16)
    for n in compiled.graph.nodes:
        if is_op(n, torch.ops.fxopt.cached_attention.default):
            q, k, v = (a.meta["val"].shape for a in n.args[:3])
            assert q[1] == 6 and k[1] == 2 and v[1] == 2


def test_kv_cache_step_logits_equal_the_stateless_model():
    model = tiny("llama")
    compiled = fxopt.compile(model, max_seq_len=32)
    ids = torch.randint(0, VOCAB, (2, 12))
    full = model(ids).logits
    prefill = compiled.step(ids[:, :8], torch.arange(8).expand(2, 8))
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-4, atol=1e-5)
    for p in range(8, 12):
        logits = compiled.step(ids[:, p:p + 1], torch.full((2, 1), p))
        torch.testing.assert_close(logits[:, 0], full[:, p], rtol=1e-4, atol=1e-5)


def test_kv_cache_refuses_a_model_that_is_not_a_causal_lm():
    with pytest.raises(fxopt.PassError, match="BertModel is not a causal LM"):
        fxopt.compile(tiny("bert"), passes=["canonicalize", "kv_cache"])
