"""Quantize the bundled SmolLM2-135M-Instruct to INT8, read the accuracy report, save it, load it back.

    python examples/quantize.py            # INT8, groups of 64 input features
    python examples/quantize.py 4 128      # INT4, groups of 128

1. compiles SmolLM2 with ``fuse`` then ``quantize`` (q/k/v and gate/up quantized as one weight each;
   the LM head, tied to the embedding, stays float);
2. prints the pass report and the five layers with the largest output error;
3. answers a chat prompt with the float and the quantized model;
4. saves the quantized model as one safetensors file and loads it into a model built on the meta
   device (no float weights are ever materialized), checking the logits are identical.
About a minute on a 2-core CPU.
"""
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import fxopt
from fxopt.models import load_model
from fxopt.passes.quantize import format_quant_report, quant_report, quantize_compiled
from fxopt.quantized_io import load_quantized, save_quantized

PROMPT = "What is the capital of France?"


def main(bits=8, group=64):
    model, tokenizer = load_model(None, dtype=torch.float32)
    float_model = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "dce"], max_seq_len=256)
    # quantize_compiled runs the quantize pass on a copy of the float compilation (no second capture);
    # fxopt.compile(model, passes=[..., "fuse", "quantize", "dce"], quant_bits=..., ...) gives the same model.
    quantized = quantize_compiled(float_model, quant_bits=bits, quant_group_size=group)
    print(quantized.report(), "\n")

    rows = quant_report(quantized)
    worst = sorted(rows, key=lambda r: -r["output_rel_err"])[:5]
    print(f"the five layers with the largest output error (of {len(rows)}):")
    print(format_quant_report(worst), "\n")
    before, after = sum(r["float_bytes"] for r in rows), sum(r["quant_bytes"] for r in rows)
    print(f"quantized weights: {before / 2**20:.1f} MiB fp32 -> {after / 2**20:.1f} MiB "
          f"({after / sum(r['bf16_bytes'] for r in rows):.3f}x their bf16 size)\n")

    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    for name, compiled in (("float", float_model), (f"int{bits} g{group}", quantized)):
        out = compiled.generate(ids, max_new_tokens=24)
        print(f"{name:>10}: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantized(quantized, Path(tmp) / f"smollm2-int{bits}-g{group}.safetensors")
        print(f"\nsaved {path.name}: {path.stat().st_size / 2**20:.1f} MiB")
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(model.config)
        loaded = load_quantized(empty, path, max_seq_len=256)
        same = torch.equal(loaded(ids).logits, quantized(ids).logits)
        print(f"loaded into a meta-device model: logits identical: {same}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
