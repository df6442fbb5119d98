"""The generation loop over a compiled causal LM with a static KV cache.

A batch of prompts of different lengths is right-padded for prefill; every row keeps its own
positions (0..len-1 for its prompt, then len, len+1, ...), which are also its cache slots. Then
one token per row per step. Output follows transformers' ``generate``: the (padded) prompt,
then the new tokens, rows that finished early padded with ``pad_token_id``.

Example::

    >>> out = compiled.generate(ids, attention_mask=mask, max_new_tokens=32)              # greedy
    >>> out = compiled.generate(ids, do_sample=True, top_p=0.9, temperature=0.7, seed=0)  # sampled
    >>> for tokens in compiled.stream(ids, max_new_tokens=32): print(tokens)              # streamed
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import GenerationError
from ..kernels import sampling  # noqa: F401 - registers torch.ops.fxopt.argmax
from .greedy_loop import MAX_EOS_IDS


MODEL_DEFAULT = object()  # eos_token_id not given: the model's own (None given: never stop early)


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row from [B, V] logits (temperature → top-k → top-p, as transformers)."""
        if not self.do_sample:
            return greedy(logits)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_logits.softmax(dim=-1) >= self.top_p  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                                 1, generator=generator).squeeze(-1).to(logits.device)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``: ``fxopt::argmax``, one kernel on CUDA (``kernels/sampling.py``)."""
    return torch.ops.fxopt.argmax(logits)


def _prompts(input_ids, attention_mask) -> list[torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
    if input_ids.dim() != 2:
        raise GenerationError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise GenerationError("empty batch: input_ids has no rows")
    if attention_mask is None:
        rows = list(input_ids)
    else:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                                  f"{list(input_ids.shape)}")
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token per row")
    return rows


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


class _Request:
    """A validated generation request: prompts, limits, token ids."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
        cache = model.kv_cache
        self.rows = _prompts(input_ids, attention_mask)
        self.lengths = torch.tensor([len(r) for r in self.rows])
        batch, longest = len(self.rows), int(self.lengths.max())
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch > cache["max_batch_size"]:
            raise GenerationError(f"batch of {batch} prompts exceeds max_batch_size={cache['max_batch_size']} "
                                  "(compile with a larger max_batch_size, or split the batch)")
        if longest + max_new_tokens > cache["max_seq_len"]:
            raise GenerationError(
                f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} is "
                f"{longest + max_new_tokens} tokens, beyond max_seq_len={cache['max_seq_len']} "
                "(compile with a larger max_seq_len, or shorten the request)")
        self.eos = self.eos_of(model, eos_token_id)
        self.pad = self.pad_of(model, pad_token_id, eos_token_id)
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def eos_of(model, eos_token_id) -> set[int]:
        return _eos_set(model.info.generation.get("eos_token_id") if eos_token_id is MODEL_DEFAULT else eos_token_id)

    @staticmethod
    def pad_of(model, pad_token_id, eos_token_id) -> int:
        pad = pad_token_id if pad_token_id is not None else model.info.generation.get("pad_token_id")
        if pad is None:
            eos = _Request.eos_of(model, eos_token_id)
            pad = min(eos) if eos else 0
        return int(pad)


