"""What every ``*_triton.py`` kernel file needs to know about Triton, in one place.

    from .triton_env import INTERPRET, jit, tl, triton

- ``triton`` is None on an install without Triton: fxopt still imports, and the ops keep their
  plain-PyTorch references (``tl`` is then a stand-in, so kernel annotations still evaluate).
- ``INTERPRET`` is read once, at import: ``triton.jit`` makes interpreter functions (kernels that
  run on CPU tensors) if and only if ``TRITON_INTERPRET=1`` was set before.
"""
import contextlib
import contextvars
import functools
import os
import types
from concurrent.futures import ThreadPoolExecutor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = types.SimpleNamespace(constexpr=int)

try:  # Triton's hook for compiling kernels in an executor (a launch returns a future kernel)
    from triton.runtime._async_compile import AsyncCompileMode, active_mode as _async_mode
    from triton.runtime.jit import JITFunction
except ImportError:
    AsyncCompileMode = _async_mode = JITFunction = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --------------------------------------------------------------------------------------------- #
# Compiling ahead: a cold start compiles its kernels side by side, not one launch after the other.
# --------------------------------------------------------------------------------------------- #
#
# A first prefill or decode step launches about a dozen distinct kernels (tiles and folds differ by
# linear: 11 for the llama shapes in bf16), and each first launch compiles its kernel before running
# it, a fraction of a second to a second each, one after the other. Inside ``compile_ahead()`` a launch of an fxopt kernel only
# submits its compilation to a thread pool (Triton's ``AsyncCompileMode``: the compiler and ptxas
# run outside the GIL) and runs nothing; leaving the block waits for all of them. So
#
#     with compile_ahead():
#         step(*inputs)      # a dry run: every kernel compiles, in parallel; outputs are garbage
#     step(*inputs)          # the real run finds them compiled
#
# The dry run's outputs are garbage (what the skipped kernels would have written is left
# uninitialized): only a run whose results are thrown away may be dry, and it must not index with
# a kernel's output (``runtime/cuda_graph.capture`` runs one before its warm-up runs, whose inputs
# are all given). Without Triton, under the interpreter or with a Triton lacking the hook, the
# block runs its body as usual. Measured (benchmarks/cold_start.py, H100, 16 host cores, 2026-12-08):
# a cold start of the llama2-7b shape 15.0 -> 13.5 s, of llama-1b 13.1 -> 10.7 s.

_COMPILE_ONLY = contextvars.ContextVar("fxopt_triton_compile_only", default=False)


def jit(fn=None, **options):
    """``triton.jit`` (with its options), except that inside ``compile_ahead()`` a launch of the
    kernel only compiles it."""
    if fn is None:
        return functools.partial(jit, **options)
    if triton is None:
        return fn
    kernel = triton.jit(fn, **options)
    if JITFunction is not None and isinstance(kernel, JITFunction):
        launch = kernel.run

        @functools.wraps(launch)
        def run(*args, warmup=False, **kwargs):
            return launch(*args, warmup=warmup or _COMPILE_ONLY.get(), **kwargs)

        kernel.run = run  # ``kernel[grid](...)`` and ``kernel.warmup(...)`` call ``self.run``
    return kernel


@contextlib.contextmanager
def compile_ahead(workers: int | None = None):
    """Within the block, launching an fxopt kernel submits its compilation to ``workers`` threads
    (default: the CPU count, at most 16) and runs nothing; on leaving, every compilation has
    finished (or raised). Yields True if launches are being held back, False if the block runs
    as usual (no Triton, the interpreter, a Triton without ``AsyncCompileMode``, or already inside
    an asynchronous compile)."""
    if AsyncCompileMode is None or INTERPRET or _async_mode.get() is not None:
        yield False
        return
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1), thread_name_prefix="fxopt-jit") as pool:
        with AsyncCompileMode(pool):
            token = _COMPILE_ONLY.set(True)
            try:
                yield True
            finally:
                _COMPILE_ONLY.reset(token)

