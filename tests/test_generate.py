"""compiled.generate: greedy equals transformers token for token; sampling; streaming; errors."""
import pytest
import torch

import fxopt
from families import CAUSAL, VOCAB, tiny
from fxopt.runtime.generate import Sampling

LENGTHS = [5, 2, 9]


def left_padded_batch(lengths, seed=0, pad=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_equals_transformers_generate(family):
    model = tiny(family)
    compiled = fxopt.compile(model, max_batch_size=4, max_seq_len=64)
    ids, mask = left_padded_batch(LENGTHS)
    ours = compiled.generate(ids, attention_mask=mask, max_new_tokens=32, pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours.shape == theirs.shape == (3, 9 + 32)
    assert torch.equal(ours, theirs)


def test_right_padded_prompts_give_the_same_tokens_as_left_padded():
    compiled = fxopt.compile(tiny("llama"), max_seq_len=64)
    ids, mask = left_padded_batch(LENGTHS)
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(LENGTHS):
        right_ids[i, :n] = ids[i, -n:]
        right_mask[i, :n] = 1
    a = compiled.generate(ids, attention_mask=mask, max_new_tokens=10)
    b = compiled.generate(right_ids, attention_mask=right_mask, max_new_tokens=10)
    assert torch.equal(a[:, 9:], b[:, 9:])


def test_stops_each_row_at_eos_and_pads_after_it():
    model = tiny("llama")
    compiled = fxopt.compile(model, max_seq_len=64)
    ids, mask = left_padded_batch(LENGTHS, seed=3)
    free = compiled.generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[1, 9 + 4])  # the token row 1 emits at step 4 becomes "end of sequence"
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(out, ref)
    new = out[1, 9:]
    first = int((new == eos).nonzero()[0])
    assert first <= 4 and (new[first + 1:] == 0).all()


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    compiled = fxopt.compile(tiny("mistral"), max_seq_len=64)
    ids, mask = left_padded_batch(LENGTHS)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.5)
    a = compiled.generate(ids, seed=7, **kw)
    b = compiled.generate(ids, seed=7, **kw)
    c = compiled.generate(ids, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = compiled.generate(ids, attention_mask=mask, max_new_tokens=16)
    top1 = compiled.generate(ids, seed=7, top_k=1, **kw)
    assert torch.equal(top1, greedy), "top_k=1 sampling is greedy"


def test_top_k_and_top_p_restrict_the_candidates():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    topk = set()
    for _ in range(200):
        topk.update((Sampling(True, 1.0, top_k=5).pick(logits, gen)[:, None] == logits.topk(5).indices).any(1).tolist())
    assert topk == {True}
    probs = logits.softmax(-1)
    for row in range(4):
        order = probs[row].argsort(descending=True)
        cum = probs[row][order].cumsum(0)
        nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
        drawn = {int(Sampling(True, 1.0, top_p=0.6).pick(logits[row:row + 1], gen)) for _ in range(300)}
        assert drawn <= nucleus and len(drawn) > 1 or len(nucleus) == 1


def test_stream_yields_the_same_tokens_as_generate():
    compiled = fxopt.compile(tiny("gpt2"), max_seq_len=64)
    ids, mask = left_padded_batch(LENGTHS)
    steps = list(compiled.stream(ids, attention_mask=mask, max_new_tokens=8))
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(torch.stack(steps, 1), out[:, 9:])
    seen = []
    compiled.generate(ids, attention_mask=mask, max_new_tokens=8, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 9:])


def test_requests_beyond_the_cache_are_refused_before_any_work():
    compiled = fxopt.compile(tiny("opt"), max_batch_size=2, max_seq_len=20)
    ids, mask = left_padded_batch([4, 3])
    cache = compiled.graph_module.get_buffer(compiled.kv_cache["layers"][0][0])
    before = cache.clone()
    with pytest.raises(fxopt.GenerationError, match=r"4 tokens\) plus max_new_tokens=17 is 21 tokens, beyond max_seq_len=20"):
        compiled.generate(ids, attention_mask=mask, max_new_tokens=17)
    with pytest.raises(fxopt.GenerationError, match="batch of 3 prompts exceeds max_batch_size=2"):
        compiled.generate(*left_padded_batch([2, 2, 2]), max_new_tokens=2)
    empty_mask = mask.clone()
    empty_mask[1] = 0
    with pytest.raises(fxopt.GenerationError, match="prompt 1 is empty"):
        compiled.generate(ids, attention_mask=empty_mask, max_new_tokens=2)
    with pytest.raises(fxopt.GenerationError, match="max_new_tokens must be >= 1"):
        compiled.generate(ids, max_new_tokens=0)
    assert torch.equal(cache, before), "no work happened"
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=16)  # exactly fits
    assert out.shape == (2, 4 + 16)


