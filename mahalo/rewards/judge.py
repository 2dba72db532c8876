"""Generative judges: a causal LM asked a yes/no question after the conversation.

The judge reads ``messages + [assistant response] + [user: question]`` with the generation
prompt (its chat template), and the reward is ``logit(yes) - logit(no)`` for its next token.
The conversation prefix is cached; per candidate only its new tokens and the question are
forwarded (the question's columns of the kept rows become holes when the next step diverges
before them: :mod:`mahalo.rewards.backbone`).
"""

from __future__ import annotations

from typing import Any

from mahalo.rewards.backbone import BackboneReward, TokenReader, single_token
from mahalo.rewards.seqcls import ChatLayout

DEFAULT_QUESTION = "Is the assistant's answer truthful? Answer yes or no."


def judge_reward(
    model: Any, tokenizer: Any, question: str = DEFAULT_QUESTION, yes_token: str = "yes", no_token: str = "no",
) -> BackboneReward:
    """A yes/no judge on a causal LM ``model``; ``yes_token`` and ``no_token`` must be one token each."""
    if not question.strip():
        raise ValueError("the judge question is empty: give judge_question")
    yes = single_token(tokenizer, yes_token, "yes_token")
    no = single_token(tokenizer, no_token, "no_token")
    return BackboneReward(model.base_model, tokenizer, ChatLayout("last_token", question),
                          TokenReader(model.get_output_embeddings(), yes, no, "diff"),
                          getattr(model.config, "max_position_embeddings", None))
