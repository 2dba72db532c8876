"""Conversations in: system turns, several user/assistant turns, a system prompt; reward models read
the whole conversation as their own chat template renders it, exactly."""

import json

import pytest
import torch

from mahalo import decode, guided_generate
from mahalo.app.tiny import tiny_policy, tiny_reward
from mahalo.chat import as_messages
from tests.helpers import response_text_of

TOL = 1e-5
CONVERSATION = [
    {"role": "system", "content": "You answer truthfully and briefly."},
    {"role": "user", "content": "Is the earth flat?"},
    {"role": "assistant", "content": "No, it is round."},
    {"role": "user", "content": "Why do some people think so?"},
]
OPTS = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=30, step="max_tokens",
            min_step_tokens=0, max_step_tokens=6)


def plain(model, tok, messages, text) -> float:
    ids = tok.apply_chat_template([*messages, {"role": "assistant", "content": text}], tokenize=True)["input_ids"]
    with torch.inference_mode():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0].double())


@pytest.mark.parametrize("style, other_vocab", [("chatml", False), ("chatml", True), ("llama3", False)])
@pytest.mark.parametrize("system", [True, False])
def test_reward_scores_the_whole_conversation_exactly(style, other_vocab, system):
    """Multi-turn, with and without a system turn, the reward's tokenizer the policy's or another:
    every candidate's score equals a plain forward of apply_chat_template(..., tokenize=True)."""
    policy = tiny_policy(style=style)
    model, tok = tiny_reward(style=style, **({"vocab_size": 300} if other_vocab else {}))
    messages = CONVERSATION if system else CONVERSATION[1:]
    res = guided_generate(policy, {"truth": (model, tok)}, messages, **OPTS)
    assert len(res.steps) >= 3
    worst = max(abs(c.scores["truth"] - plain(model, tok, messages, response_text_of(res, policy[1], s, i)))
                for s, st in enumerate(res.steps) for i, c in enumerate(st.candidates))
    assert worst <= TOL, worst


def test_the_policy_continues_the_whole_conversation():
    """The first token's log-probability is the policy's after the full rendered conversation."""
    from tests.helpers import full_logprobs

    model, tok = tiny_policy()
    res = guided_generate((model, tok), {}, CONVERSATION, strategy="sample", max_new_tokens=4, seed=1)
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)["input_ids"]
    logp = full_logprobs(model, ids + res.token_ids)
    first = res.steps[0].candidates[0].logprobs[0]
    assert abs(first - float(logp[len(ids) - 1, res.token_ids[0]])) <= 1e-4


def test_a_system_prompt_is_added_when_the_conversation_has_none(policy, reward):
    with_prompt = guided_generate(policy, {"truth": reward}, CONVERSATION[1:], system_prompt=CONVERSATION[0]["content"],
                                  **OPTS)
    explicit = guided_generate(policy, {"truth": reward}, CONVERSATION, **OPTS)
    assert with_prompt.token_ids == explicit.token_ids and with_prompt.scores == explicit.scores
    kept = guided_generate(policy, {"truth": reward}, CONVERSATION, system_prompt="Ignored: it has one.", **OPTS)
    assert kept.token_ids == explicit.token_ids
    plain_prompt = guided_generate(policy, {"truth": reward}, "Is the earth flat?", **OPTS)
    assert guided_generate(policy, {"truth": reward}, "Is the earth flat?", system_prompt="Be brief.",
                           **OPTS).token_ids != plain_prompt.token_ids


@pytest.mark.parametrize("messages, message", [
    ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "  "}], "has empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "must end with the user's turn"),
    ({"role": "user", "content": "hi"}, "non-empty list of chat messages"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "x"}],
     "may only come first"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
])
def test_bad_conversations_are_refused(policy, messages, message):
    with pytest.raises(ValueError, match=message):
        as_messages(messages)
    with pytest.raises(ValueError, match=message):
        guided_generate(policy, {}, messages, strategy="sample", max_new_tokens=2)


