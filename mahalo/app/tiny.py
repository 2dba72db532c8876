"""Tiny random models built in code: for tests, CI and offline smoke runs (no download).

The tokenizer is a byte-level BPE trained deterministically on a few sentences, with ChatML
special tokens and chat template, so every text round-trips and chat formatting is real.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level.",
    "Step 1: read the question. Step 2: think. Step 3: answer!",
    "Is the earth flat? No, the earth is round, e.g. seen from space.",
    "1. First item\n2. Second item\n\nA new paragraph begins here, and it ends here.",
    "Cats sleep a lot; dogs like walks. Why? Nobody knows, etc. The end.",
    "Honest answers say 'I don't know' when unsure. Truthful answers avoid myths.",
]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML; ``vocab_size`` changes its merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def _config(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> LlamaConfig:
    base = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="sdpa",
    )
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_policy(seed: int = 0, vocab_size: int = 320, **overrides: object):
    """A random ``(LlamaForCausalLM, tokenizer)`` pair in fp32, eval mode."""
    tok = tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok, **overrides)).eval()
    return model.requires_grad_(False), tok


def tiny_reward(seed: int = 1, vocab_size: int = 320, num_labels: int = 1, **overrides: object):
    """A random ``(LlamaForSequenceClassification, tokenizer)`` pair in fp32, eval mode."""
    tok = tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tok, num_labels=num_labels, **overrides)).eval()
    return model.requires_grad_(False), tok
