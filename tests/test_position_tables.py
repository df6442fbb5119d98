"""The ``position_tables`` pass: values computed from the positions alone become table lookups."""
import pytest
import torch
import torch.fx as fx

import fxopt
from fxopt.ir import is_op
from fxopt.passes.position_tables import tabulate
from test_fuse import model_of

aten = torch.ops.aten
WITHOUT = ["canonicalize", "kv_cache", "fuse", "fold_linear", "dce"]
WITH = ["canonicalize", "kv_cache", "fuse", "position_tables", "fold_linear", "dce"]
MAX_SEQ = 48


def compiled(model, passes):
    return fxopt.compile(model, passes=passes, max_batch_size=4, max_seq_len=MAX_SEQ)


def stats_of(c, name="position_tables"):
    return next(r for r in c.report() if r.name == name).stats


def ops(gm, *targets):
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                           ("mistral", torch.float32), ("qwen2", torch.float32)])
def test_rotary_cos_and_sin_become_two_lookups(family, dtype):
    """The rotary chain (float, × inv_freq, cat, cos / sin, the cast) is gone; two gathers feed
    every attention, and the logits are bit for bit those of the graph without the pass, at
    positions spread over the whole cache (the first and last slot included)."""
    model = model_of(family).to(dtype)
    plain, tabled = compiled(model, WITHOUT), compiled(model, WITH)
    stats = stats_of(tabled)
    assert set(stats) == {"tables", "removed", "MiB"} and stats["tables"] == 2 and stats["removed"] >= 6
    gm = tabled.graph_module
    assert not ops(gm, aten.cos.default, aten.sin.default, aten.cat.default)
    lookups = ops(gm, aten.embedding.default)
    assert len(lookups) == 3  # the token embedding, cos, sin
    tables = [getattr(gm, n.args[0].target) for n in lookups if n.args[1].name == "position_ids"]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert [t.shape for t in tables] == [(MAX_SEQ, head_dim)] * 2 and all(t.dtype == dtype for t in tables)
    for attention in ops(gm, torch.ops.fxopt.cached_attention.default):
        assert set(attention.args[-2:]) == {n for n in lookups if n.args[1].name == "position_ids"}

    g = torch.Generator().manual_seed(1)
    # a prefill of 5 tokens, then decode steps at scattered positions of 3 rows, the last slot too
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=g)
    positions = torch.arange(5).expand(3, 5)
    assert torch.equal(plain.step(ids, positions), tabled.step(ids, positions))
    for pos in ([[5], [17], [MAX_SEQ - 1]], [[6], [0], [33]]):
        token = torch.randint(0, model.config.vocab_size, (3, 1), generator=g)
        assert torch.equal(plain.step(token, torch.tensor(pos)), tabled.step(token, torch.tensor(pos)))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_families_without_a_position_chain_are_left_alone(family):
    """GPT-2's learned position embedding is one gather already (a table would copy the weight);
    OPT derives its positions from the attention mask, not from position_ids."""
    stats = stats_of(compiled(model_of(family), WITH))
    assert "tables" not in stats and stats["skipped"].startswith("nothing computed from the positions alone")


def test_needs_kv_cache_to_bound_the_positions():
    c = fxopt.compile(model_of("llama"), passes=["canonicalize", "position_tables", "dce"])
    assert stats_of(c) == {"skipped": "run kv_cache first: it bounds the positions"}


def test_a_table_over_the_size_limit_is_not_made():
    c = fxopt.compile(model_of("llama"), passes=WITH, max_seq_len=MAX_SEQ, position_table_max_mib=0.001)
    assert stats_of(c)["skipped"] == "tables of 0.00293 MiB exceed position_table_max_mib=0.001"
    assert ops(c.graph_module, aten.cos.default)


class _Positions(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.register_buffer("freq", torch.rand(6, generator=torch.Generator().manual_seed(0)) + 0.1)

    def forward(self, x, position_ids):
        p = position_ids.float()
        p = p.cumsum(-1) if self.mix == "cumsum" else p
        # "grid": a [batch, seq, 2, 3] value, whose table is [max_seq, 2, 3] (an index, not an embedding)
        angle = p[..., None, None] * self.freq.view(2, 3) if self.mix == "grid" else p[..., None] * self.freq
        return x * torch.cos(angle) + torch.sin(angle)


def _graph(mix):
    gm = fx.symbolic_trace(_Positions(mix))
    example = (torch.randn(2, 5, 2, 3) if mix == "grid" else torch.randn(2, 5, 6), torch.randint(0, 20, (2, 5)))
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example)
    for node in gm.graph.nodes:  # the IR keeps example values in meta['val']
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            node.meta["val"] = torch.empty(meta.shape, dtype=meta.dtype)
    return gm, example


@pytest.mark.parametrize("mix, lookup", [("none", aten.embedding.default), ("grid", aten.index.Tensor)])
def test_a_position_wise_chain_in_any_graph_is_tabulated(mix, lookup):
    gm, (x, positions) = _graph(mix)
    expected = gm(x, positions)
    stats = tabulate(gm, max_seq=20)
    assert stats["tables"] == 2 and len(ops(gm, lookup)) == 2
    assert not ops(gm, aten.cos.default) and not any(n.target is torch.cos for n in gm.graph.nodes)
    assert torch.equal(gm(x, positions), expected)
    every, ones = torch.arange(20)[None].expand(2, 20), x.new_ones(2, 20, *x.shape[2:])  # every row of the tables
    assert torch.equal(gm(ones, every), _graph(mix)[0](ones, every))


def test_a_value_that_mixes_positions_is_refused():
    """cos(cumsum(p)) depends on the positions before each one: a lookup by the position alone
    would be wrong, and the probe says so."""
    gm, (x, positions) = _graph("cumsum")
    before = str(gm.graph)
    stats = tabulate(gm, max_seq=20)
    assert "is not a function of each position alone" in stats["skipped"]
    assert str(gm.graph) == before


@pytest.mark.gpu
def test_gpu_tables_in_the_cuda_graph():
    """On a GPU, with CUDA graphs: the tables are built on the device and the captured step
    generates what the step without the pass generates, token for token."""
    model = model_of("llama").to("cuda", torch.bfloat16)
    plain, tabled = (fxopt.compile(model, passes=[*p, "cuda_graph"], max_batch_size=4, max_seq_len=MAX_SEQ)
                     for p in (WITHOUT, WITH))
    assert all(getattr(tabled.graph_module, n.target).is_cuda
               for n in tabled.graph_module.graph.find_nodes(op="get_attr") if n.target.startswith("position_table"))
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    new = MAX_SEQ - 6 - 1  # up to the cache's last slot
    assert torch.equal(plain.generate(ids, max_new_tokens=new, eos_token_id=None),
                       tabled.generate(ids, max_new_tokens=new, eos_token_id=None))


def test_compiled_on_the_meta_device_from_a_checkpoint(tmp_path):
    """compile_from_checkpoint compiles with the weights on the meta device (inv_freq real): the
    tables are made from the real buffer, moved with the weights, and generate as the model does."""
    from fxopt.checkpoint import compile_from_checkpoint
    model = model_of("llama")
    model.save_pretrained(tmp_path)
    ours = compile_from_checkpoint(tmp_path, WITH, dtype=torch.float32, progress=False, max_batch_size=4,
                                   max_seq_len=MAX_SEQ)
    assert stats_of(ours)["tables"] == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.generate(ids, max_new_tokens=20, eos_token_id=None),
                       compiled(model, WITHOUT).generate(ids, max_new_tokens=20, eos_token_id=None))
