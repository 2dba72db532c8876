"""``python -m mahalo.tree``: a real decode's search drawn as HTML (parsed back) and as a PNG."""

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mahalo import decode, tree
from mahalo.app.draw import shown

ROOT = Path(__file__).resolve().parent.parent
# a step beam search on tiny models: 2 beams x 2 candidates, steps of 2-5 tokens, a few steps
RUN = ["models=tiny", "+objective=truth_concise", "search=step_beam", "search.beam_width=2", "search.num_candidates=2",
       "search.max_new_tokens=20", "step.min_step_tokens=2", "step.max_step_tokens=5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real CLI run (two prompts) and its records; the decode's verbose output."""
    tmp = tmp_path_factory.mktemp("tree")
    prompts, out = tmp / "p.jsonl", tmp / "out.jsonl"
    prompts.write_text('{"prompt": "Is the sky blue?"}\n{"prompt": "Name a prime."}\n')
    console = io.StringIO()
    with contextlib.redirect_stdout(console):  # what the terminal shows
        assert decode.main([*RUN, f"prompts={prompts}", f"output={out}", "verbose=true"]) == 0
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    return tmp, out, records, console.getvalue()


class Page(HTMLParser):
    """The candidates' cards of a drawn page: attributes, text, marked (answer) text."""

    def __init__(self):
        super().__init__()
        self.cards, self.tags, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if tag == "div" and "cand" in cls:
            self.cards.append({**a, "classes": cls, "text": "", "marked": "", "in_note": ""})
        if tag in ("div", "mark", "span", "table", "tr", "td", "b"):
            self.stack.append((tag, cls))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        classes = set().union(*(c for _, c in self.stack)) if self.stack else set()
        if "cand" not in classes:
            return
        card = self.cards[-1]
        if "text" in classes:
            card["text"] += data
        if "piece" in classes:
            card["marked"] += data


def _page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_html_shows_every_candidate_and_the_answer_path(run, capsys):
    tmp, out, records, console = run
    assert f"python -m mahalo.tree {out} --index I --out tree.html" in console  # verbose=true says where
    for index, rec in records.items():
        html = tmp / f"tree{index}.html"
        assert tree.main([str(out), "--index", str(index), "--out", str(html)]) == 0
        steps = rec["steps"]
        assert f"wrote {html}: html, prompt {index}, {len(steps)} steps" in capsys.readouterr().out
        cards = _page(html).cards
        # every candidate of every step, in order, with its text
        expected = [(k, i, c) for k, step in enumerate(steps) for i, c in enumerate(step["candidates"])]
        assert len(cards) == len(expected) > len(steps) >= 2
        for card, (k, i, c) in zip(cards, expected):
            assert (int(card["data-step"]), int(card["data-cand"])) == (k, i)
            assert card["text"] == shown(c["text"])
            assert int(card["data-parent"]) == c["parent"] and card["data-end"] == c["end"]
            kept = steps[k]["chosen"]
            assert ("kept" in card["classes"]) == (i in (kept if isinstance(kept, list) else [kept]))
            assert ("ended" in card["classes"]) == (c["end"] != "step")
        # the highlighted path is the record's answer_path, and its marked text spells the answer
        path = [(int(c["data-step"]), int(c["data-cand"])) for c in cards if "path" in c["classes"]]
        assert path == list(enumerate(rec["answer_path"])) and path
        assert "".join(c["marked"] for c in cards if "path" in c["classes"]) == shown(rec["text"])
        assert not any(c["marked"] for c in cards if "path" not in c["classes"])
        last = steps[len(path) - 1]["candidates"][path[-1][1]]
        assert last["end"] != "step" and last["scores"] == rec["scores"]  # the answer ended there, with its scores
        page = html.read_text()
        assert "<script" not in page and "http" not in page and "<link" not in page and " src=" not in page


def test_real_command_and_old_records_without_answer_path(run, tmp_path):
    """``python -m mahalo.tree`` as a user runs it; a record written before answer_path draws the same path."""
    _, out, records, _ = run
    old = tmp_path / "old.jsonl"
    rec = {k: v for k, v in records[1].items() if k != "answer_path"}
    old.write_text(json.dumps(rec) + "\n")
    html = tmp_path / "sub" / "old.html"
    proc = subprocess.run([sys.executable, "-m", "mahalo.tree", str(old), "--out", str(html)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cards = _page(html).cards
    path = [int(c["data-cand"]) for c in cards if "path" in c["classes"]]
    assert path == records[1]["answer_path"]
    assert "".join(c["marked"] for c in cards) == shown(records[1]["text"])


def test_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, records, _ = run
    png = tmp_path / "tree.png"
    assert tree.main([str(out), "--index", "0", "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", data[16:24])
    steps = len(records[0]["steps"])
    assert 250 * steps <= width <= 20000 and 300 <= height <= 20000, (width, height)


@pytest.mark.parametrize("make, args, message", [
    (None, ["--index", "0"], "no such file: give the output=FILE.jsonl of python -m mahalo.decode"),
    ("copy", ["--index", "7"], r"has no record with index 7 \(it holds index 0-1\): choose one"),
    ("copy", [], r"holds 2 prompts \(index 0-1\): choose one with --index I"),
    ("copy", ["--index", "0", "--out", "tree.pdf"], "write a .html or a .png file"),
    ("copy", ["--index", "zero"], "argument --index: invalid int value"),
    ("error", ["--index", "0"], r"record 0 of .* failed \(prompt too long\): it has no search to draw; delete"),
    ("nosteps", ["--index", "0"], r"has no steps to draw: rerun the prompt with python -m mahalo.decode .* output="),
    ("badpath", ["--index", "0"], r"answer_path \[5, 5\] is not a path of its steps"),
    ("garbage", ["--index", "0"], r":1: not a mahalo result record"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, make, args, message):
    _, out, records, _ = run
    file = tmp_path / "in.jsonl"
    lines = {
        "copy": out.read_text(),
        "error": json.dumps({"index": 0, "prompt": "p", "error": "prompt too long"}) + "\n",
        "nosteps": json.dumps({"index": 0, "prompt": "p", "text": "t"}) + "\n",
        "badpath": json.dumps({**records[0], "answer_path": [5, 5]}) + "\n",
        "garbage": "not json\n" + out.read_text(),
    }
    if make:
        file.write_text(lines[make])
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "t.html")]
    capsys.readouterr()
    assert tree.main([str(file), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mahalo.tree: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "t.html").exists()


def _cand(text, parent, end="step", score=0.0):
    return {"text": text, "token_ids": [1], "scores": {"truth": score}, "combined": score, "parent": parent, "end": end}


@pytest.mark.parametrize("second", ["\u00e9cd", "ab\u00e9cd"])
def test_a_character_split_across_steps_still_spells_the_answer(tmp_path, second):
    """Step 0 ended inside a character (decoded as U+FFFD); the answer decodes it whole. The marks
    still spell the answer: step 0's mark stops before the broken character, step 1's (or, for a
    record whose chunk is the whole text, a note under it) holds the rest."""
    rec = {"index": 0, "prompt": "p", "text": "ab\u00e9cd", "scores": {"truth": 0.5},
           "steps": [{"candidates": [_cand("ab\ufffd", -1), _cand("xy", -1)], "chosen": 0},
                     {"candidates": [_cand(second, 0, "eos", 0.5)], "chosen": 0}], "answer_path": [0, 0]}
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    assert tree.main([str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t.html")]) == 0
    cards = _page(tmp_path / "t.html").cards
    assert [c["text"] for c in cards] == ["ab\ufffd", "xy", second]
    assert [c["marked"] for c in cards] == ["ab", "", "\u00e9cd"]
    assert ["path" in c["classes"] for c in cards] == [True, False, True]


def test_png_without_matplotlib_says_what_to_install(run, tmp_path, capsys, monkeypatch):
    _, out, _, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert tree.main([str(out), "--index", "0", "--out", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mahalo.tree: error: a PNG needs matplotlib: pip install 'mahalo[plot]' (or write --out tree.html)"
    assert not (tmp_path / "t.png").exists()


def test_verbose_without_output_says_how_to_keep_the_search(capsys):
    assert decode.main(["models=tiny", "prompt=hi", "search.max_new_tokens=4", "verbose=true"]) == 0
    out = capsys.readouterr().out
    assert ("to draw the search, add output=FILE.jsonl, then: python -m mahalo.tree FILE.jsonl --index 0 "
            "--out tree.html (or tree.png)") in out


def test_a_chunk_recorded_as_the_whole_response_so_far_gets_only_its_own_piece(tmp_path):
    """After a split character the engine records a candidate's text as the whole response so far;
    its mark holds only what it adds, and the marks still spell the answer."""
    rec = {"index": 0, "prompt": "p", "text": "ab\u00e9cdef", "scores": {"truth": 0.5},
           "steps": [{"candidates": [_cand("ab\ufffd", -1)], "chosen": 0},
                     {"candidates": [_cand("ab\u00e9cd", 0)], "chosen": 0},
                     {"candidates": [_cand("ef", 0, "eos", 0.5)], "chosen": 0}]}  # no answer_path: inferred
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    assert tree.main([str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t.html")]) == 0
    cards = _page(tmp_path / "t.html").cards
    assert [c["marked"] for c in cards] == ["ab", "\u00e9cd", "ef"]
    assert all("path" in c["classes"] for c in cards)