# --------------------------------------------------------------------------------------------- #
# Programmatic dependent launch (PDL): a decode kernel's launch overlaps the tail of the one before.
# --------------------------------------------------------------------------------------------- #
#
# Inside a CUDA graph a decode step is a chain of ~200 small kernels (7B shape, batch 1), and each
# pays a fixed cost at its edges: its launch, then the SMs the previous kernel's last wave leaves
# idle. With PDL (Hopper and later) a kernel launched with ``launch_pdl=True`` may start once every
# program of the kernel before it has called ``gdc_launch_dependents()``. The decode kernels
# (linear_triton, quant_triton, attention_triton) and the RMSNorm and gated-activation kernels
# that run between them (norm_triton, activation_triton: an INT8 model's activation, the norms
# above one row) follow one protocol:
#
#   1. ``gdc_wait()`` first: it blocks until the kernel before has finished and its writes are
#      visible. Nothing is read or written before it (a buffer of the graph's memory pool may be
#      one the kernel before still reads).
#   2. ``gdc_launch_dependents()`` after the main loop, only once the kernel's own wait is behind
#      it: the next kernel becomes resident on the SMs this one's tail leaves idle, and waits.
#
# Because of 2, when kernel N+1 starts early kernel N has passed its wait, so everything before N
# has finished: no more than two kernels are ever in flight.
#
# Two knobs of the one-row GEMVs (linear_triton, quant_triton: ``trigger_steps`` and ``preload`` in
# their tile settings) stretch the overlap. A GEMV's weight is a constant, so its programs may warm
# the L2 with the first ``preload`` bytes of their weight rows *before* step 1
# (``l2_prefetch_rows``: a hint, it writes nothing); and a GEMV may trigger ``trigger_steps`` K
# steps before the end of its loop (still after its own wait, so 2's bound holds), so that the next
# kernel is resident, prefetching, while this one streams its last steps. Neither changes a bit of
# any result (tests/test_pdl.py).
#
# Measured (benchmarks/decode.py --pdl, H100, 2026-12-05): 7B batch 1 4.917 -> 4.821 ms, 1B batch 1
# 1.109 -> 1.062 ms; batch 8 and INT8 within 0.8 %. Tried and dropped: triggering right after the
# wait (7B 5.00 ms, 1B 1.21 ms: kernels pile up and contend); prefetching each GEMV program's first
# 2 KiB of weight rows into L2 before the wait (bf16 within 0.8 %, INT8 batch 8 3.90 -> 4.36 ms);
# triggering before the wait (an earlier version: every later kernel became resident at once).
# The knobs (H100, 2026-12-07, docs/performance.md): the bf16 GEMV with trigger_steps=1, preload=1024
# 4.801 -> 4.777 ms (7B) and 1.039 -> 1.030 ms (1B), its default since; the INT8 GEMV 0.9-1.1 % slower
# with them, so 0 / 0 there.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a triton without grid dependency control: pdl_code() is then always 0
    gdc_launch_dependents = gdc_wait = None

PDL_MODES = ("off", "on")
PDL_MODE = os.environ.get("FXOPT_PDL", "on")
_PDL_DEVICES: dict = {}


def pdl_code(device) -> int:
    """The kernels' PDL constexpr for a launch on ``device``: 1 if PDL_MODE is "on" and the device
    takes it (CUDA, compute capability 9.0 or more, not the interpreter, a triton with it), else 0.
    Read at every launch: a mode holds for what is compiled and captured under it."""
    if PDL_MODE not in PDL_MODES:
        raise ValueError(f"FXOPT_PDL={PDL_MODE!r}: expected one of {', '.join(PDL_MODES)}")
    if PDL_MODE == "off" or INTERPRET or gdc_wait is None or getattr(device, "type", None) != "cuda":
        return 0
    index = device.index if device.index is not None else -1
    if index not in _PDL_DEVICES:
        import torch

        _PDL_DEVICES[index] = torch.cuda.get_device_capability(device)[0] >= 9
    return int(_PDL_DEVICES[index])


def check_pdl_knobs(trigger_steps, preload, owner: str) -> None:
    """Reject the PDL tile knobs (``trigger_steps``, ``preload``) a kernel cannot take."""
    if not (isinstance(trigger_steps, int) and trigger_steps >= 0):
        raise ValueError(f"{owner}: trigger_steps must be a count of K steps >= 0, got {trigger_steps!r}")
    if not (isinstance(preload, int) and (preload == 0 or (preload >= 128 and preload & (preload - 1) == 0))):
        raise ValueError(f"{owner}: preload must be 0 or a power of two >= 128 (bytes a row), got {preload!r}")


