"""Compiling ahead (kernels/triton_env.compile_ahead): inside the block a launch of an fxopt kernel
only compiles it, in a thread pool; outside, and where launches cannot be held back, kernels run.
On a GPU: a held-back launch writes nothing and leaves its kernel compiled; a model decodes the
same tokens, bit for bit, whether its captures compiled their kernels ahead or one by one."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fxopt
from families import VOCAB, tiny
from fxopt.kernels import triton_env
from fxopt.kernels.triton_env import tl

if triton_env.triton is None:
    pytest.skip("needs triton", allow_module_level=True)


def _scale(X, Y, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * factor, mask=offs < n)


def _launch(kernel, x, y, factor=3.0):
    kernel[(triton_env.triton.cdiv(x.numel(), 64),)](x, y, x.numel(), factor, BLOCK=64)


def test_where_launches_cannot_be_held_back_the_block_runs_as_usual():
    # the test session's Triton is the interpreter without a GPU: the kernel runs inside the block
    if not triton_env.INTERPRET:
        pytest.skip("checks the interpreter's case")
    kernel = triton_env.jit(_scale)
    x = torch.randn(131)
    y = torch.zeros_like(x)
    with triton_env.compile_ahead() as held:
        _launch(kernel, x, y)
    assert held is False
    torch.testing.assert_close(y, x * 3.0)


@pytest.fixture
def recorded_runs(monkeypatch):
    """Kernels made by ``triton_env.jit`` as on a GPU (a JITFunction, whatever the test session's
    Triton mode), whose launches are recorded instead of run: (make a kernel, the calls' warmup flags)."""
    from triton.runtime.jit import JITFunction
    if triton_env.AsyncCompileMode is None:
        pytest.skip("this triton has no AsyncCompileMode")
    calls = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *args, grid, warmup, **kwargs: calls.append(warmup))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_env, "INTERPRET", False)

    def make():
        kernel = triton_env.jit(_scale)
        assert isinstance(kernel, JITFunction)
        return kernel
    return make, calls


def test_launches_are_held_back_inside_the_block_only(recorded_runs):
    make, calls = recorded_runs
    kernel = make()
    x = y = torch.empty(1)
    _launch(kernel, x, y)
    with triton_env.compile_ahead() as held:
        _launch(kernel, x, y)
        _launch(kernel, x, y)
        with triton_env.compile_ahead() as nested:  # one asynchronous compile at a time: runs as usual
            _launch(kernel, x, y)
    _launch(kernel, x, y)
    kernel.warmup(x, y, 1, 1.0, BLOCK=64, grid=(1,))  # an explicit warm-up stays one
    assert held is True and nested is False
    assert calls == [False, True, True, True, False, True]


def test_jit_passes_its_options_on(recorded_runs):
    make, calls = recorded_runs
    plain, generic = make(), triton_env.jit(do_not_specialize=["n"])(_scale)
    assert [p.do_not_specialize for p in plain.params] == [False] * 5
    assert [p.do_not_specialize for p in generic.params] == [False, False, True, False, False]
    with triton_env.compile_ahead():
        _launch(generic, torch.empty(1), torch.empty(1))
    assert calls == [True]


# --------------------------------------------------------------------------------------------- #
# GPU
# --------------------------------------------------------------------------------------------- #

@pytest.mark.gpu
def test_gpu_a_held_back_launch_writes_nothing_and_leaves_its_kernel_compiled():
    kernel = triton_env.jit(_scale)  # a kernel of its own: nothing compiled for it in this process
    x = torch.randn(1024, device="cuda")
    y = torch.full_like(x, 7.0)
    with triton_env.compile_ahead() as held:
        _launch(kernel, x, y, 3.0)
        _launch(kernel, x[:17], y[:17], 5.0)  # n = 1024 is a multiple of 16, 17 not: two compiles
    torch.cuda.synchronize()
    assert held is True
    assert torch.equal(y, torch.full_like(x, 7.0))
    compiled = kernel.device_caches[torch.cuda.current_device()][0]
    assert len(compiled) == 2 and all(type(k).__name__ == "CompiledKernel" for k in compiled.values())
    _launch(kernel, x, y, 3.0)
    torch.testing.assert_close(y, x * 3.0)
    assert len(compiled) == 2  # the real launch found its kernel compiled


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decoding_is_the_same_with_kernels_compiled_ahead_or_one_by_one(monkeypatch, dtype):
    from fxopt.runtime import cuda_graph
    model = tiny("llama", seed=3).to("cuda", dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    out = {}
    for ahead in (False, True):
        monkeypatch.setattr(cuda_graph, "COMPILE_AHEAD", ahead)
        compiled = fxopt.compile(model, max_batch_size=4, max_seq_len=64)
        out[ahead] = (compiled.generate(ids, max_new_tokens=10),
                      compiled.generate(ids[:1], max_new_tokens=10, do_sample=True, seed=2))
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])


@contextlib.contextmanager
def _pretend_to_hold_back():
    """compile_ahead's hold on launches, without Triton's asynchronous compile (no GPU here)."""
    token = triton_env._COMPILE_ONLY.set(True)
    try:
        yield True
    finally:
        triton_env._COMPILE_ONLY.reset(token)


def test_a_failing_dry_run_is_warned_of_and_the_capture_goes_on(monkeypatch):
    """cuda_graph's dry run before a capture: an error there is a warning, not a failure (the
    warm-up reruns the step for real), and the step itself still runs afterwards."""
    from fxopt.runtime import cuda_graph
    calls = []

    def step():
        calls.append(triton_env._COMPILE_ONLY.get())
        if len(calls) == 1:
            raise RuntimeError("took a decision from garbage")

    monkeypatch.setattr(cuda_graph, "compile_ahead", _pretend_to_hold_back)
    with pytest.warns(UserWarning, match="compiling a capture's kernels ahead failed \\(RuntimeError: took a"):
        cuda_graph._dry_run(step)
    step()
    assert calls == [True, False]

