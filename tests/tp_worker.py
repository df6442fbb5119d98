"""Run under torchrun by test_shard.py: every rank compiles models with ``tp`` = world size.

    torchrun --nproc-per-node N tp_worker.py OUT_DIR JOB [JOB ...]

Jobs, run in order (each rank runs the same list):

- ``family=NAME`` / ``family=NAME+fuse`` / ``+symm`` (``tp_allreduce="symm_mem"``): a tiny model of tests/families.py (or ``llama-kv``,
  below) compiled with ``shard``; logits of three inputs and greedy tokens.
- ``checkpoint=DIR``: ``compile_from_checkpoint(DIR, tp=world)`` of a tiny checkpoint; logits,
  tokens and the load stats of every rank.
- ``memory=DIR``: the resident-memory high-water mark (VmHWM) of this rank around the loading
  done by ``compile_from_checkpoint(DIR, tp=world)``. Put it first: nothing else has run yet.
- ``smollm2=DIR``: the real SmolLM2 from its checkpoint directory: logits of two prompts and 16
  greedy tokens of both (a left-padded batch).
- ``raise`` / ``hang``: failure injection. Both ranks compile a tiny llama; then rank 1 raises
  (or sleeps for 10 minutes) while rank 0 runs the sharded model, i.e. waits in its all-reduce.
  The run must end with a non-zero exit, not hang.

Rank 0 saves what the TP=1 reference is compared with (the exact inputs, logits, tokens) in
``OUT_DIR/<job>.pt``, so test_shard.py computes the reference once, in its own process, with the
same inputs; and writes ``OUT_DIR/results.json``: ``{job: [result of rank 0, rank 1, ...]}``
(a job that raised on a rank: ``{"error": ...}``).
"""
import json
import os
import sys
import time
import traceback

import torch
import transformers as T

import fxopt
from families import VOCAB, tiny

PIPELINE = ["canonicalize", "shard", "kv_cache", "dce"]
FUSED = ["canonicalize", "shard", "kv_cache", "fuse", "dce"]
OPTS = dict(max_batch_size=4, max_seq_len=48)
SHAPES = ((1, 1), (3, 5), (2, 11))  # (batch, seq) of the logits checks
SMOLLM2_PROMPTS = ["The capital of France is", "Once upon a time, in a small village, there lived"]


def model_for(name: str):
    """A tiny model by family name; ``llama-kv``: GQA with fewer kv heads than ranks at tp=4
    (8 query heads, 2 kv heads: each rank keeps one shared kv head)."""
    if name == "llama-kv":
        torch.manual_seed(0)
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                            num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB,
                            initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
        return T.LlamaForCausalLM(cfg).eval()
    return tiny(name)


