"""Attention over a static KV cache: ``torch.ops.fxopt.cached_attention``.

    out = cached_attention(q, k, v, k_cache, v_cache, positions, scale, window)

- ``q`` [B, Hq, S, D]; ``k``, ``v`` [B, Hkv, S, D] (before any GQA repeat; Hq % Hkv == 0);
- ``k_cache``, ``v_cache`` [max_batch, Hkv, max_seq, D], written in place: row ``b``'s token ``s``
  goes to slot ``positions[b, s]``;
- each query at position ``p`` then attends to the slots ``j <= p`` of its own row (and
  ``j > p - window`` when ``window > 0``, for sliding-window models);
- optional ``cos``, ``sin`` [B, S, D] (the dtype of q and k): the rotary embedding, applied to q
  and k first (``rotary.py``), so that it costs no kernel of its own at decode. ``fuse`` folds an
  ``fxopt.rotary`` whose only reader is the attention into it;
- optional ``prefetch``: a weight the attention's kernel warms the L2 with while it runs (the
  ``prefetch`` pass hands it the output projection's, see ``passes/prefetch.py``). A hint that
  changes no value: the reference ignores it.

Prefill (S = prompt length) and decode (S = 1) are the same op. A batch of prompts of different
lengths is right-padded: a pad token writes a slot past its row's prompt, which the row's real
queries never see, and the row's next real token overwrites it.

``torch.ops.fxopt.prompt_attention`` (same arguments) is the special case of a prompt that starts
at slot 0 of every row, ``positions[b, s] == s``: it still writes k/v into the caches, but a query
then sees only the prompt's own keys, so the attention is plain causal attention over q, k, v and
never reads the cache. The prefill graph (``runtime/last_token.py``) uses it, since a prefill
always starts a sequence; on CUDA it runs on cuDNN's fused attention (``attention_triton.py``).
Its output is *token-major*: [B, Hq, S, Dv] with [B, S, Hq, Dv] in memory, so that the
``transpose(1, 2).reshape(B, S, Hq * Dv)`` models apply before the output projection is a view,
not a copy of the prompt's attention output.

This file holds the plain-PyTorch reference (the ground truth, runs anywhere) and the fake
implementation (shapes); a Triton kernel registers itself for CUDA on top of them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rotary import rotary_reference


def cached_attention_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                               positions: Tensor, scale: float, window: int = 0,
                               cos: Tensor | None = None, sin: Tensor | None = None,
                               prefetch: Tensor | None = None) -> Tensor:
    """Write k/v into the caches at ``positions``, then attend causally over the cache. With
    ``cos``/``sin``, q and k are rotated first (``rotary_reference``). ``prefetch`` is ignored."""
    if cos is not None:
        q, k = rotary_reference(q, k, cos, sin)
    batch, heads_q, seq, _ = q.shape
    heads_kv = k.shape[1]
    _check(q, k, v, k_cache, v_cache, positions)
    idx = positions[:, None, :, None]
    k_cache[:batch].scatter_(2, idx.expand(batch, heads_kv, seq, k.shape[-1]), k.to(k_cache.dtype))
    v_cache[:batch].scatter_(2, idx.expand(batch, heads_kv, seq, v.shape[-1]), v.to(v_cache.dtype))
    # Only slots up to the largest position can be attended; trimming is exact (the rest is masked).
    # On CUDA the whole cache is used instead: reading the max would sync the host.
    length = k_cache.shape[2] if positions.is_cuda else int(positions.max()) + 1
    keys = k_cache[:batch, :, :length].float()
    values = v_cache[:batch, :, :length].float()
    group = heads_q // heads_kv
    qf = q.float().reshape(batch, heads_kv, group * seq, q.shape[-1])  # queries of one kv head together
    scores = torch.matmul(qf, keys.transpose(-1, -2)) * scale  # [B, Hkv, G*S, L]
    scores = scores.reshape(batch, heads_kv, group, seq, length)
    slots = torch.arange(length, device=q.device)
    pos = positions[:, None, None, :, None]
    visible = slots <= pos
    if window > 0:
        visible = visible & (slots > pos - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).reshape(batch, heads_kv, group * seq, length)
    out = torch.matmul(probs, values).reshape(batch, heads_q, seq, v.shape[-1])
    return out.to(q.dtype)


def token_major(x: Tensor) -> Tensor:
    """``x`` [B, H, S, D] with [B, S, H, D] in memory: ``x`` itself if it is laid out so already,
    else a copy."""
    t = x.transpose(1, 2)
    return x if t.is_contiguous() else t.contiguous().transpose(1, 2)


def empty_token_major(batch: int, heads: int, seq: int, dim: int, like: Tensor, dtype=None) -> Tensor:
    """An uninitialized [batch, heads, seq, dim] tensor with [batch, seq, heads, dim] in memory."""
    return like.new_empty((batch, seq, heads, dim), dtype=dtype or like.dtype).transpose(1, 2)


def _check(q, k, v, k_cache, v_cache, positions) -> None:
    batch, heads_q, seq, _ = q.shape
    if k_cache.shape[0] < batch:
        raise ValueError(f"cached_attention: batch {batch} exceeds the KV cache's max_batch_size {k_cache.shape[0]}")
    if heads_q % k.shape[1]:
        raise ValueError(f"cached_attention: {heads_q} query heads are not a multiple of {k.shape[1]} kv heads")
    if positions.shape != (batch, seq):
        raise ValueError(f"cached_attention: positions {list(positions.shape)} must be [batch, seq] = [{batch}, {seq}]")


@torch.library.custom_op("fxopt::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor, scale: float, window: int = 0,
                     cos: Tensor | None = None, sin: Tensor | None = None,
                     prefetch: Tensor | None = None) -> Tensor:
    return cached_attention_reference(q, k, v, k_cache, v_cache, positions, scale, window, cos, sin)


@torch.library.custom_op("fxopt::prompt_attention", mutates_args=("k_cache", "v_cache"))
def prompt_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor, scale: float, window: int = 0,
                     cos: Tensor | None = None, sin: Tensor | None = None,
                     prefetch: Tensor | None = None) -> Tensor:
    """``cached_attention`` for prompts at slots 0..S-1 of every row (``positions[b, s] == s``), its
    output token-major."""
    return token_major(cached_attention_reference(q, k, v, k_cache, v_cache, positions, scale, window, cos, sin))


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, scale, window=0, cos=None, sin=None, prefetch=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@prompt_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, scale, window=0, cos=None, sin=None, prefetch=None):
    return empty_token_major(*q.shape[:-1], v.shape[-1], like=q)
