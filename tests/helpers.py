"""Reference computations for the tests: full forwards with no cache."""

import torch

from mahalo.chat import as_messages, generation_prompt_ids


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a full forward over ``ids`` -> (len(ids), V)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


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


def plain_score(model, tokenizer, prompt, response: str, score_at: str = "last_token") -> float:
    """The reward a user gets from a plain transformers forward of the conversation.

    ``apply_chat_template(messages + [assistant], tokenize=True)`` (for ``end_of_turn``: the
    rendering with its trailing whitespace removed, tokenised), then ``model(ids).logits``.
    """
    messages = [*as_messages(prompt), {"role": "assistant", "content": response}]
    if score_at == "last_token":
        ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    else:
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False).rstrip(), add_special_tokens=False)[
            "input_ids"]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids])).logits[0].double()
    return float(out[0]) if out.numel() == 1 else float(torch.softmax(out, -1)[1])


def response_text_of(result, tokenizer, step_index: int, cand_index: int) -> str:
    """A candidate's whole response text, decoded as a user decodes ids."""
    return tokenizer.decode(response_ids_of(result, step_index, cand_index), skip_special_tokens=True)


class ScriptedPolicy:
    """Builds an :class:`~mahalo.policy.hf.HFPolicy` on a real tiny Llama sized to ``tokenizer``,
    whose logits are replaced by a script: every row's i-th response token is ``script[i]``, then
    end of turn. Boundary tests replay a real tokenisation through the real controller with it."""

    def __new__(cls, tokenizer, script: list[int], generation_eos: list[int] | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        from mahalo.cascade import PROMPT
        from mahalo.policy import HFPolicy

        eos = tokenizer.eos_token_id
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                             eos_token_id=generation_eos or eos, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval().requires_grad_(False)

        class _Scripted(HFPolicy):
            prompt_len = 0
            seen: list[int] = []  # tokens seen before each output of the last forward

            def run(self, kv, items, extra=None):
                self.seen = []
                for item in items:
                    ends = [item.start + len(item.tokens)] if item.out == "last" else (
                        [item.start + k + 1 for k in range(len(item.tokens))] if item.out == "all" else [])
                    self.seen += ends
                    if item.write[0] == PROMPT and item.out == "last":
                        self.prompt_len = ends[0]
                return super().run(kv, items, extra)

            def logits(self, hidden):
                logits = super().logits(hidden)
                fed = [n - self.prompt_len for n in self.seen[: len(hidden)]]  # response tokens fed so far
                nxt = torch.tensor([script[p] if 0 <= p < len(script) else eos for p in fed], dtype=torch.long)
                out = torch.full_like(logits, -1e4)
                out[torch.arange(len(nxt)), nxt] = 0.0
                return out

        return _Scripted(model, tokenizer)


# The engine settings a result must not depend on: the default (asynchronous steps, shared
# prefixes) and the lockstep ablation with private rows.
ENGINES = ({}, {"step_barrier": True, "share_prefix": False})


def carried_beams(result) -> list[tuple[set[int], set[int]]]:
    """Per step after the first: (the parents of its candidates, the previous step's chosen
    candidates that ended their step); equal when every beam carried on keeps a candidate."""
    return [({c.parent for c in step.candidates},
             {i for i in before.chosen if before.candidates[i].end == "step"})
            for before, step in zip(result.steps, result.steps[1:])]


def in_flight(policy, rewards, prompts, **opts) -> list[dict]:
    """The prompts decoded 4 at a time under each of :data:`ENGINES`: index -> result, per engine."""
    from mahalo import guided_generate_many

    return [dict(guided_generate_many(policy, rewards, prompts, max_prompts=4, **engine, **opts))
            for engine in ENGINES]