if triton is not None:
    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Step 1: wait for the kernel before to finish (a no-op without PDL)."""
        if PDL:
            gdc_wait()

    @triton.jit
    def pdl_trigger(PDL: tl.constexpr):
        """Step 2, after the kernel's own wait: let the next kernel launch."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def pdl_trigger_at(k0, k_trigger, PDL: tl.constexpr, STEPS: tl.constexpr):
        """Step 2 from inside a K loop: trigger at the step starting at ``k_trigger`` (STEPS > 0;
        the kernel still calls ``pdl_trigger`` after its loop, a no-op once triggered)."""
        if PDL and STEPS > 0:
            if k0 == k_trigger:
                gdc_launch_dependents()

    @triton.jit
    def l2_prefetch_rows(BASE, rows, n_rows, row_stride, row_bytes, NBYTES: tl.constexpr):
        """Warm the L2 with the first NBYTES bytes of each of ``rows`` of a matrix of ``n_rows`` rows
        (byte pointer BASE, rows ``row_stride`` bytes apart, ``row_bytes`` long): one
        ``prefetch.global.L2`` a 128-byte line. A hint that writes nothing, so a kernel may issue it
        before its PDL wait (weights are constants). Rows and bytes past the matrix are clamped
        onto its last row and byte: no address outside the tensor is touched."""
        offs = tl.minimum(tl.arange(0, NBYTES // 128) * 128, row_bytes - 1)
        rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
        ptrs = BASE + rows[:, None] * row_stride + offs[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


# --------------------------------------------------------------------------------------------- #
# L2 prefetch: a latency-bound kernel warms the L2 with the weight the next kernel will stream.
# --------------------------------------------------------------------------------------------- #
#
# At batch 1 the decode attention reads a few MB of KV cache in ~5 us: the memory is all but idle
# while it runs, and the output projection after it then streams its whole weight from HBM. The
# ``prefetch`` pass (passes/prefetch.py) hands the attention that weight; its programs issue bulk
# L2 prefetches (``cp.async.bulk.prefetch.L2``, Hopper) for it before they wait for their inputs
# (weights are constants, and a prefetch writes nothing, so it races with no kernel). The
# projection then finds its first rows in L2. A hint only: results are the same bits either way.
PREFETCH_MODES = ("off", "on")
PREFETCH_MODE = os.environ.get("FXOPT_PREFETCH", "on")
# At most this share of the L2 is prefetched a launch: the rest holds what the kernels in between
# read (the KV cache, activations), and prefetched lines must survive until the projection reads them.
PREFETCH_L2_FRACTION = 0.5
# What a decode GEMV prefetches of the next linear's weight once its own loop is done (the
# ``prefetch`` pass with ``prefetch_linears=True``): about what the memory moves while the last
# programs finish.
PREFETCH_TAIL_BYTES = 4 << 20
# One bulk request per thread and program: a 4-warp program issues 128.
PREFETCH_CHUNKS = 128


def prefetch_plan(weight, programs: int, limit: int | None = None) -> tuple[int, int]:
    """``(total, chunk)``: the bytes of ``weight`` that ``programs`` programs prefetch into L2 (at
    most ``limit``, and PREFETCH_L2_FRACTION of the L2), each issuing PREFETCH_CHUNKS requests of
    ``chunk`` bytes; ``(0, 0)`` when there is nothing to do (no weight, the mode is off, not a Hopper
    or later GPU run natively, a misaligned weight)."""
    if weight is None or programs < 1:
        return 0, 0
    if PREFETCH_MODE not in PREFETCH_MODES:
        raise ValueError(f"FXOPT_PREFETCH={PREFETCH_MODE!r}: expected one of {', '.join(PREFETCH_MODES)}")
    device = weight.device
    if PREFETCH_MODE == "off" or INTERPRET or triton is None or device.type != "cuda" or weight.data_ptr() % 16:
        return 0, 0
    l2_bytes = _hopper_l2_bytes(device.index)
    if not l2_bytes:
        return 0, 0
    nbytes = weight.numel() * weight.element_size()
    return prefetch_split(nbytes if limit is None else min(nbytes, limit), l2_bytes, programs)


@functools.lru_cache(maxsize=None)
def _hopper_l2_bytes(index) -> int:
    """The L2 size of CUDA device ``index`` if it is a Hopper or later GPU (the bulk prefetch
    instruction is sm_90), else 0."""
    import torch

    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.L2_cache_size if props.major >= 9 else 0


def prefetch_split(nbytes: int, l2_bytes: int, programs: int) -> tuple[int, int]:
    """``(total, chunk)`` for a weight of ``nbytes``: at most PREFETCH_L2_FRACTION of the L2, a
    multiple of 16 bytes (what the bulk prefetch takes), shared evenly by ``programs`` x
    PREFETCH_CHUNKS requests of ``chunk`` bytes, a multiple of 16 as well."""
    total = min(nbytes, int(l2_bytes * PREFETCH_L2_FRACTION))
    total -= total % 16
    if total <= 0:
        return 0, 0
    per_request = -(-total // (programs * PREFETCH_CHUNKS))
    return total, -(-per_request // 16) * 16


if triton is not None:
    @triton.jit
    def l2_prefetch(PTR, program, total, chunk, CHUNKS: tl.constexpr):
        """Program ``program``'s share of bytes ``[0, total)`` at PTR, prefetched into L2: CHUNKS bulk
        requests of ``chunk`` bytes (the last one shorter; none past ``total``). ``total`` and
        ``chunk`` are multiples of 16, as the instruction wants (``prefetch_split``)."""
        offs = (program.to(tl.int64) * CHUNKS + tl.arange(0, CHUNKS)) * chunk
        size = tl.minimum(tl.maximum(total - offs, 0), chunk).to(tl.int32)
        base = PTR.to(tl.pointer_type(tl.int8))
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)
