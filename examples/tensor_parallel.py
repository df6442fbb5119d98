"""Tensor-parallel generation with fxopt, one process per rank.

    torchrun --nproc-per-node 3 examples/tensor_parallel.py                 # the bundled SmolLM2
    torchrun --nproc-per-node 2 examples/tensor_parallel.py path/to/hf-model

Each rank compiles the model on the meta device with the `shard` pass and reads only its slices
of the checkpoint; rank 0 prints the report, the load plan's head and the generated text.
"""
import sys

import torch
from transformers import AutoTokenizer

import fxopt
from fxopt.models import default_model_dir

rank, world = fxopt.distributed.setup()
path = sys.argv[1] if len(sys.argv) > 1 else default_model_dir(progress=rank == 0)
tokenizer = AutoTokenizer.from_pretrained(str(path))
compiled = fxopt.compile_from_checkpoint(path, tp=world, dtype=torch.float32, device=fxopt.distributed.device(),
                                         progress=rank == 0, max_batch_size=1, max_seq_len=64)
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
out = compiled.generate(ids, max_new_tokens=12)
if rank == 0:
    print(compiled.report())
    print("\n".join(str(fxopt.load_plan(compiled)).splitlines()[:8]))
    print(compiled.info.state["checkpoint"])
    print(tokenizer.decode(out[0], skip_special_tokens=True))
if not fxopt.distributed.teardown():  # gives up after 30 s (NCCL teardown can hang after graph replays)
    fxopt.distributed.exit_now(0)
