"""Every step-boundary rule, one by one."""

import pytest

from mahalo.steps import DoubleNewlineBoundary, NoBoundary, SentenceBoundary, make_boundary

S = SentenceBoundary(min_tokens=1)


@pytest.mark.parametrize("chunk", [
    "The sky is blue.", "Really?", "Watch out!", 'He said "stop."', "He said \u201cstop!\u201d",
    "It works (mostly).", "See [1].", "The end.\n", "The end. ", "First paragraph\n\n",
    "Line one\n  \n", "Done.'", "Yes!)",
])
def test_sentence_ends(chunk):
    assert S("", chunk, 10)


@pytest.mark.parametrize("chunk", [
    "The sky is", "Here is a list:", "a, b, c", "value 3", "no end\n",
])
def test_not_sentence_ends(chunk):
    assert not S("", chunk, 10)


@pytest.mark.parametrize("chunk", [
    "Steps:\n2.", "2.", "B)", "(3)", "Step 3:", "Step 3.", "iv.", "Options:\n a.", "1.\n\n", "- 4.",
])
def test_never_after_bare_list_marker(chunk):
    assert not S("", chunk, 10)


def test_list_marker_uses_context_from_accepted_text():
    # the marker's line starts in the accepted text: "2" accepted, "." in the chunk
    assert not S("Intro.\n2", ".", 10)
    assert S("Intro.\n2 apples", " are red.", 10)


@pytest.mark.parametrize("abbrev", ["e.g.", "i.e.", "etc.", "vs.", "cf.", "et al.", "Dr.", "Mr.",
                                    "Mrs.", "Ms.", "Prof.", "E.G.", "(e.g.)"])
def test_never_after_abbreviation(abbrev):
    assert not S("", f"Some words, {abbrev}", 10)


def test_abbreviation_needs_word_start():
    # "drums." is not "Dr." and "this." is not "ms."
    assert S("", "I play the drums.", 10)
    assert S("", "It is like this.", 10)


def test_min_tokens():
    b = SentenceBoundary(min_tokens=8)
    assert not b("", "Hi.", 7)
    assert b("", "Hi.", 8)


def test_double_newline_boundary():
    b = DoubleNewlineBoundary(min_tokens=1)
    assert b("", "Step 1: add.\n\n", 5)
    assert not b("", "A sentence.", 5)
    assert not b("", "1.\n\n", 5)


def test_no_boundary_and_registry():
    assert not NoBoundary()("", "End.\n\n", 100)
    assert isinstance(make_boundary("sentence", 8), SentenceBoundary)
    with pytest.raises(ValueError, match="unknown step boundary 'bogus'"):
        make_boundary("bogus", 8)


def test_sentence_boundary_in_decoding(policy):
    """End-to-end: a step stops at the sentence rule, the token cap, or end of turn."""
    from mahalo import guided_generate

    res = guided_generate(policy, {"n": lambda p, r: 0.0}, "Hi", num_candidates=3,
                          max_new_tokens=60, min_step_tokens=2, max_step_tokens=12)
    b = SentenceBoundary(min_tokens=2)
    for step in res.steps:
        for c in step.candidates:
            assert c.end in ("step", "eos", "length")
            if c.end == "step" and len(c.token_ids) < 12:
                assert b("", c.text, len(c.token_ids))
