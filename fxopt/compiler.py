"""``fxopt.compile``: capture, run the pass pipeline, return a drop-in module.

Example::

    >>> compiled = fxopt.compile(model, passes=["canonicalize", "dce"], verify=True, dump_dir="dumps")
    >>> compiled(input_ids).logits            # called exactly like the model
    >>> print(compiled.report())              # what each pass did
"""
from __future__ import annotations

import time

import torch
import torch.utils._pytree as pytree

from .capture import capture, is_causal_lm
from .errors import FxoptError
from .passes import CompileContext, PassManager
from .runtime.compiled import CompiledModel

DEFAULT_PASSES = ["canonicalize", "dce"]
DEFAULT_LM_PASSES = ["canonicalize", "kv_cache", "fuse", "position_tables", "fold_linear", "dce", "cuda_graph"]


def default_passes(model: torch.nn.Module, tp: int = 1) -> list[str]:
    """The pipeline used when ``passes=None``: generation passes for a causal LM; with ``tp`` > 1,
    ``shard`` right after ``canonicalize``."""
    passes = list(DEFAULT_LM_PASSES if is_causal_lm(model) else DEFAULT_PASSES)
    if tp > 1:
        passes.insert(1, "shard")
    return passes


def check_tp(passes: list, tp: int) -> None:
    """``tp`` > 1 needs the ``shard`` pass in the pipeline."""
    names = [p if isinstance(p, str) else getattr(p, "name", "") for p in passes]
    if tp > 1 and "shard" not in names:
        raise FxoptError(f"tp={tp} needs the 'shard' pass: add it right after 'canonicalize' "
                         f"(passes={names[:1] + ['shard'] + names[1:]})")


def compile(model: torch.nn.Module, passes=None, *, example_inputs=None, dump_dir=None, verify: bool = False,
            disable=None, stop_after=None, dynamic: bool = True, progress: bool = False,
            trace_every_layer: bool = False, **options) -> CompiledModel:
    """Compile ``model`` with a pipeline of passes.

    ``passes``: names (see ``fxopt.available_passes()``), Pass objects or functions
    ``gm -> gm | None``; None takes the default pipeline for the model.
    ``example_inputs``: a tuple or dict of forward arguments (transformers models may omit them).
    ``dump_dir``: write a graph dump after every pass, browsable through ``index.html``.
    ``verify``: run the graph after each pass and compare with the eager model.
    ``disable``/``stop_after``: skip passes by name / stop after one, to bisect.
    ``progress``: show a progress bar over the passes on stderr.
    ``trace_every_layer``: trace every layer of a stack of like layers instead of three, copying
    the third for the rest (``fxopt.repeated_layers``; the report's capture line says which).
    ``options``: pass options, e.g. ``max_batch_size``, ``max_seq_len`` for ``kv_cache``, ``tp`` for
    ``shard`` (tensor parallelism: run under torchrun after ``fxopt.distributed.setup()``).
    """
    tp = int(options.get("tp", 1) or 1)
    passes = default_passes(model, tp) if passes is None else list(passes)
    check_tp(passes, tp)
    manager = PassManager(passes, verify=verify, dump_dir=dump_dir, disable=disable, stop_after=stop_after,
                          progress=progress)  # before capture: a bad pipeline fails at once
    model_was_training = model.training
    model.eval()
    started = time.perf_counter()
    gm = capture(model, example_inputs, dynamic=dynamic, trace_every_layer=trace_every_layer)
    info = gm.meta["fxopt"]
    seconds = manager.report.capture_seconds = time.perf_counter() - started
    manager.report.capture = f"capture: {seconds:.1f}s, {len(gm.graph.nodes)} nodes" + (f"; {info.layers}" if info.layers else "")
    ctx = CompileContext(info=info, options=dict(options))
    inputs = reference = None
    if verify and any(p.device.type == "meta" for p in model.parameters()):
        raise FxoptError(f"verify=True needs real weights, but {type(model).__name__} has parameters on the meta "
                         "device; load them first (fxopt.compile_from_checkpoint) or compile without verify")
    if verify:
        inputs = pytree.tree_leaves(((), info.example_inputs))
        with torch.no_grad():
            reference = pytree.tree_leaves(model(**info.example_inputs))
    gm = manager.run(gm, ctx, inputs=inputs, reference=reference)
    if model_was_training:
        model.train()
    return CompiledModel(gm, manager.report, ctx)
