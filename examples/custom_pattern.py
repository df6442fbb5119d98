"""Teach the `fuse` pass a pattern of your own, and read what it did (and almost did).

    python examples/custom_pattern.py

CLIP-style models write QuickGELU out: ``x * sigmoid(1.702 * x)``. Below, a custom op computes it
in one go, and a pattern tells `fuse` where to put it. The pattern is a plain PyTorch function; fxopt
captures it the way it captures models, so it matches whatever spelling the model's code produced.
"""
import tempfile

import torch
import torch.nn as nn

import fxopt
from fxopt.patterns import Pattern, example, match_all, register_pattern


# 1. The op to fuse into: a torch custom op with a reference and a fake (shape) implementation.
@torch.library.custom_op("mylib::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@quick_gelu.register_fake
def _(x):
    return torch.empty_like(x)


# 2. The pattern: what to find (a function over tensors, with example inputs for its shapes and
#    dtypes), and what to put there (emitted through match.call).
QUICK_GELU = Pattern(
    "quick_gelu",
    lambda x: x * torch.sigmoid(1.702 * x),
    example_inputs=dict(x=example(2, 3, 8)),
    replacement=lambda m: m.call(torch.ops.mylib.quick_gelu.default, m["x"]),
    predicate=lambda m: m["x"].meta["val"].dim() >= 2 or "expected activations, not a vector",
)


class MLP(nn.Module):
    def __init__(self, dim=32, hidden=64, k=1.702):
        super().__init__()
        self.up, self.down, self.k = nn.Linear(dim, hidden), nn.Linear(hidden, dim), k

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.sigmoid(self.k * h) * h)  # operands the other way round: still a match


def main():
    inputs = (torch.randn(4, 32),)

    # Find without rewriting: what would match, and where.
    gm = fxopt.compile(MLP(), example_inputs=inputs, passes=["canonicalize"]).graph_module
    print("matches:", [(m.module_path or "<root>", m["x"].name) for m in match_all(gm, QUICK_GELU)])

    # Register it: from now on every `fuse` applies it, after the built-in patterns.
    register_pattern(QUICK_GELU)
    dump_dir = tempfile.mkdtemp(prefix="dumps-custom-pattern-")
    model = MLP().eval()
    compiled = fxopt.compile(model, passes=["canonicalize", "fuse", "dce"], example_inputs=inputs, verify=True,
                             dump_dir=dump_dir)
    print(compiled.report())  # fuse ... quick_gelu=1
    x = torch.randn(9, 32)
    print("max abs difference vs eager:", (compiled(x) - model(x)).abs().max().item())

    # A model that spells it with another constant almost matches: the report says where it stopped.
    almost = fxopt.compile(MLP(k=1.7), passes=["canonicalize", "fuse", "dce"], example_inputs=inputs)
    print(almost.report()[1].stats["near_miss"])
    # quick_gelu: matched 2 of 3 nodes; stopped at aten.mul (argument 'other' is 1.7, expected 1.702)
    print(f"graph dumps: {dump_dir}/index.html (02_fuse.diff shows the rewrite)")


if __name__ == "__main__":
    main()
