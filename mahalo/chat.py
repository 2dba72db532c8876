"""Chat formatting shared by policies and reward models.

The policy continues ``apply_chat_template(messages, add_generation_prompt=True)``.

A reward model scores what its trainer saw: ``apply_chat_template(messages + [assistant],
tokenize=True)``, read at its last token (``score_at="last_token"``: the ``\\n`` after
``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), as RLHFlow-style Bradley-Terry training and
``pipeline("text-classification")`` do. ``score_at="end_of_turn"`` drops the template's trailing
whitespace instead, so the score is read at the end-of-turn token itself.

To score many candidate responses incrementally, :class:`ScoringFormat` splits that rendering at
the assistant's content: ``prefix + content(response) + suffix``. The prefix is cut once more at
its last special token (the *anchor*): tokenisers never merge across special tokens, so
``tokenize(head) + tokenize(anchor + content + suffix)`` is the tokenisation of the whole
conversation, without re-tokenising the whole prompt for every candidate. The split is checked
against the template on a probe response when it is built; a template for which the shortcut does
not hold falls back to tokenising the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

Messages = list[dict[str, str]]

SCORE_AT = ("last_token", "end_of_turn")

_PLACEHOLDER = "\u2063MAHALO_RESPONSE\u2063"
_PAD = " \n"  # whitespace around the placeholder: tells whether the template trims the content
_PROBE = "Probe answer. It has 2 sentences."


ROLES = ("system", "user", "assistant")


def as_messages(prompt: str | Messages) -> Messages:
    """Normalise a prompt (a user string or an OpenAI-style list of chat messages) to a message list.

    A conversation is a list of ``{"role", "content"}`` turns: roles ``system`` (first turn
    only), ``user`` and ``assistant``, each with non-empty text, ending with a user turn (the
    turn the policy answers).

    Raises:
        ValueError: on an empty prompt or a malformed conversation, naming the turn and the fix.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty: pass a non-empty user message")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of chat messages")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} ({m!r}) must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"chat message {i} has unknown role {m['role']!r}: use one of {list(ROLES)}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"chat message {i} is a system turn: a system turn may only come first")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"chat message {i} ({m['role']}) has empty content: give it text")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(
            f"the last chat message is a {out[-1]['role']} turn: a conversation must end with the user's turn")
    return out


def with_system(messages: Messages, system_prompt: str | None) -> Messages:
    """``messages`` with ``system_prompt`` as their first turn when they have no system turn."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Plain fallback for tokenizers without a template: "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generation_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the chat prompt the policy continues (generation prompt appended)."""
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