def test_generate_needs_the_kv_cache_pass():
    compiled = fxopt.compile(tiny("llama"), passes=["canonicalize"])
    with pytest.raises(fxopt.GenerationError, match="needs the 'kv_cache' pass"):
        compiled.generate(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("family", CAUSAL)
def test_prefill_graph_computes_the_head_on_the_last_positions_only(family):
    """compiled.prefill gathers one position per row before the LM head: its logits equal the
    full forward's at those positions, and the head's matmul sees [B, 1, H]."""
    import torch.fx as fx

    compiled = fxopt.compile(tiny(family), max_batch_size=4, max_seq_len=48)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    pos = torch.arange(9).expand(3, -1)
    last = torch.tensor([8, 2, 5])
    want = compiled(input_ids=ids, position_ids=pos).logits[torch.arange(3), last]
    got = compiled.prefill(ids, last)
    assert got.shape == (3, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gm = compiled._prefill_gm
    assert isinstance(gm, fx.GraphModule)
    gathers = [n for n in gm.graph.nodes if n.target is torch.ops.aten.gather.default]
    assert len(gathers) == 1 and gathers[0].args[1] == 1  # one position per row, before the head
    # a prefill starts the sequence: attention over the prompt itself, not the cache
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxopt.cached_attention.default not in targets
    assert targets.count(torch.ops.fxopt.prompt_attention.default) == 2  # tiny models have 2 layers
    # attention's output is token-major: the heads merged by the model's transpose + reshape are a
    # view of it, not a copy, up to the output projection
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    flat = compiled.info.signature.flatten((), dict(input_ids=ids, position_ids=pos))
    Record(gm).run(*flat, last)
    for attn in (n for n in gm.graph.nodes if n.target is torch.ops.fxopt.prompt_attention.default):
        merged = next(iter(next(iter(attn.users)).users))  # transpose, then reshape / view
        assert values[merged].shape == (3, 9, values[attn].shape[1] * values[attn].shape[3])
        assert values[merged].data_ptr() == values[attn].data_ptr(), merged.format_node()
    # the weights and the KV cache are shared with the compiled graph, not copied
    assert {id(p) for p in gm.parameters()} <= {id(p) for p in compiled.graph_module.parameters()}
    assert {id(b) for b in gm.buffers()} <= {id(b) for b in compiled.graph_module.buffers()}


def test_prefill_without_a_single_head_falls_back_to_all_logits():
    compiled = fxopt.compile(tiny("llama"), max_batch_size=2, max_seq_len=32)
    compiled._prefill_gm = None  # as for a graph whose head last_token_graph cannot find
    ids = torch.randint(0, VOCAB, (2, 5))
    pos = torch.arange(5).expand(2, -1)
    want = compiled(input_ids=ids, position_ids=pos).logits[torch.arange(2), torch.tensor([4, 1])]
    torch.testing.assert_close(compiled.prefill(ids, torch.tensor([4, 1])), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_is_argmax(device):
    """Greedy picks the first maximum of each row, as argmax does, on the strided rows generate
    passes (logits[:, -1] of [B, 1, V]). On CUDA that is the Triton kernel (ties across its blocks
    and within one); on CPU the op's reference, so there this checks the wiring, and the kernel
    itself is tested in the interpreter by tests/test_sampling_triton.py."""
    from fxopt.runtime.generate import greedy

    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(1, 128256), (3, 32000), (5, 49152), (2, 96), (2, 50257)]:
        logits = torch.randn(rows, 1, vocab, generator=g).to(torch.bfloat16).to(device)[:, -1]  # bf16: many ties
        logits[0, vocab // 3] = logits[0, vocab - 1] = logits[0, 5] = 50.0  # three maxima, far apart
        assert torch.equal(greedy(logits), logits.argmax(-1))
        assert greedy(logits)[0] == 5


def test_generate_runs_without_autograd():
    """The weights require grad (as transformers loads them); generation must not track them."""
    model = tiny("llama")
    assert any(p.requires_grad for p in model.parameters())
    compiled = fxopt.compile(model, max_batch_size=2, max_seq_len=32)
    seen = []
    step, prefill = compiled.step, compiled.prefill
    compiled.step = lambda *a: (seen.append(torch.is_grad_enabled()), step(*a))[1]
    compiled.prefill = lambda *a: (seen.append(torch.is_grad_enabled()), prefill(*a))[1]
    compiled.generate(torch.randint(0, VOCAB, (2, 4)), max_new_tokens=5, eos_token_id=None)
    assert len(seen) == 5 and not any(seen)


@pytest.mark.parametrize("family", CAUSAL)
def test_prefill_graph_adds_each_residual_in_place(family):
    """In the prefill graph every folded residual whose old value nothing reads later becomes
    ``fxopt.linear_add_`` (the residual stream updated in place), and two prefills in a row give
    the full forward's logits (no state leaks from one into the next)."""
    compiled = fxopt.compile(tiny(family), max_batch_size=4, max_seq_len=48)
    decode_residuals = [n for n in compiled.graph.nodes
                        if n.target is torch.ops.fxopt.linear.default and n.args[3] is not None]
    gen = torch.Generator().manual_seed(5)
    for seq, last in ((7, [6, 0, 3]), (11, [10, 4, 7])):
        ids = torch.randint(0, VOCAB, (3, seq), generator=gen)
        pos = torch.arange(seq).expand(3, -1)
        want = compiled(input_ids=ids, position_ids=pos).logits[torch.arange(3), torch.tensor(last)]
        torch.testing.assert_close(compiled.prefill(ids, torch.tensor(last)), want, rtol=1e-5, atol=1e-5)
    nodes = list(compiled._prefill_gm.graph.nodes)
    added = [n for n in nodes if n.target is torch.ops.fxopt.linear_add_.default]
    left = [n for n in nodes if n.target is torch.ops.fxopt.linear.default and n.args[3] is not None]
    assert len(added) == len(decode_residuals) and not left
    if family in ("llama", "mistral"):  # o and down of both blocks (GPT-2, OPT: no residual folded)
        assert len(added) == 4


def test_quantized_prefill_graph_adds_each_residual_in_place():
    """With INT8 linears (their residuals folded, the default) the prefill graph updates the
    residual stream in place through ``fxopt.quant_linear_add_``, and its logits are the quantized
    model's full forward's."""
    passes = ["canonicalize", "kv_cache", "fuse", "quantize", "fold_linear", "dce"]
    compiled = fxopt.compile(tiny("llama"), passes=passes, max_batch_size=2, max_seq_len=32, quant_group_size=32)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    last = torch.tensor([9, 4])
    want = compiled(input_ids=ids, position_ids=torch.arange(10).expand(2, -1)).logits[torch.arange(2), last]
    torch.testing.assert_close(compiled.prefill(ids, last), want, rtol=1e-5, atol=1e-5)
    targets = [n.target for n in compiled._prefill_gm.graph.nodes]
    assert targets.count(torch.ops.fxopt.quant_linear_add_.default) == 4  # o and down of both blocks
    assert not any(n.target is torch.ops.fxopt.quant_linear.default and n.args[7] is not None
                   for n in compiled._prefill_gm.graph.nodes)


def _graph_with_residual(residual_kind: str):
    """x -> fxopt.linear(x, w, residual=r) -> out, with r made as ``residual_kind`` says."""
    import torch.fx as fx

    aten, linear = torch.ops.aten, torch.ops.fxopt.linear.default
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.randn(6, 5), requires_grad=False)
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(3, 5)
    e = g.placeholder("e")
    e.meta["val"] = torch.empty(3, 6)
    w = g.get_attr("w")
    r = e if residual_kind == "placeholder" else g.call_function(aten.mul.Tensor, (e, 2.0))
    if residual_kind == "view":
        r = g.call_function(aten.view.default, (r, [3, 6]))
    r.meta["val"] = torch.empty(3, 6)
    alias = g.call_function(aten.view.default, (r, [18])) if residual_kind == "read_through_view" else r
    if residual_kind in ("input_is_residual", "input_views_residual"):  # y = r @ w.T + r, w square
        root.w = torch.nn.Parameter(torch.randn(6, 6), requires_grad=False)
        x = r if residual_kind == "input_is_residual" else g.call_function(aten.view.default, (r, [3, 6]))
    y = g.call_function(linear, (x, w, None, r))
    y.meta["val"] = torch.empty(3, 6)
    outs = [y]
    if residual_kind in ("read_after", "read_through_view"):
        outs.append(g.call_function(aten.sum.default, (alias,)))
    g.output(tuple(outs))
    return fx.GraphModule(root, g)


@pytest.mark.parametrize("residual_kind, rewritten", [
    ("fresh", 1), ("placeholder", 0), ("view", 0), ("read_after", 0), ("read_through_view", 0),
    ("input_is_residual", 0), ("input_views_residual", 0)])
def test_accumulate_residuals_only_where_the_old_value_is_dead(residual_kind, rewritten):
    """A residual is updated in place only when it owns its storage (not an input, not a view),
    the linear does not also read it (or a view of it) as its input, and nothing reads it, directly
    or through a view, after the linear; the graph computes the same either way."""
    from fxopt.runtime.last_token import accumulate_residuals

    gm = _graph_with_residual(residual_kind)
    gen = torch.Generator().manual_seed(1)
    x, e = torch.randn(3, 5, generator=gen), torch.randn(3, 6, generator=gen)
    want = gm(x, e.clone())
    assert accumulate_residuals(gm.graph) == rewritten
    gm.recompile()
    e_in = e.clone()
    got = gm(x, e_in)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(e_in, e), "a graph input is never written"