def test_cli_reads_conversations_and_a_system_prompt_file(tmp_path, policy, reward):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "messages": CONVERSATION[1:]},
        {"id": "b", "prompt": "Is the earth flat?"},
        {"id": "c", "messages": CONVERSATION},
    ]) + "\n")
    system = tmp_path / "system.txt"
    system.write_text("You answer truthfully and briefly.\n")
    out = tmp_path / "out.jsonl"
    args = ["models=tiny", "+objective=truth", "search=step_best_of_n", f"prompts={prompts}", f"output={out}",
            f"system_prompt=@{system}", "search.max_new_tokens=12", "step.kind=max_tokens", "step.min_step_tokens=0",
            "step.max_step_tokens=4"]
    assert decode.main(args) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["a"]["prompt"] == "Why do some people think so?" and records["a"]["messages"] == CONVERSATION[1:]
    assert records["a"]["text"] == records["c"]["text"]  # the system prompt file == the explicit system turn
    assert records["b"]["config"]["system_prompt"] == f"@{system}"
    # the library gives the same answer
    lib = guided_generate(policy, {"truth": reward}, CONVERSATION, strategy="step_best_of_n", max_new_tokens=12,
                          step="max_tokens", min_step_tokens=0, max_step_tokens=4, weights={"truth": 1.0})
    assert lib.text == records["c"]["text"]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "in.jsonl:1: field 'messages': the last chat message is a assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}]},
     "in.jsonl:1: field 'messages': chat message 0 has unknown role"),
    ({"text": "hi"}, "in.jsonl:1: no field 'prompt' and no 'messages'"),
])
def test_cli_bad_conversations_exit_2_with_one_line(tmp_path, capsys, record, message):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps(record) + "\n")
    assert decode.main(["models=tiny", "+objective=truth", f"prompts={prompts}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_cli_missing_system_prompt_file_exits_2(tmp_path, capsys):
    assert decode.main(["models=tiny", "prompt=hi", f"system_prompt=@{tmp_path / 'nope.txt'}"]) == 2
    assert "system_prompt file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- the truth default (issue 13)

PRIMER_QUESTIONS = ["What is human life expectancy in the United States?",
                    "Who was president of the United States in 1955?", "Which party did he belong to?",
                    "What is the square root of banana?", "How does a telescope work?",
                    "Where were the 1992 Olympics held?"]


def test_truth_objective_is_a_step_beam_with_the_truthfulqa_primer():
    cfg = decode.compose_config(["+objective=truth", "prompt=hi"])
    search = cfg.guide().search
    assert (search.strategy, search.beam_width, search.num_candidates) == ("step_beam", 4, 4)
    assert cfg.guide().objective.weights == {"truth": 1.0} and cfg.guide().step.kind == "sentence"
    primer = cfg.system_prompt
    assert primer.startswith("Answer the question truthfully in one short sentence")
    assert [ln[3:] for ln in primer.splitlines() if ln.startswith("Q: ")] == PRIMER_QUESTIONS
    # the command line wins over the objective's choices
    dvts = decode.compose_config(["+objective=truth", "search=dvts", "prompt=hi"]).guide().search
    assert dvts.strategy == "dvts"
    best_of_n = decode.compose_config(["search=step_best_of_n", "+objective=truth", "prompt=hi"]).guide().search
    assert best_of_n.strategy == "step_best_of_n"
    assert decode.compose_config(["+objective=truth", "system_prompt=null", "prompt=hi"]).system_prompt is None
    narrower = decode.compose_config(["+objective=truth", "search.beam_width=2", "prompt=hi"]).guide().search
    assert narrower.beam_width == 2
    # other objectives keep MAHALO's best-of-5 and no system turn
    concise = decode.compose_config(["+objective=truth_concise", "prompt=hi"])
    assert concise.guide().search.strategy == "step_best_of_n" and concise.system_prompt is None


def test_primer_holds_no_truthfulqa_question():
    """The primer is TruthfulQA's generic QA primer: none of its questions is a dataset question."""
    import csv
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
    files = [data / "questions_train.csv", data / "questions_dev.csv"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"TruthfulQA files not found under {data}")
    questions = {row["Question"].strip() for f in files for row in csv.DictReader(f.open(newline=""))}
    assert len(questions) == 612 and not questions & set(PRIMER_QUESTIONS)


def test_cli_truth_default_equals_the_library_with_the_primer(tmp_path, policy, reward):
    out = tmp_path / "out.jsonl"
    assert decode.main(["models=tiny", "+objective=truth", "prompt=Is the earth flat?", f"output={out}",
                        "search.max_new_tokens=24"]) == 0
    (record,) = map(json.loads, out.read_text().splitlines())
    primer = decode.compose_config(["+objective=truth", "prompt=hi"]).system_prompt
    lib = guided_generate(policy, {"truth": reward}, "Is the earth flat?", system_prompt=primer,
                          strategy="step_beam", beam_width=4, num_candidates=4, max_new_tokens=24,
                          weights={"truth": 1.0})
    assert record["text"] == lib.text
    unprimed = guided_generate(policy, {"truth": reward}, "Is the earth flat?", strategy="step_beam", beam_width=4,
                               num_candidates=4, max_new_tokens=24, weights={"truth": 1.0})
    assert record["scores"]["truth"] == pytest.approx(lib.scores["truth"], abs=1e-6)
    assert (unprimed.text, unprimed.scores["truth"]) != (lib.text, lib.scores["truth"])  # the primer is read
