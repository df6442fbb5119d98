"""Tensor-parallel decode: ms per token at TP = 1, 2, 4 for the same model, same cards, same run.

    torchrun --nproc-per-node 1 benchmarks/tp_decode.py --model llama2-7b   # the TP=1 baseline
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --model llama2-7b
    bash benchmarks/tp_suite.sh                                              # 1, 2 and 4 GPUs, one table

Every rank builds the same random-weight bf16 model (seeded; shapes from ``decode.py``) on its GPU,
compiles it with fxopt's default pipeline and ``tp`` = the number of ranks (``shard`` splits it,
NCCL all-reduces run inside the captured CUDA graphs), drops the full model, and decodes
``--new`` tokens after a ``--prompt`` token prompt. Rank 0 prints one JSON line per batch size
(and appends it to ``--json``). ``--smoke`` runs a tiny model on CPU with gloo, to check the script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fxopt  # noqa: E402
from decode import CONFIGS  # noqa: E402


def build(name: str, smoke: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512) if smoke else CONFIGS[name]
    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--passes", default=None, help="comma-separated pipeline (default: fxopt's, with shard)")
    parser.add_argument("--allreduce", default="nccl", choices=["nccl", "symm_mem"],
                        help="how shard spells its all-reduces (tp_allreduce)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU with gloo: checks the script")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "tp_decode.jsonl"))
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/tp_decode.py needs CUDA GPUs (or --smoke)")
    rank, world = fxopt.distributed.setup(backend="gloo" if args.smoke else None)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    model = build(args.model, args.smoke, device)
    passes = args.passes.split(",") if args.passes else None
    t0 = time.perf_counter()
    extra = {"tp_allreduce": args.allreduce} if world > 1 else {}
    compiled = fxopt.compile(model, passes=passes, tp=world, max_batch_size=max(args.batches), **extra,
                             max_seq_len=args.prompt + args.new + 8)
    compile_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    # correctness beside speed: the sharded logits of a 16-token prompt against the eager model's
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids.to(device)).logits.float()
        got = compiled(input_ids=ids.to(device), position_ids=torch.arange(16, device=device)[None]).logits.float()
    rel_err = float((got - want).norm() / want.norm())
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        best = None
        for _ in range(3):
            compiled.generate(ids, max_new_tokens=args.new, eos_token_id=None)
            ms = compiled.last_timings["decode_ms_per_token"]
            best = ms if best is None else min(best, ms)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
        rows.append(dict(model=args.model, tp=world, allreduce=args.allreduce if world > 1 else "-", batch=batch,
                         ms_per_token=round(best, 3),
                         tokens_per_s=round(batch * 1e3 / best, 1), compile_s=round(compile_s, 1),
                         peak_GB_per_rank=round(peak, 2), logits_rel_err=float(f"{rel_err:.2e}"),
                         gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                         torch=torch.__version__, date=time.strftime("%Y-%m-%d")))
    if rank == 0:
        with open(args.json, "a") as f:
            for r in rows:
                print(json.dumps(r), flush=True)
                f.write(json.dumps(r) + "\n")
    if not fxopt.distributed.teardown():
        fxopt.distributed.exit_now(0)


if __name__ == "__main__":
    main()