def inputs(vocab: int = VOCAB, seed: int = 1):
    """The logits inputs ``[(ids, positions)]`` and a generation prompt, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for batch, seq in SHAPES:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        calls.append((ids, torch.arange(seq).expand(batch, -1)))
    return calls, torch.randint(0, vocab, (3, 6), generator=gen)


def run_model(compiled, calls, prompt, max_new_tokens: int = 12) -> dict:
    """What the comparison needs: the inputs, the logits of every call (in order: the KV cache
    sees the same sequence of calls in the reference) and greedy tokens."""
    logits = [compiled(input_ids=ids, position_ids=pos).logits.detach().clone() for ids, pos in calls]
    tokens = compiled.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return {"calls": calls, "prompt": prompt, "logits": logits, "tokens": tokens}


def shard_stats(compiled) -> dict:
    return dict(next(r for r in compiled.report() if r.name == "shard").stats)


def local_bytes(compiled) -> int:
    gm = compiled.graph_module
    tensors = list(gm.parameters()) + list(gm.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


def job_family(arg: str, world: int, save):
    name, *flags = arg.split("+")
    model = model_for(name)
    extra = {"tp_allreduce": "symm_mem"} if "symm" in flags else {}
    compiled = fxopt.compile(model, passes=FUSED if "fuse" in flags else PIPELINE, tp=world, **OPTS, **extra)
    calls, prompt = inputs()
    save(run_model(compiled, calls, prompt))
    local = sum(p.numel() for p in compiled.graph_module.parameters())
    full = sum(p.numel() for p in model.parameters())
    return {"stats": shard_stats(compiled), "param_share": local / full,
            "passes": [r.name for r in compiled.report()]}


def job_checkpoint(path: str, world: int, save):
    compiled = fxopt.compile_from_checkpoint(path, PIPELINE, tp=world, dtype=torch.float32, progress=False, **OPTS)
    calls, prompt = inputs()
    save(run_model(compiled, calls, prompt))
    stats = compiled.info.state["checkpoint"]
    plan = fxopt.load_plan(compiled)
    return {"stats": shard_stats(compiled), "bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes,
            "peak_source_bytes": stats.peak_source_bytes, "local_bytes": local_bytes(compiled),
            "sliced_sources": sum(s.slice is not None for r in plan for s in r.sources), "files": len(stats.files)}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def job_memory(path: str, world: int, save):
    """VmHWM reset (clear_refs 5) right before the loading, read right after it."""
    import fxopt.checkpoint as checkpoint

    measured = {}
    load = checkpoint.load_checkpoint

    def measuring(*args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        reset = _status("VmHWM")
        stats = load(*args, **kwargs)
        measured.update(before=before, hwm_after_reset=reset, hwm=_status("VmHWM"), after=_status("VmRSS"))
        return stats

    checkpoint.load_checkpoint = measuring
    try:
        compiled = fxopt.compile_from_checkpoint(path, PIPELINE, tp=world, dtype=torch.float32, progress=False,
                                                 max_batch_size=1, max_seq_len=16)
    finally:
        checkpoint.load_checkpoint = load
    stats = compiled.info.state["checkpoint"]
    ids = torch.arange(5).unsqueeze(0)
    logits = compiled(input_ids=ids, position_ids=torch.arange(5).unsqueeze(0)).logits
    return {"extra": measured["hwm"] - measured["before"], "reset_ok": measured["hwm_after_reset"] <= measured["before"]
            + 4 * 2**20, **measured, "local_bytes": local_bytes(compiled), "bytes_read": stats.bytes_read,
            "peak_source_bytes": stats.peak_source_bytes, "largest_recipe_bytes": stats.largest_recipe_bytes,
            "checkpoint_bytes": stats.checkpoint_bytes, "logits_finite": bool(torch.isfinite(logits).all()),
            "logits_shape": list(logits.shape), "stats": shard_stats(compiled)}


def smollm2_inputs(tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(SMOLLM2_PROMPTS, return_tensors="pt", padding=True)
    single = [tokenizer(p, return_tensors="pt").input_ids for p in SMOLLM2_PROMPTS]
    return batch.input_ids, batch.attention_mask, single


def run_smollm2(compiled, ids, mask, single, pad) -> dict:
    logits = []
    for x in single:  # one prompt per call, from position 0 (the calls overwrite the cache)
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        logits.append(compiled(input_ids=x, position_ids=pos).logits.detach().clone())
    tokens = compiled.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, pad_token_id=pad)
    return {"ids": ids, "mask": mask, "single": single, "logits": logits, "tokens": tokens}


def job_smollm2(path: str, world: int, save):
    tokenizer = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids, mask, single = smollm2_inputs(tokenizer)
    compiled = fxopt.compile_from_checkpoint(path, PIPELINE, tp=world, dtype=torch.float32, progress=False,
                                             max_batch_size=2, max_seq_len=64)
    save(run_smollm2(compiled, ids, mask, single, tokenizer.pad_token_id))
    stats = compiled.info.state["checkpoint"]
    return {"stats": shard_stats(compiled), "bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes,
            "local_bytes": local_bytes(compiled)}


def job_fail(kind: str, rank: int, world: int):
    compiled = fxopt.compile(tiny("llama"), passes=["canonicalize", "shard", "dce"], tp=world)
    ids = torch.randint(0, VOCAB, (1, 4))
    compiled(input_ids=ids)  # every rank together: the collectives work
    print(f"rank {rank}: ready", file=sys.stderr, flush=True)
    if rank == 1:
        if kind == "raise":
            raise RuntimeError("injected failure on rank 1")
        time.sleep(600)  # hangs: never reaches the collective
    t0 = time.time()
    try:
        compiled(input_ids=ids)  # waits in the all-reduce for rank 1
    finally:
        print(f"rank {rank}: the collective returned or failed after {time.time() - t0:.1f}s", file=sys.stderr,
              flush=True)
    raise AssertionError("the collective returned without rank 1")


# ---------------------------------------------------------------------------------------------


def main():
    out_dir, jobs = sys.argv[1], sys.argv[2:]
    rank, world = fxopt.distributed.setup()
    for job in jobs:
        if job in ("raise", "hang"):
            job_fail(job, rank, world)  # never returns normally
    results = {}
    for job in jobs:
        kind, _, arg = job.partition("=")
        safe = job.replace("/", "_").replace("=", "-").replace("+", "_")[-80:]

        def save(payload, safe=safe):
            if rank == 0:
                torch.save(payload, os.path.join(out_dir, f"{safe}.pt"))

        t0 = time.time()
        try:
            fn = {"family": job_family, "checkpoint": job_checkpoint, "memory": job_memory,
                  "smollm2": job_smollm2}[kind]
            result = fn(arg, world, save)
        except Exception as e:  # noqa: BLE001 - reported to the test
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.time() - t0, 2)
        result["file"] = f"{safe}.pt"
        results[job] = result
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, results)
    if rank == 0:
        merged = {job: [r[job] for r in everyone] for job in jobs}
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(merged, f, indent=1, default=str)
    fxopt.distributed.teardown()


if __name__ == "__main__":
    main()
