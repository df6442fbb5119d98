"""The real SmolLM2-135M-Instruct end to end: compile, generate, chat, and the CLI."""
import re

import pytest
import torch

import fxopt
from fxopt.cli import main as cli_main

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def compiled(smollm2_compiled):
    return smollm2_compiled


def _left_padded(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_greedy_equals_transformers_on_a_batch_of_different_lengths(smollm2, compiled):
    model, tokenizer = smollm2
    batch = _left_padded(tokenizer, PROMPTS)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3, lengths
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=32, eos_token_id=None,
              pad_token_id=tokenizer.pad_token_id)
    ours = compiled.generate(batch.input_ids, **kw)
    theirs = model.generate(batch.input_ids, do_sample=False, **kw)
    assert torch.equal(ours, theirs)


def test_chat_answer_contains_paris(smollm2, compiled):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = compiled.generate(ids, max_new_tokens=24)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cli_generate_chat(capsys):
    code = cli_main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "Paris" in out
    assert "tokens/s" in err and "compiled in" in err
    assert re.search(r"\d+ tokens in [\d.]+s: [\d.]+ tokens/s \(cpu, float32, batch 1\); the first after [\d.]+s, "
                     r"then [\d.]+ tokens/s", err), err


def test_speed_line_splits_off_the_first_tokens_wait():
    from fxopt.cli import speed_line
    # 3 rows, 30 tokens in 2 s, the first step's 3 after 0.5 s: 27 more in 1.5 s
    assert speed_line(30, 3, 2.0, 0.5, "cuda, bfloat16, batch 3") == (
        "30 tokens in 2.00s: 15.0 tokens/s (cuda, bfloat16, batch 3); the first after 0.50s, then 18.0 tokens/s")
    # nothing after the first step (or no step at all): the overall rate alone
    assert speed_line(3, 3, 0.5, 0.5, "cpu") == "3 tokens in 0.50s: 6.0 tokens/s (cpu)"
    assert speed_line(0, 1, 0.0, None, "cpu") == "0 tokens in 0.00s: 0.0 tokens/s (cpu)"


def test_cli_errors_are_one_line(capsys):
    code = cli_main(["generate", "--prompt", "hi", "--model", "/no/such/model"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("fxopt: error:") and "/no/such/model" in err
    code = cli_main(["generate", "--prompt", "hi", "--passes", "canonicalize,warp_drive"])
    _, err = capsys.readouterr()
    assert code == 2 and "unknown pass 'warp_drive'" in err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    out, _ = capsys.readouterr()
    for option in ("--prompt", "--model", "--max-new-tokens", "--passes", "--dtype", "--device", "--dump-dir",
                   "--chat", "--do-sample", "--top-p", "--seed", "--trace-every-layer"):
        assert option in out
    cli_main([])
    out, _ = capsys.readouterr()
    assert "generate" in out and "passes" in out
