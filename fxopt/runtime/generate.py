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

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import GenerationError


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
            return logits.argmax(dim=-1)
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
        gen = model.info.generation
        self.eos = _eos_set(gen.get("eos_token_id") if eos_token_id is MODEL_DEFAULT else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else gen.get("pad_token_id")
        if pad is None:
            pad = min(self.eos) if self.eos else 0
        self.pad = int(pad)
        self.max_new_tokens = max_new_tokens


def _device(model) -> torch.device:
    for t in model.graph_module.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id=MODEL_DEFAULT, pad_token_id=None, seed: int | None = None,
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield a [batch] tensor of new tokens per step (``pad_token_id`` for rows already done).

    ``eos_token_id``: an id or a list of ids that end a row; left out, the model's own (from its
    generation config); ``None``, no early stop (as in transformers).
    """
    req = _Request(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    batch, longest = len(req.rows), int(req.lengths.max())

    # prefill: right-padded prompts, each row at positions 0..longest-1
    ids = torch.full((batch, longest), req.pad, dtype=torch.long)
    for i, row in enumerate(req.rows):
        ids[i, :len(row)] = row
    positions = torch.arange(longest).expand(batch, longest)
    logits = model.step(ids.to(device), positions.to(device))
    last = (req.lengths - 1).to(device)
    next_logits = logits[torch.arange(batch, device=device), last]

    done = torch.zeros(batch, dtype=torch.bool)
    position = req.lengths.clone()
    eos = torch.tensor(sorted(req.eos), dtype=torch.long) if req.eos else None
    for step in range(req.max_new_tokens):
        tokens = sampling.pick(next_logits, generator).cpu()
        tokens = torch.where(done, torch.full_like(tokens, req.pad), tokens)
        yield tokens
        if eos is not None:
            done |= torch.isin(tokens, eos)
        if bool(done.all()) or step == req.max_new_tokens - 1:
            return
        logits = model.step(tokens[:, None].to(device), position[:, None].to(device))
        next_logits = logits[:, -1]
        position += 1


def generate(model, input_ids, attention_mask=None, *, streamer=None, **kwargs) -> torch.Tensor:
    """Generate like transformers' ``model.generate``: returns [batch, prompt + new] token ids.

    ``streamer``: an object with ``put(tokens)`` and ``end()`` (transformers' ``TextStreamer``
    works) or a callable taking each step's [batch] tokens.
    """
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    prompt = input_ids if input_ids.dim() == 2 else input_ids[None]
    new = []
    for tokens in stream(model, input_ids, attention_mask, **kwargs):
        new.append(tokens)
        if streamer is not None:
            (streamer.put if hasattr(streamer, "put") else streamer)(tokens)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat([prompt.cpu(), torch.stack(new, dim=1)], dim=1)
