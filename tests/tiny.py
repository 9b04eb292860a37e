"""Tiny randomly initialised Qwen2 models and a byte-level tokenizer, built locally (nothing downloaded).

`make_tiny_model_dir(path, seed)` writes a transformers directory that `resolve_model` accepts, so tests
exercise the same loading path as the real models. Two seeds give two models with the same tokenizer,
which is all S2T needs from a model pair.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_ROWS = 272  # 256 bytes + 3 specials, padded like GGUF pads Qwen's vocabulary


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def make_tiny_model(seed: int, dtype=torch.float64, layers: int = 2, hidden: int = 64, vocab_rows: int = VOCAB_ROWS):
    """vocab_rows > VOCAB_ROWS leaves more unassigned rows (S2T-Local's 16 score bins need 16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=256, eos_token_id=258,
                      pad_token_id=256, initializer_range=0.2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = [258, 256]
    model.generation_config.pad_token_id = 256
    return model


def make_tiny_model_dir(path: Path, seed: int, dtype=torch.float64, **kw) -> Path:
    path = Path(path)
    model = make_tiny_model(seed, dtype, **kw)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