def _device(model) -> torch.device:
    for t in model.graph_module.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def stream(model, input_ids, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
    """Yield a [batch] tensor of new tokens per step (``pad_token_id`` for rows already done).

    Takes the options of :func:`generate`. ``eos_token_id``: an id or a list of ids that end a
    row; left out, the model's own (from its generation config); ``None``, no early stop (as in
    transformers).
    """
    for tokens in _decode(model, input_ids, attention_mask, check_every=1, **kwargs):
        yield tokens.cpu()


@torch.no_grad()  # generate() calls it directly: without this, autograd would track every step
def _decode(model, input_ids, attention_mask=None, *, check_every: int, max_new_tokens: int = 32,
            do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            eos_token_id=MODEL_DEFAULT, pad_token_id=None, seed: int | None = None,
            generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """The loop. Tokens, positions and the done-flags stay on the device; the host looks at the
    done-flags only every ``check_every`` steps (a sync), so a GPU never waits for Python."""
    req = _Request(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    timer = _Timer(device)
    batch, longest = len(req.rows), int(req.lengths.max())

    # prefill: right-padded prompts, each row at positions 0..longest-1
    ids = torch.full((batch, longest), req.pad, dtype=torch.long)
    for i, row in enumerate(req.rows):
        ids[i, :len(row)] = row
    lengths = req.lengths.to(device)
    next_logits = model.prefill(ids.to(device), (lengths - 1).to(device))

    pad = torch.full((batch,), req.pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(req.eos), dtype=torch.long, device=device) if req.eos else None
    position = lengths[:, None].clone()
    tokens = sampling.pick(next_logits, generator)
    timer.prefill_done()
    loop = None  # greedy steps on a CUDA graph pick and feed back their own tokens (greedy_loop.py)
    for step in range(req.max_new_tokens):
        # Without an end-of-sequence token no row can finish early: no masking, no sync to ask.
        if eos is not None and loop is None:
            tokens = torch.where(done, pad, tokens)  # finished rows emit padding
            done |= torch.isin(tokens, eos)
        yield tokens
        if step == req.max_new_tokens - 1 or (eos is not None and (step + 1) % check_every == 0 and bool(done.all())):
            break
        if step == 0 and not sampling.do_sample and len(req.eos) <= MAX_EOS_IDS:
            loop = model.greedy_loop(batch, device)
            if loop is not None:
                loop.start(tokens, position, done, pad=req.pad, eos=req.eos)
                done = loop.done[:batch]
        if loop is not None:
            loop.step()
            tokens = loop.tokens(step)[:batch]
        else:
            next_logits = model.step(tokens[:, None], position)[:, -1]
            position += 1
            tokens = sampling.pick(next_logits, generator)
    timer.finish(model, step + 1, batch)


class _Timer:
    """Prefill and decode wall time of one generation (synchronizing the device at the two ends)."""

    def __init__(self, device):
        self.device = device
        self._sync()
        self.start = time.perf_counter()
        self.prefill_end = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prefill_done(self):
        self._sync()
        self.prefill_end = time.perf_counter()

    def finish(self, model, tokens: int, batch: int):
        self._sync()
        end = time.perf_counter()
        decode_steps = max(tokens - 1, 1)
        model.last_timings = {
            "prefill_ms": (self.prefill_end - self.start) * 1e3,
            "decode_ms_per_token": (end - self.prefill_end) * 1e3 / decode_steps,
            "new_tokens": tokens, "batch": batch,
        }


def generate(model, input_ids, attention_mask=None, *, streamer=None, **kwargs) -> torch.Tensor:
    """Generate like transformers' ``model.generate``: returns [batch, prompt + new] token ids.

    Options: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``eos_token_id`` (left out: the model's; None: never stop early), ``pad_token_id``,
    ``seed`` or ``generator`` for reproducible sampling.
    ``streamer``: an object with ``put(tokens)`` and ``end()`` (transformers' ``TextStreamer``
    works) or a callable taking each step's [batch] tokens.
    """
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    prompt = input_ids if input_ids.dim() == 2 else input_ids[None]
    if streamer is not None:
        steps = []
        for tokens in stream(model, input_ids, attention_mask, **kwargs):
            steps.append(tokens)
            (streamer.put if hasattr(streamer, "put") else streamer)(tokens)
        if hasattr(streamer, "end"):
            streamer.end()
    else:
        steps = list(_decode(model, input_ids, attention_mask, check_every=8, **kwargs))
    new = torch.stack(steps, dim=1).cpu()
    # The host looks for "all rows done" only every few steps: cut after the step where the last
    # row emitted its end-of-sequence token, as transformers does.
    eos = _Request.eos_of(model, kwargs.get("eos_token_id", MODEL_DEFAULT))
    if eos:
        hits = torch.isin(new, torch.tensor(sorted(eos)))
        if bool(hits.any(dim=1).all()):
            new = new[:, :int(hits.int().argmax(dim=1).max()) + 1]
    return torch.cat([prompt.cpu(), new], dim=1)
