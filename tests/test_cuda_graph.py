"""The cuda_graph pass: a no-op with a notice on CPU; on a GPU, captured decode = uncaptured decode."""
import pytest
import torch

import fxopt
from families import VOCAB, tiny
from fxopt.runtime.cuda_graph import buckets_for


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(12) == [1, 2, 4, 8, 12]


def test_cpu_weights_make_the_pass_a_noop_with_a_notice(capsys):
    import fxopt.passes.cuda_graph as cg
    cg._noticed = False
    compiled = fxopt.compile(tiny("llama"), max_seq_len=32)  # the default pipeline ends with cuda_graph
    row = compiled.report()[-1]
    assert row.name == "cuda_graph" and not row.changed and "no CUDA" in row.stats["skipped"]
    err = capsys.readouterr().err
    assert err.count("cuda_graph:") == 1 and "without CUDA graphs" in err


def _batch(n, width, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, width), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, : i % width] = 0  # different prompt lengths, left padded
    return ids, mask


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_decode_equals_uncaptured_across_buckets(dtype):
    model = tiny("llama").to("cuda", dtype)
    graphs = fxopt.compile(model, max_batch_size=8, max_seq_len=64)
    eager = fxopt.compile(model, passes=["canonicalize", "kv_cache", "dce"], max_batch_size=8, max_seq_len=64)
    assert graphs.report()[-1].name == "cuda_graph" and graphs.report()[-1].changed
    for n in (1, 3, 5, 2, 8, 3):  # buckets 1, 4, 8, 2, 8, 4 — and back to sizes seen before
        ids, mask = _batch(n, 7, seed=n)
        a = graphs.generate(ids, attention_mask=mask, max_new_tokens=12)
        b = eager.generate(ids, attention_mask=mask, max_new_tokens=12)
        assert torch.equal(a, b), n
        a = graphs.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=n)
        b = eager.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=n)
        assert torch.equal(a, b), n  # sampling: the host picks, each step replays the plain graph
    assert sorted(graphs._runner.greedy_loops) == [1, 2, 4, 8]  # greedy: steps that feed themselves
    assert sorted(graphs._runner.graphs) == [1, 2, 4, 8]


@pytest.mark.gpu
def test_cuda_graph_needs_the_kv_cache_first():
    with pytest.raises(fxopt.PassError, match="put 'kv_cache' before 'cuda_graph'"):
        fxopt.compile(tiny("llama").to("cuda"), passes=["canonicalize", "cuda_graph"])


@pytest.mark.gpu
def test_host_sync_in_the_decode_graph_is_refused():
    def host_sync(gm):
        """Insert an .item() on the logits: not capturable."""
        out = gm.graph.output_node()
        logits = out.args[0][0]
        with gm.graph.inserting_before(out):
            s = gm.graph.call_function(torch.ops.aten.sum.default, (logits,))
            item = gm.graph.call_function(torch.ops.aten._local_scalar_dense.default, (s,))
            gm.graph.call_function(torch.ops.aten.add.Tensor, (logits, item))
        return gm

    model = tiny("llama").to("cuda")
    with pytest.raises(fxopt.PassError, match="copies a value to the host"):
        fxopt.compile(model, passes=["canonicalize", "kv_cache", host_sync, "cuda_graph"], max_seq_len=32)


def _to_host_and_back(t):
    return t + t.sum().cpu().to(t.device)  # a device→host copy: breaks stream capture


def _insert_host_copy(gm):
    out = gm.graph.output_node()
    logits = out.args[0][0]
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(_to_host_and_back, (logits,))
    out.args = ((new, *out.args[0][1:]),)
    return gm


@pytest.mark.gpu
def test_capture_failure_names_the_culprit_or_falls_back_with_a_warning():
    from fxopt.runtime.cuda_graph import CUDAGraphError

    model = tiny("llama").to("cuda")
    passes = ["canonicalize", "kv_cache", _insert_host_copy, "cuda_graph"]
    ids, mask = _batch(2, 5, seed=0)
    strict = fxopt.compile(model, passes=passes, max_seq_len=32)
    with pytest.raises(CUDAGraphError, match="culprit: %_to_host_and_back"):
        strict.generate(ids, attention_mask=mask, max_new_tokens=3)
    lenient = fxopt.compile(model, passes=passes, max_seq_len=32, cuda_graph_fallback=True)
    with pytest.warns(UserWarning, match="falling back to eager decode"):
        out = lenient.generate(ids, attention_mask=mask, max_new_tokens=3)
    eager = fxopt.compile(model, passes=passes[:-1], max_seq_len=32)
    assert torch.equal(out, eager.generate(ids, attention_mask=mask, max_new_tokens=3))


def test_prefill_length_buckets():
    from fxopt.runtime.prefill_graph import length_buckets

    assert length_buckets(16) == [16]
    assert length_buckets(100) == [16, 32, 64, 100]
    assert length_buckets(2056) == [16, 32, 64, 128, 256, 512, 1024, 2048, 2056]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_prefill_equals_uncaptured(dtype):
    """Prompts of several lengths and batch sizes, padded up to their bucket inside the graph, give
    the logits the uncaptured prefill gives (and in fp32 the same tokens); a bucket is reused for
    the other lengths in it. (Padding changes the GEMMs' row count, so cuBLAS may sum in another
    order: bf16 logits agree to bf16's tolerance, not bit for bit.)"""
    model = tiny("llama").to("cuda", dtype)
    graphs = fxopt.compile(model, max_batch_size=8, max_seq_len=64)
    eager = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "fold_linear", "dce"],
                          max_batch_size=8, max_seq_len=64)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for n, width in ((1, 5), (3, 9), (1, 16), (3, 13), (2, 40)):  # buckets 16, 16, 16, 16, 64
        ids, _ = _batch(n, width, seed=width)
        ids = ids.cuda()
        last = torch.arange(n, device="cuda") % width  # a different position per row
        got = graphs.prefill(ids, last).clone()
        torch.testing.assert_close(got, eager.prefill(ids, last), **tol)
        if dtype == torch.float32:
            _, mask = _batch(n, width, seed=width)
            a = graphs.generate(ids.cpu(), attention_mask=mask, max_new_tokens=8)
            assert torch.equal(a, eager.generate(ids.cpu(), attention_mask=mask, max_new_tokens=8)), (n, width)
    assert sorted(graphs._prefill_runner.graphs) == [(1, 16), (2, 64), (3, 16)]
