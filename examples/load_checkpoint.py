"""Compile a model straight from its safetensors checkpoint, quantized while loading.

    python examples/load_checkpoint.py [MODEL_DIR]      # default: the bundled SmolLM2-135M-Instruct

The model is built and compiled on the meta device (no weights anywhere), the load plan says
what every weight of the compiled graph is made of, and each one is then read from the files and
put in its final form (q/k/v concatenated, int8) one at a time: the float model never exists
whole. The answer is compared with the eagerly loaded model compiled the usual way.
"""
import sys

import torch

import fxopt
from fxopt.checkpoint import compile_from_checkpoint, compile_on_meta, load_plan
from fxopt.models import default_model_dir, load_model

PASSES = ["canonicalize", "kv_cache", "fuse", "quantize", "dce"]
OPTIONS = dict(max_batch_size=1, max_seq_len=128, quant_bits=8, quant_group_size=64)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()

    # 1. What will be loaded, and how: compiled on the meta device, nothing read yet.
    plan = load_plan(compile_on_meta(path, PASSES, dtype=torch.float32, **OPTIONS))
    lines = str(plan).splitlines()
    print("\n".join(lines[:14] + ["    ..."] + lines[-3:]), "\n")

    # 2. Compile and load for real, weights quantized on the fly.
    compiled = compile_from_checkpoint(path, PASSES, dtype=torch.float32, device="cpu", **OPTIONS)
    print(compiled.report())
    print(compiled.info.state["checkpoint"], "\n")

    # 3. Same tokens as the eagerly loaded model, compiled and quantized the usual way.
    model, tokenizer = load_model(path, dtype=torch.float32)
    reference = fxopt.compile(model, PASSES, **OPTIONS)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    ours = compiled.generate(ids, max_new_tokens=12)
    theirs = reference.generate(ids, max_new_tokens=12)
    print("answer:", repr(tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)))
    print("same tokens as the eagerly loaded model:", torch.equal(ours, theirs))


if __name__ == "__main__":
    main()
