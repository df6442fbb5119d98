"""Patterns: find a subgraph written as a PyTorch function, and replace it.

    import torch
    from fxopt.patterns import Pattern, example, match_all, register_pattern

    def rms(x, w, eps):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    RMS = Pattern("rms_norm", rms, example_inputs=dict(x=example(2, 3, 24), w=example(24), eps=1.2345e-5),
                  replacement=lambda m: m.call(torch.ops.fxopt.rms_norm.default, m["x"], m["w"], m["eps"]))
    match_all(gm, RMS)            # the matches, and .near_miss when one almost matched
    register_pattern(RMS)         # the `fuse` pass applies it from now on

See ``fxopt/patterns/matcher.py`` for the matching rules and ``docs/fusion.md`` for a walk-through.
"""
from .matcher import (CASTS, COMMUTATIVE, Match, Matches, NearMiss, Pattern, PatternError, ScalarWildcard,
                      annotate_near_miss, example, infer_meta, match_all, register_pattern, registered_patterns,
                      rewrite, unregister_pattern)

__all__ = ["CASTS", "COMMUTATIVE", "Match", "Matches", "NearMiss", "Pattern", "PatternError", "ScalarWildcard",
           "annotate_near_miss", "example", "infer_meta", "match_all", "register_pattern", "registered_patterns",
           "rewrite", "unregister_pattern"]
