"""Step-token process reward models: the response split into steps, a separator token after each
step, a score read at every separator, aggregated over steps.

* Qwen2.5-Math-PRM style (:func:`token_classifier_prm`): a token-classification model with two
  labels; a step's score is P(label 1) at its ``<extra_0>``. The conversation is the chat
  template's, the assistant content ``step1<extra_0>step2<extra_0>...``.
* Math-Shepherd style (:func:`causal_lm_prm`): a causal LM; a step's score is
  P(good) / (P(good) + P(bad)) from the logits at its step tag (``" ки"``; good ``"+"``, bad
  ``"-"``), on the plain text ``question + " " + "step1 ки\\nstep2 ки"``.

The steps are the engine's steps (sentences, lines, ...), each stripped of surrounding
whitespace; empty ones are skipped (an empty response is one empty step). Earlier steps' scores
stay in the reward state: a step is forwarded once (:mod:`mahalo.rewards.backbone`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mahalo.chat import Messages, ScoringFormat, scoring_format, scoring_ids
from mahalo.rewards.backbone import AGGREGATES, BackboneReward, HeadReader, TokenReader, aggregate, single_token
from mahalo.rewards.protocol import Candidates
from mahalo.rewards.seqcls import head_of

STEP_TEMPLATES = ("chat", "plain")


def step_tag_id(tokenizer: Any, tag: str) -> int:
    """The token a step tag ends with, checked to stay one token after text.

    Raises:
        ValueError: the tag's last token changes with the text before it.
    """
    ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
    after = tokenizer("The answer is 4." + tag, add_special_tokens=False)["input_ids"]
    if not ids or not after or after[-1] != ids[-1]:
        raise ValueError(
            f"step_tag {tag!r} does not end in the same token after text: use a special token "
            "(like <extra_0>) or a tag with a leading space (like ' ки')"
        )
    return int(ids[-1])


@dataclass(frozen=True)
class StepFormat(ScoringFormat):
    """A :class:`~mahalo.chat.ScoringFormat` that knows where the response's ids start."""

    start: int = 0  # tags are read at positions >= start


def _leading_specials(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer(text)`` puts before the text (a BOS), as ``tokenizer.encode`` adds them."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


@dataclass(frozen=True)
class StepLayout:
    """The response as steps, ``tag`` after each step, steps joined by ``join``; read at every tag.

    ``template``: ``chat`` (the chat template, assistant content = the tagged steps) or ``plain``
    (the last user message, a space, the tagged steps: Math-Shepherd).
    """

    tag: str
    tag_id: int
    join: str = ""
    template: str = "chat"
    how: str = "min"

    def __post_init__(self) -> None:
        if self.template not in STEP_TEMPLATES:
            raise ValueError(f"unknown step_template {self.template!r}: choose one of {list(STEP_TEMPLATES)}")
        if self.how not in AGGREGATES:
            raise ValueError(f"unknown aggregate {self.how!r}: choose one of {list(AGGREGATES)}")

    def content(self, steps: list[str]) -> str:
        """What the model reads as the response: ``step1 + tag + join + step2 + tag ...``."""
        parts = [s.strip() for s in steps]
        parts = [p for p in parts if p] or [""]
        return self.join.join(p + self.tag for p in parts)

    def format(self, tokenizer: Any, messages: Messages) -> StepFormat:
        if self.template == "plain":
            users = [m["content"] for m in messages if m["role"] == "user"]
            question = users[-1] if users else messages[-1]["content"]
            fmt = StepFormat(_leading_specials(tokenizer), question + " ", "", False, False)
        else:  # reads are at the tags: what the template writes after the content is never needed
            fmt = StepFormat(**{**asdict(scoring_format(tokenizer, messages, "last_token")), "suffix": ""})
        # tags are looked for after the prompt (its last token may merge with the response's first)
        return replace(fmt, start=max(len(fmt.head_ids), len(fmt.prefix_ids(tokenizer)) - 1))

    def ids(self, tokenizer: Any, formats: list[ScoringFormat], candidates: Candidates) -> list[list[int]]:
        steps = candidates.steps if candidates.steps is not None else [[t] for t in candidates.texts]
        return scoring_ids(tokenizer, formats, [self.content(s) for s in steps])

    def step_tokens(self, tokenizer: Any) -> int:
        """Tokens each further step adds besides its text: its tag and the join."""
        return len(tokenizer(self.tag + self.join, add_special_tokens=False)["input_ids"])

    def positions(self, fmt: StepFormat, ids: list[int]) -> list[int]:
        found = [q for q in range(fmt.start, len(ids)) if ids[q] == self.tag_id]
        return found or [len(ids) - 1]

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, self.how)


def token_classifier_prm(
    model: Any, tokenizer: Any, step_tag: str = "<extra_0>", aggregate_how: str = "min", join: str = ""
) -> BackboneReward:
    """A Qwen2.5-Math-PRM-style PRM: ``model`` has ``base_model`` and a 2-output token head
    (``score`` or ``classifier``, a Linear or an MLP); the step score is P(label 1) at each tag."""
    head = head_of(model)
    if head is None or not hasattr(model, "base_model"):
        raise ValueError(f"{type(model).__name__} has no token-classification head (score or classifier)")
    layout = StepLayout(step_tag, step_tag_id(tokenizer, step_tag), join, "chat", aggregate_how)
    return BackboneReward(model.base_model, tokenizer, layout, HeadReader(head, "prob"),
                          getattr(model.config, "max_position_embeddings", None))


def causal_lm_prm(
    model: Any, tokenizer: Any, step_tag: str = " ки", good_token: str = "+", bad_token: str = "-",
    aggregate_how: str = "min", join: str = "\n", template: str = "plain",
) -> BackboneReward:
    """A Math-Shepherd-style PRM: a causal LM; the step score is P(good) among {good, bad} from
    the logits at each step tag."""
    good = single_token(tokenizer, good_token, "good_token")
    bad = single_token(tokenizer, bad_token, "bad_token")
    layout = StepLayout(step_tag, step_tag_id(tokenizer, step_tag), join, template, aggregate_how)
    return BackboneReward(model.base_model, tokenizer, layout,
                          TokenReader(model.get_output_embeddings(), good, bad, "prob"),
                          getattr(model.config, "max_position_embeddings", None))
