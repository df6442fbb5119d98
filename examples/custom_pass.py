"""Write your own fxopt pass, run it in a pipeline, verify it, and read what it did.

    python examples/custom_pass.py        # writes dumps to ./dumps-custom-pass, prints the report

The pass below fuses ``x * sigmoid(x)`` into ``silu(x)``: it reads the dataflow (which op feeds
which), never module names, so it fires wherever a model spells SiLU the long way.
"""
import tempfile

import torch
import torch.nn as nn

import fxopt
from fxopt.ir import is_op, replace_node

aten = torch.ops.aten


class FuseSiLU(fxopt.Pass):
    """mul(x, sigmoid(x)) → silu(x), in either operand order."""

    name = "fuse_silu"

    def run(self, gm, ctx):
        fused = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.mul.Tensor):
                continue
            a, b = node.args
            for x, sig in ((a, b), (b, a)):
                if is_op(sig, aten.sigmoid.default) and sig.args[0] is x:
                    with gm.graph.inserting_before(node):
                        silu = gm.graph.call_function(aten.silu.default, (x,))
                    replace_node(node, silu)
                    fused += 1
                    break
        gm.graph.eliminate_dead_code()  # the sigmoid is dead now
        return fxopt.PassResult(changed=fused > 0, stats={"fused": fused})


class GatedMLP(nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.sigmoid(h))  # SiLU, spelled out


def main():
    model = GatedMLP().eval()
    dump_dir = tempfile.mkdtemp(prefix="dumps-custom-pass-")
    compiled = fxopt.compile(model, passes=["canonicalize", FuseSiLU(), "dce"],
                             example_inputs=(torch.randn(4, 32),), verify=True, dump_dir=dump_dir)
    print(compiled.report())
    x = torch.randn(9, 32)  # another batch size: same graph, no recompilation
    print("max abs difference vs eager:", (compiled(x) - model(x)).abs().max().item())
    print(f"graph dumps: {dump_dir}/index.html (open it in a browser; 02_fuse_silu.diff shows the rewrite)")


if __name__ == "__main__":
    main()
