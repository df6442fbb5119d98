"""``CompiledModel``: the drop-in module ``fxopt.compile`` returns.

It is called exactly like the original model and returns the same output structure (an object
with ``.logits`` for a transformers LM). After the ``kv_cache`` pass a call is one step of cached
generation, and ``generate()`` drives prefill and decode.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import GenerationError


class CompiledModel(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule, report, ctx):
        super().__init__()
        self.graph_module = gm
        self.info = gm.meta["fxopt"]
        self.ctx = ctx
        self._report = report
        self._runner = None
        self._prefill_gm = False  # built on first use: None when the graph has no single LM head
        self._prefill_runner = None
        self._direct = {}  # id(graph) -> (graph, its code, what runs it): see _executable
        self.last_timings: dict = {}  # of the last generate(): prefill_ms, decode_ms_per_token, ...

    # -- calling ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.info.signature.call(self._executable(self.graph_module), *args, **kwargs)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One forward over ``input_ids`` at ``position_ids``; returns the logits tensor.

        With the ``cuda_graph`` pass, decode steps (one token per row) replay a CUDA graph; the
        logits are then a view of its static output, valid until the next step.
        """
        if input_ids.shape[1] == 1 and input_ids.is_cuda:
            runner = self._cuda_graph_runner()
            if runner is not None:
                return runner(input_ids, position_ids)
        return self.info.signature.call(self._executable(self.graph_module), input_ids=input_ids,
                                        position_ids=position_ids).logits

    def greedy_loop(self, batch: int, device: torch.device):
        """The self-feeding greedy decode step for ``batch`` rows (``greedy_loop.py``): with the
        ``cuda_graph`` pass on a CUDA model, captured on first use; None otherwise (or with the
        pass's option ``cuda_graph_greedy_loop=False``)."""
        plan = self.info.state.get("cuda_graph")
        if device.type != "cuda" or plan is None or not plan.get("greedy_loop", True):
            return None
        runner = self._cuda_graph_runner()
        if runner is None:
            return None
        from .greedy_loop import greedy_loop
        return greedy_loop(runner, batch, device)

    def prefill(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """A forward over the prompts ``input_ids`` [B, S], at positions 0..S-1 of every row (a
        prefill starts the rows' sequences: the cache's earlier contents are dropped), that
        returns only the logits at ``last_index`` ([B]) of each row: [B, V]. The LM head runs on
        those positions only, and attention over the prompt alone (``last_token.py``).

        With the ``cuda_graph`` pass, prefills replay CUDA graphs too (``prefill_graph.py``); the
        logits are then a view of the graph's static output, valid until the next prefill.
        """
        from .last_token import last_token_graph, prompt_positions

        position_ids = prompt_positions(*input_ids.shape, input_ids.device)
        if self._prefill_gm is False:
            self._prefill_gm = last_token_graph(self.graph_module)
        if self._prefill_gm is None:
            logits = self.step(input_ids, position_ids)
            return logits[torch.arange(logits.shape[0], device=logits.device), last_index]
        plan = self.info.state.get("cuda_graph")
        if plan is not None and input_ids.is_cuda:
            if self._prefill_runner is None:
                from .prefill_graph import PrefillGraphRunner
                self._prefill_runner = PrefillGraphRunner(self._prefill_gm, self.info.signature,
                                                          max_seq_len=self.kv_cache["max_seq_len"],
                                                          fallback=plan["fallback"])
            return self._prefill_runner(input_ids, last_index)
        flat = self.info.signature.flatten((), dict(input_ids=input_ids, position_ids=position_ids))
        outputs = self._executable(self._prefill_gm)(*flat, last_index)
        return self.info.signature.unflatten(outputs).logits[:, 0]

    def _executable(self, gm: fx.GraphModule):
        """What runs ``gm``: on a model whose weights are on the CPU, its forward with the fxopt
        ops' Python functions called directly (``direct.py``: the dispatcher costs ~90 µs a call
        there); ``gm`` itself otherwise. Rebuilt when ``gm``'s code changes (a graph edited by hand)."""
        code = gm.code
        cached = self._direct.get(id(gm))
        if cached is None or cached[0] is not gm or cached[1] != code:
            from .direct import direct_forward, on_cpu
            cached = (gm, code, direct_forward(gm) if on_cpu(gm) else gm)
            self._direct[id(gm)] = cached
        return cached[2]

    def _cuda_graph_runner(self):
        plan = self.info.state.get("cuda_graph")
        if plan is None:
            return None
        if self._runner is None:
            from .cuda_graph import CUDAGraphRunner
            cache = self.kv_cache
            self._runner = CUDAGraphRunner(self.graph_module, self.info.signature,
                                           max_batch_size=cache["max_batch_size"], max_seq_len=cache["max_seq_len"],
                                           fallback=plan["fallback"])
        return self._runner

    # -- what happened ----------------------------------------------------------------------
    def report(self):
        """Per-pass table: time, nodes before→after, changed, stats, verification error."""
        return self._report

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def kv_cache(self) -> dict | None:
        """Layout of the static KV cache (max_batch_size, max_seq_len, buffers), if any."""
        return self.info.state.get("kv_cache")

    # -- generation -------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Generate tokens like transformers' ``generate``; see :func:`fxopt.runtime.generate.generate`."""
        from .generate import generate
        self._require_cache()
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def stream(self, input_ids, attention_mask=None, **kwargs):
        """Yield the new tokens of every row ([batch] tensors), one step at a time."""
        from .generate import stream
        self._require_cache()
        return stream(self, input_ids, attention_mask=attention_mask, **kwargs)

    def _require_cache(self):
        if self.kv_cache is None:
            raise GenerationError("generate() needs the 'kv_cache' pass in the pipeline "
                                  "(fxopt.compile(model) adds it for causal LMs by default)")
