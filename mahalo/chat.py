"""Chat formatting shared by policies and reward models.

A reward model reads ``prefix + response + suffix`` where ``prefix`` is the chat template
rendered up to the first character of the assistant's content and ``suffix`` is what the
template writes after it (its end-of-turn marker), with trailing whitespace removed so that the
score is read at the end-of-turn token itself (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
Llama 3). Splitting the rendering at a placeholder keeps the response tokens separate, so a
cached prefix can be reused and only the response's new tokens are forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]

_PLACEHOLDER = "\u2063MAHALO_RESPONSE\u2063"


def as_messages(prompt: str | Messages) -> Messages:
    """Normalise a prompt (a user string or a list of chat messages) to a message list.

    Raises:
        ValueError: on an empty prompt or a malformed message list.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty: pass a non-empty user message")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of chat messages")
    for m in prompt:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {m!r} must be a dict with 'role' and 'content'")
    return [dict(m) for m in prompt]


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    # Plain fallback for tokenizers without a template: "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generation_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the chat prompt the policy continues (generation prompt appended)."""
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


@dataclass(frozen=True)
class ConversationParts:
    """Token ids around the assistant response: ``prefix_ids + response + suffix_ids``."""

    prefix_ids: list[int]
    suffix_ids: list[int]


def conversation_parts(tokenizer: Any, messages: Messages) -> ConversationParts:
    """Split the chat rendering of ``messages + [assistant]`` around the assistant's content."""
    full = _render(
        tokenizer, [*messages, {"role": "assistant", "content": _PLACEHOLDER}], False
    )
    if full.count(_PLACEHOLDER) != 1:
        raise ValueError("the chat template does not render the assistant content verbatim")
    prefix, suffix = full.split(_PLACEHOLDER)
    suffix = suffix.rstrip()
    return ConversationParts(_encode(tokenizer, prefix), _encode(tokenizer, suffix))


def conversation_ids(tokenizer: Any, messages: Messages, response: str) -> list[int]:
    """The full token sequence a reward model scores for ``response`` (re-tokenised text)."""
    parts = conversation_parts(tokenizer, messages)
    return parts.prefix_ids + _encode(tokenizer, response) + parts.suffix_ids
