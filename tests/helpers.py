"""Reference computations for the tests: full forwards with no cache."""

import torch

from mahalo.chat import as_messages, conversation_parts, generation_prompt_ids


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a full forward over ``ids`` -> (len(ids), V)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def full_reward(model, tokenizer, prompt, response_ids: list[int]) -> float:
    """The classifier's own forward over prefix + response + suffix (no padding, no cache)."""
    parts = conversation_parts(tokenizer, as_messages(prompt))
    ids = parts.prefix_ids + response_ids + parts.suffix_ids
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids])).logits[0].double()
    return float(out[0]) if out.numel() == 1 else float(torch.softmax(out, -1)[1])


def prompt_ids(tokenizer, prompt) -> list[int]:
    return generation_prompt_ids(tokenizer, as_messages(prompt))


def response_ids_of(result, step_index: int, cand_index: int) -> list[int]:
    """Whole response ids of a candidate: its ancestors' chunks then its own."""
    chain = []
    s, c = step_index, cand_index
    while s >= 0 and c >= 0:
        cand = result.steps[s].candidates[c]
        chain.append(cand.token_ids)
        s, c = s - 1, cand.parent
    return [t for chunk in reversed(chain) for t in chunk]