def conversation_prefix_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of ``messages`` rendered as the start of a longer conversation (no generation
    prompt): what prompts that continue the same turns (a system turn) have in common. Empty when
    the template cannot render them alone."""
    if not messages:
        return []
    try:
        return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
    except (TemplateError, ValueError, TypeError, IndexError):  # a template that needs a user turn
        return []


def conversation_text(tokenizer: Any, messages: Messages, response: str, follow_up: str | None = None) -> str:
    """The chat rendering of ``messages`` followed by the assistant's ``response``; with
    ``follow_up``, then that user message and the generation prompt (a judge's question)."""
    turns = [*messages, {"role": "assistant", "content": response}]
    if follow_up is None:
        return _render(tokenizer, turns, False)
    return _render(tokenizer, [*turns, {"role": "user", "content": follow_up}], True)


def _added_token_texts(tokenizer: Any) -> list[str]:
    """Texts of the tokens the tokenizer splits out before tokenising (special and added)."""
    texts = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    texts.update(getattr(tokenizer, "all_special_tokens", []))
    return [t for t in texts if t]


@dataclass(frozen=True)
class ScoringFormat:
    """How one prompt's conversations are tokenised for a reward model.

    A response's scoring ids are ``head_ids + tokenize(anchor + content(response) + suffix)``,
    equal to ``apply_chat_template(messages + [assistant response], tokenize=True)``; for
    ``score_at="end_of_turn"`` the rendering's trailing whitespace is removed before tokenising.
    """

    head_ids: list[int]  # the prefix up to its last special token, tokenised once
    anchor: str  # the rest of the prefix: from its last special token to the content
    suffix: str  # what the template writes after the content (end of turn ...)
    strip_left: bool  # the template trims the content's leading whitespace
    strip_right: bool  # ... and its trailing whitespace
    rstrip: bool = False  # end_of_turn: the conversation's trailing whitespace is not scored

    def content(self, response: str) -> str:
        """The response as the template writes it (trimmed where the template trims)."""
        if self.strip_left:
            response = response.lstrip()
        return response.rstrip() if self.strip_right else response

    def text(self, response: str) -> str:
        """What is tokenised after ``head_ids`` for ``response``."""
        text = self.anchor + self.content(response) + self.suffix
        return text.rstrip() if self.rstrip else text

    def ids(self, tokenizer: Any, responses: list[str]) -> list[list[int]]:
        """Scoring ids of each response, one batched tokeniser call."""
        return scoring_ids(tokenizer, [self] * len(responses), responses)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the conversation before the response (what a reward model prefills)."""
        return self.head_ids + _encode(tokenizer, self.anchor)


def scoring_ids(tokenizer: Any, formats: list[ScoringFormat], responses: list[str]) -> list[list[int]]:
    """Scoring ids of each response under its own prompt's format, one batched tokeniser call."""
    encoded = tokenizer([f.text(r) for f, r in zip(formats, responses)], add_special_tokens=False)["input_ids"]
    return [f.head_ids + list(e) for f, e in zip(formats, encoded)]


def scoring_format(
    tokenizer: Any, messages: Messages, score_at: str = "last_token", follow_up: str | None = None
) -> ScoringFormat:
    """The :class:`ScoringFormat` of ``messages`` under ``tokenizer``'s chat template.

    With ``follow_up`` the conversation goes on after the response: that user message and the
    generation prompt (what a generative judge reads before answering).

    Raises:
        ValueError: an unknown ``score_at``, or a template that does not write the assistant's
            content verbatim (apart from trimming its outer whitespace).
    """
    if score_at not in SCORE_AT:
        raise ValueError(f"unknown score_at {score_at!r}: choose one of {list(SCORE_AT)}")
    full = conversation_text(tokenizer, messages, _PAD + _PLACEHOLDER + _PAD, follow_up)
    if full.count(_PLACEHOLDER) != 1:
        raise ValueError("the chat template does not render the assistant content verbatim")
    before, after = full.split(_PLACEHOLDER)
    strip_left, strip_right = not before.endswith(_PAD), not after.startswith(_PAD)
    prefix = before if strip_left else before[: -len(_PAD)]
    template_suffix = after if strip_right else after[len(_PAD):]
    at_eot = score_at == "end_of_turn"
    suffix = template_suffix.rstrip() if at_eot else template_suffix
    cut = max((prefix.rfind(t) for t in _added_token_texts(tokenizer)), default=-1)
    fmt = ScoringFormat(_encode(tokenizer, prefix[:cut]) if cut > 0 else [], prefix[max(cut, 0):], suffix,
                        strip_left, strip_right, at_eot)
    # The probe must tokenise exactly like the whole conversation; else tokenise the whole prefix.
    rendered = conversation_text(tokenizer, messages, _PROBE, follow_up)
    if rendered != prefix + fmt.content(_PROBE) + template_suffix:
        raise ValueError("the chat template does not render the assistant content verbatim")
    expected = _encode(tokenizer, prefix + fmt.content(_PROBE) + suffix)
    if fmt.head_ids and fmt.ids(tokenizer, [_PROBE])[0] != expected:
        fmt = ScoringFormat([], prefix, suffix, strip_left, strip_right, at_eot)
    return fmt


def conversation_ids(tokenizer: Any, messages: Messages, response: str, score_at: str = "last_token") -> list[int]:
    """The token ids a reward model scores for ``response`` (see :class:`ScoringFormat`)."""
    return scoring_format(tokenizer, messages, score_at).ids(tokenizer, [response])[0]


def template_end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the chat template writes right after an assistant's content, if any.

    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``<|end|>``
    for Phi-3, ``</s>`` for Llama 2 / Mistral; nothing for a tokenizer without a chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    suffix = scoring_format(tokenizer, [{"role": "user", "content": "Hi"}], "end_of_turn").suffix
    ids = _encode(tokenizer, suffix.lstrip())
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    return ids[:1] if ids and ids[0] in special else []
