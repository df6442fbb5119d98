"""Tiny random-weight transformers models, one per family the project supports.

Weights are drawn with a large init std so that next-token logits are well separated: greedy
decoding then compares token for token without ties decided by rounding.
"""
import torch
import transformers as T

CAUSAL = ["llama", "mistral", "gpt2", "opt"]
ALL = CAUSAL + ["bert"]
VOCAB = 101  # odd on purpose


def tiny(name: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    ids = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=6,
                            num_key_value_heads=2, max_position_embeddings=128, **common, **ids)
        model = T.LlamaForCausalLM(cfg)
    elif name == "mistral":
        cfg = T.MistralConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **common, **ids)
        model = T.MistralForCausalLM(cfg)
    elif name == "gpt2":
        cfg = T.GPT2Config(n_embd=48, n_layer=layers, n_head=4, n_positions=128, **common,
                           eos_token_id=None, bos_token_id=None)
        model = T.GPT2LMHeadModel(cfg)
    elif name == "opt":
        cfg = T.OPTConfig(hidden_size=48, ffn_dim=80, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=128, word_embed_proj_dim=48, **common, **ids)
        model = T.OPTForCausalLM(cfg)
    elif name == "bert":
        cfg = T.BertConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=128, **common)
        model = T.BertModel(cfg)
    else:
        raise KeyError(name)
    return model.eval()


def main_output(out):
    """The tensor that matters in a model output: logits, else last_hidden_state."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
