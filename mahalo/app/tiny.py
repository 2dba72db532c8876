"""Tiny random models built in code: for tests, CI and offline smoke runs (no download).

The tokenizers are trained deterministically on a few sentences and carry real special tokens and
chat templates (ChatML by default; Llama 3, Gemma, Phi-3 and a SentencePiece-style Llama 2 on
request), so every text round-trips and chat formatting is real.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3: BOS in the text, headers, content trimmed, <|eot_id|> ends a turn.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma: "model" turns, content trimmed, <end_of_turn> ends a turn, <eos> is the tokenizer's EOS.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
    "'assistant' else message['role']) + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3: <|end|> ends a turn; without a generation prompt the text ends with the EOS token.
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Llama 2 / Mistral on a SentencePiece-style (Metaspace) tokenizer: [INST] ... [/INST] answer</s>.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class ChatStyle:
    """A tokenizer family: its special tokens, chat template and which tokens end a turn."""

    specials: tuple[str, ...]
    template: str
    eos: str  # the tokenizer's EOS token
    pad: str
    bos: str | None
    generation_eos: tuple[str, ...]  # the model's generation_config.eos_token_id
    metaspace: bool = False  # SentencePiece-style pre-tokenisation instead of byte-level BPE


STYLES: dict[str, ChatStyle] = {
    "chatml": ChatStyle(("<|pad|>", "<|im_start|>", "<|im_end|>"), CHATML, "<|im_end|>", "<|pad|>",
                        "<|im_start|>", ("<|im_end|>",)),
    "llama3": ChatStyle(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"), LLAMA3, "<|eot_id|>",
                        "<|finetune_right_pad_id|>", "<|begin_of_text|>",
                        ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    "gemma": ChatStyle(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), GEMMA, "<eos>", "<pad>",
                       "<bos>", ("<eos>",)),
    "phi3": ChatStyle(("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"), PHI3,
                      "<|endoftext|>", "<|endoftext|>", None, ("<|endoftext|>",)),
    "llama2": ChatStyle(("<unk>", "<s>", "</s>"), LLAMA2, "</s>", "<unk>", "<s>", ("</s>",), metaspace=True),
}
_CORPUS = [
    "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level.",
    "Step 1: read the question. Step 2: think. Step 3: answer!",
    "Is the earth flat? No, the earth is round, e.g. seen from space.",
    "1. First item\n2. Second item\n\nA new paragraph begins here, and it ends here.",
    "Cats sleep a lot; dogs like walks. Why? Nobody knows, etc. The end.",
    "Honest answers say 'I don't know' when unsure. Truthful answers avoid myths.",
]
_ASCII = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


@functools.lru_cache(maxsize=16)
def tiny_tokenizer(vocab_size: int = 320, style: str = "chatml") -> PreTrainedTokenizerFast:
    """A tokenizer trained deterministically on a few sentences, with a real chat template.

    ``style`` picks the family (:data:`STYLES`): byte-level BPE with ChatML (default), Llama 3,
    Gemma or Phi-3 special tokens and templates, or a SentencePiece-style (Metaspace) BPE with the
    Llama 2 template. ``vocab_size`` changes its merges.
    """
    chat = STYLES[style]
    if chat.metaspace:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = _ASCII + ["\u2581"]
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(chat.specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chat.eos, pad_token=chat.pad, bos_token=chat.bos)
    fast.chat_template = chat.template
    return fast


def _config(tokenizer: PreTrainedTokenizerFast, style: str, **overrides: object) -> LlamaConfig:
    eos = [tokenizer.convert_tokens_to_ids(t) for t in STYLES[style].generation_eos]
    base = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="sdpa",
    )
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_policy(seed: int = 0, vocab_size: int = 320, style: str = "chatml", **overrides: object):
    """A random ``(LlamaForCausalLM, tokenizer)`` pair in fp32, eval mode.

    The model's ``generation_config.eos_token_id`` lists the style's end-of-generation tokens.
    """
    tok = tiny_tokenizer(vocab_size, style)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok, style, **overrides)).eval()
    return model.requires_grad_(False), tok


def tiny_reward(seed: int = 1, vocab_size: int = 320, num_labels: int = 1, style: str = "chatml",
                **overrides: object):
    """A random ``(LlamaForSequenceClassification, tokenizer)`` pair in fp32, eval mode."""
    tok = tiny_tokenizer(vocab_size, style)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tok, style, num_labels=num_labels, **overrides)).eval()
    return model.requires_grad_(False), tok


@functools.lru_cache(maxsize=8)
def tiny_tagged_tokenizer(
    tag: str = "<extra_0>", vocab_size: int = 320, style: str = "chatml"
) -> PreTrainedTokenizerFast:
    """:func:`tiny_tokenizer` with ``tag`` added as a special token (a step PRM's separator)."""
    tok = copy.deepcopy(tiny_tokenizer(vocab_size, style))
    tok.add_special_tokens({"additional_special_tokens": [tag]})
    return tok


def tiny_token_classifier(seed: int = 4, tag: str = "<extra_0>", style: str = "chatml", **overrides: object):
    """A random Qwen2.5-Math-PRM-style step PRM: ``(LlamaForTokenClassification, tokenizer)``,
    two labels, ``tag`` a special token of the tokenizer."""
    tok = tiny_tagged_tokenizer(tag, 320, style)
    torch.manual_seed(seed)
    model = LlamaForTokenClassification(_config(tok, style, num_labels=2, **overrides)).eval()
    return model.requires_grad_(False), tok


def tiny_backbone(seed: int = 5, style: str = "chatml", tag: str | None = None, **overrides: object):
    """A random ``(LlamaModel, tokenizer)`` pair (a value model's backbone)."""
    tok = tiny_tokenizer(320, style) if tag is None else tiny_tagged_tokenizer(tag, 320, style)
    torch.manual_seed(seed)
    model = LlamaModel(_config(tok, style, **overrides)).eval()
    return model.requires_grad_(False), tok


def tiny_value_head(seed: int = 6, hidden_size: int = 64, inner: int = 32) -> dict[str, torch.Tensor]:
    """A random MAHALO-layout MLP value head state dict (``0.*``, ``2.*``)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(inner, hidden_size, generator=gen) * 0.2, "0.bias": torch.randn(inner, generator=gen),
        "2.weight": torch.randn(1, inner, generator=gen) * 0.2, "2.bias": torch.randn(1, generator=gen),
    }
