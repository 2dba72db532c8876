"""A picture of one prompt's search, from its record in the decode CLI's output file.

Every step is a column of its candidates (text, raw score per objective, combined score); a line
joins each candidate to the one of the previous step it extends. Kept candidates have a green
border, ended ones (end of turn, token budget, stop) a badge, and the final answer's path is
orange, its part of each chunk marked. :func:`to_html` writes one self-contained file (inline
CSS and SVG, no script, nothing fetched); :func:`to_png` draws the same with matplotlib, for papers.

Records written before ``answer_path`` existed still draw: a one-beam search's path follows
``chosen``; a beam search's is the ended, kept candidate whose scores are the answer's.
"""

from __future__ import annotations

import html
import json
import textwrap
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mahalo.result import Candidate, Step, path_to

STEPS_HELP = "rerun the prompt with python -m mahalo.decode ... output=FILE.jsonl (its records keep every step)"


@dataclass
class Search:
    """What the picture shows of one record."""

    index: int
    prompt: str
    text: str  # the final answer
    scores: dict[str, float]  # the answer's raw scores
    steps: list[Step]
    answer_path: list[int]  # the answer's candidate per step (empty: unknown)
    strategy: str = ""
    note: str = ""  # how the path was found, when the record does not say

    @property
    def objectives(self) -> list[str]:
        names = list(self.scores)
        for step in self.steps:
            names += [k for c in step.candidates for k in c.scores if k not in names]
        return names

    def kept(self, step: int) -> set[int]:
        chosen = self.steps[step].chosen
        return set(chosen) if isinstance(chosen, list) else {chosen}

    def pieces(self) -> list[str]:
        """The answer cut along its path, one piece per step, concatenating to the answer. A piece
        is its candidate's text, less a trailing partial character that decodes differently once
        the next step completes it. (Where that happened the engine records the next candidate's
        text as the whole response so far; its piece is then what it adds to the pieces before.)"""
        texts = [self.steps[k].candidates[c].text for k, c in enumerate(self.answer_path)]
        if not texts:
            return []
        out, at = [], 0
        for t in texts[:-1]:
            end = at + _common(t, self.text[at:])
            if end < at + len(t) and at:  # not this step's chunk: maybe the whole response so far
                end = max(end, _common(t, self.text))
            out.append(self.text[at:end])
            at = end
        return [*out, self.text[at:]]


def _common(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- reading ---------------------------------------------------------------------------------

def read_record(path: str, index: int | None) -> dict[str, Any]:
    """The record of prompt ``index`` in a decode output file (the only one when ``index`` is
    None and the file holds one prompt; the last when a prompt was written twice).

    Raises:
        ValueError: no such file, a line that is not a record, no record with that index.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{path} is a directory: give the output=FILE.jsonl of python -m mahalo.decode")
    if not file.is_file():
        raise ValueError(f"{path}: no such file: give the output=FILE.jsonl of python -m mahalo.decode")
    records: dict[int, dict[str, Any]] = {}
    lines = file.read_bytes().split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            records[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # UnicodeDecodeError is a ValueError
            if lineno == len(lines):  # a torn last line of a killed run: not a record yet
                continue
            raise ValueError(f"{path}:{lineno}: not a mahalo result record: give the output=FILE.jsonl of "
                             "python -m mahalo.decode") from None
    if not records:
        raise ValueError(f"{path} holds no records: give the output=FILE.jsonl of a finished python -m mahalo.decode")
    if index is None:
        if len(records) > 1:
            raise ValueError(f"{path} holds {len(records)} prompts (index {_ranges(records)}): choose one with --index I")
        index = next(iter(records))
    if index not in records:
        raise ValueError(f"{path} has no record with index {index} (it holds index {_ranges(records)}): "
                         "choose one of those with --index")
    return records[index]


def _ranges(indices: Any) -> str:
    """``0-4, 7, 9-10``: sorted indices as runs."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = [f"{a}-{b}" if b > a else str(a) for a, b in runs[:8]]
    return ", ".join(shown) + (", ..." if len(runs) > 8 else "")


def search_of(rec: dict[str, Any], path: str = "the file") -> Search:
    """The :class:`Search` of one decode record.

    Raises:
        ValueError: an error record, a record without steps, malformed steps or path.
    """
    index = rec.get("index")
    where = f"record {index} of {path}"
    if "error" in rec:
        raise ValueError(f"{where} failed ({_line(rec['error'])}): it has no search to draw; delete the record and "
                         "rerun the same decode command to retry it")
    if not isinstance(rec.get("steps"), list) or not rec["steps"]:
        raise ValueError(f"{where} has no steps to draw: {STEPS_HELP}")
    try:
        steps = [_step(s) for s in rec["steps"]]
        text, scores = str(rec["text"]), {str(k): float(v) for k, v in (rec.get("scores") or {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} has malformed steps ({_line(err)}): {STEPS_HELP}") from None
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    strategy = config.get("search", {}).get("strategy", "") if isinstance(config.get("search"), dict) else ""
    search = Search(int(index), str(rec.get("prompt", "")), text, scores, steps, [], str(strategy))
    try:
        if "answer_path" in rec:
            search.answer_path = _checked_path(steps, rec["answer_path"], where)
        else:
            search.answer_path, search.note = _inferred_path(search)
    except IndexError:  # a parent or a chosen candidate that its step does not have
        raise ValueError(f"{where} has malformed steps (a parent or kept candidate out of range): {STEPS_HELP}") from None
    return search


def _line(err: object) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _step(raw: dict[str, Any]) -> Step:
    known = {f.name for f in fields(Candidate)}
    cands = [Candidate(**{k: v for k, v in c.items() if k in known} | _defaults(c)) for c in raw["candidates"]]
    for c in cands:
        c.text, c.combined, c.parent = str(c.text), float(c.combined), int(c.parent)
        c.scores = {str(k): float(v) for k, v in c.scores.items()}
    chosen = raw["chosen"]
    chosen = int(chosen) if not isinstance(chosen, list) else [int(k) for k in chosen]
    return Step(cands, chosen)


def _defaults(c: dict[str, Any]) -> dict[str, Any]:
    """Fields a drawing does not need, when a record leaves them out."""
    return {k: v for k, v in (("token_ids", []), ("logprobs", []), ("end", "step")) if k not in c}


def _checked_path(steps: list[Step], path: Any, where: str) -> list[int]:
    ok = isinstance(path, list) and 0 < len(path) <= len(steps) and all(isinstance(c, int) for c in path)
    ok = ok and all(0 <= c < len(steps[k].candidates) for k, c in enumerate(path))
    ok = ok and path == path_to(steps, len(path) - 1, path[-1])
    if not ok:
        raise ValueError(f"{where}: answer_path {path!r} is not a path of its steps: {STEPS_HELP}")
    return path


def _inferred_path(search: Search) -> tuple[list[int], str]:
    """The answer's path of a record written before ``answer_path``."""
    steps = search.steps
    if all(isinstance(s.chosen, int) for s in steps):
        return path_to(steps, len(steps) - 1, steps[-1].chosen), ""
    found = [
        path_to(steps, k, c)
        for k in range(len(steps)) for c in sorted(search.kept(k))
        if steps[k].candidates[c].end != "step" and steps[k].candidates[c].scores == search.scores
    ]
    spelled = [p for p in found if "".join(steps[k].candidates[c].text for k, c in enumerate(p)) == search.text]
    if spelled or found:
        return (spelled or found)[0], "the record has no answer_path: the answer is the ended candidate with its scores"
    return [], "the record has no answer_path and no ended candidate has the answer's scores: no path is marked"


# -- text as shown ---------------------------------------------------------------------------

def shown(text: str) -> str:
    """``text`` as the picture shows it: control characters as their visible symbols (U+2400...),
    so nothing invisible or invalid in HTML is written; a lone surrogate as U+FFFD."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif o < 0x20:
            out.append(chr(0x2400 + o))
        elif o == 0x7F:
            out.append("\u2421")
        elif 0x80 <= o < 0xA0 or 0xD800 <= o < 0xE000:
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def _esc(text: str) -> str:
    return html.escape(shown(text), quote=True)


# -- HTML ------------------------------------------------------------------------------------

CARD_W, GAP_X, GAP_Y, MARGIN, HEAD = 250, 56, 14, 16, 28
TEXT_H, ROW_H = 66, 15

CSS = """
body{font:13px/1.35 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:17px;margin:0 0 6px} .meta{color:#555;margin:2px 0}
.box{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #ddd;padding:6px 8px;
 border-radius:4px;max-height:160px;overflow:auto;margin:4px 0 10px}
.legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-2px;margin-right:4px}
.scroll{overflow:auto;border:1px solid #e4e4e4;background:#fff;border-radius:4px}
.tree{position:relative}
.tree svg{position:absolute;left:0;top:0}
.col{position:absolute;font-weight:600;color:#444}
.cand{position:absolute;box-sizing:border-box;width:%(w)dpx;border:1px solid #c8c8c8;border-radius:5px;
 background:#fff;padding:3px 6px;opacity:.72;display:flex;flex-direction:column}
.cand.kept{border:2px solid #2e9b4f;opacity:1}
.cand.path{border:3px solid #e07b00;background:#fff6ea;opacity:1}
.tag{margin-left:5px;padding:0 5px;border-radius:8px;color:#fff;font-size:10.5px}
.tag.end{background:#555} .tag.keep{background:#2e9b4f} .tag.ans{background:#e07b00}
.hd{font-size:11px;color:#555;line-height:1.6} .tag{white-space:nowrap;display:inline-block}
.hd b{color:#222}
.text{white-space:pre-wrap;word-break:break-word;height:%(th)dpx;overflow:auto;font-family:ui-monospace,
 SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;border-bottom:1px dotted #ddd;margin:2px 0}
mark.piece{background:#ffc978;padding:0}
.note{font-size:11px;color:#8a4b00;white-space:pre-wrap}
table.sc{font-size:11px;border-collapse:collapse;width:100%%}
table.sc td{padding:0 2px;height:%(rh)dpx} table.sc td.v{text-align:right;font-variant-numeric:tabular-nums}
tr.comb td{font-weight:600}
"""


def _card_h(search: Search) -> int:
    return 20 + TEXT_H + 8 + ROW_H * (len(search.objectives) + 1) + 12


def to_html(search: Search) -> str:
    """The whole page: header (prompt, answer, scores), legend, and the tree."""
    objs, card_h = search.objectives, _card_h(search)
    path = dict(enumerate(search.answer_path))
    pieces = search.pieces()
    rows = max(len(s.candidates) for s in search.steps)
    width = 2 * MARGIN + len(search.steps) * (CARD_W + GAP_X) - GAP_X
    height = 2 * MARGIN + HEAD + rows * (card_h + GAP_Y) - GAP_Y

    def xy(step: int, cand: int) -> tuple[int, int]:
        return MARGIN + step * (CARD_W + GAP_X), MARGIN + HEAD + cand * (card_h + GAP_Y)

    edges, cards, heads = [], [], []
    for k, step in enumerate(search.steps):
        kept = search.kept(k)
        x0, _ = xy(k, 0)
        ended = sum(c.end != "step" for c in step.candidates)
        heads.append(f'<div class="col" style="left:{x0}px;top:{MARGIN}px">step {k} '
                     f'<span class="hd">{len(step.candidates)} candidates, {len(kept)} kept'
                     f'{f", {ended} ended" if ended else ""}</span></div>')
        for i, c in enumerate(step.candidates):
            on_path = path.get(k) == i
            if k > 0 and 0 <= c.parent < len(search.steps[k - 1].candidates):
                edges.append(_edge(xy(k - 1, c.parent), xy(k, i), card_h, on_path, i in kept))
            cards.append(_card(k, i, c, xy(k, i), card_h, objs, i in kept, on_path, pieces[k] if on_path else None))
    css = CSS % {"w": CARD_W, "th": TEXT_H, "rh": ROW_H}
    scores = ", ".join(f"{k} = {v:.4f}" for k, v in search.scores.items()) or "none (unguided)"
    legend = (
        '<div class="legend"><span><i class="sw" style="background:#fff6ea;border:3px solid #e07b00"></i>'
        'the answer\'s path (its text marked)</span><span><i class="sw" style="border:2px solid #2e9b4f"></i>kept'
        '</span><span><i class="sw" style="border:1px solid #c8c8c8;opacity:.7"></i>dropped</span>'
        '<span><i class="sw" style="background:#555"></i>ended: eos (end of turn), length (token budget), stop'
        '</span></div>'
    )
    note = f'<p class="note">{_esc(search.note)}</p>' if search.note else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>mahalo search: prompt {search.index}</title><style>{css}</style></head><body>\n"
        f"<h1>Search of prompt {search.index}</h1>"
        f'<p class="meta">{_esc(search.strategy or "search")}: {len(search.steps)} steps, '
        f"{sum(len(s.candidates) for s in search.steps)} candidates; objectives: {_esc(', '.join(objs) or 'none')}</p>"
        f'<div class="meta">prompt</div><div class="box prompt">{_esc(search.prompt)}</div>'
        f'<div class="meta">answer ({_esc(scores)})</div><div class="box answer">{_esc(search.text)}</div>'
        f"{note}{legend}\n"
        f'<div class="scroll"><div class="tree" style="width:{width}px;height:{height}px">'
        f'<svg width="{width}" height="{height}">{"".join(edges)}</svg>\n'
        + "\n".join(heads) + "\n" + "\n".join(cards) + "\n</div></div>\n</body></html>\n"
    )


def _edge(a: tuple[int, int], b: tuple[int, int], card_h: int, on_path: bool, kept: bool) -> str:
    x1, y1 = a[0] + CARD_W, a[1] + card_h // 2
    x2, y2 = b[0], b[1] + card_h // 2
    mid = (x1 + x2) / 2
    style = ("#e07b00", 3.5) if on_path else ("#2e9b4f", 1.6) if kept else ("#b8b8b8", 1)
    cls = "path" if on_path else "kept" if kept else "other"
    return (f'<path class="edge {cls}" d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}" fill="none" '
            f'stroke="{style[0]}" stroke-width="{style[1]}"/>')


def _card(step: int, i: int, c: Candidate, at: tuple[int, int], card_h: int, objs: list[str], kept: bool,
          on_path: bool, piece: str | None) -> str:
    classes = " ".join(["cand", *(["kept"] if kept else []), *(["path"] if on_path else []),
                        *(["ended"] if c.end != "step" else [])])
    text, note = _esc(c.text), ""
    if piece is not None and c.text.startswith(piece):
        text = f'<mark class="piece">{_esc(piece)}</mark>{_esc(c.text[len(piece):])}'
    elif piece is not None:  # the answer decodes this step's tokens otherwise (a character split across steps)
        note = f'<div class="note">in the answer: <mark class="piece">{_esc(piece)}</mark></div>'
    rows = "".join(f'<tr><td>{_esc(o)}</td><td class="v">{_num(c.scores.get(o))}</td></tr>' for o in objs)
    rows += f'<tr class="comb"><td>combined</td><td class="v">{c.combined:.4f}</td></tr>'
    return (
        f'<div class="{classes}" id="s{step}c{i}" data-step="{step}" data-cand="{i}" data-parent="{c.parent}" '
        f'data-end="{_esc(c.end)}" style="left:{at[0]}px;top:{at[1]}px;height:{card_h}px">'
        f'<div class="hd"><b>#{i}</b> of step {step}{f" &larr; #{c.parent}" if step else ""} '
        f'&middot; {len(c.token_ids)} tokens{_tags(c, kept, on_path)}</div>'
        f'<div class="text">{text}</div>{note}<table class="sc">{rows}</table></div>'
    )


def _tags(c: Candidate, kept: bool, on_path: bool) -> str:
    tags = [("ans", "answer")] if on_path else [("keep", "kept")] if kept else []
    tags += [("end", f"ended: {c.end}")] if c.end != "step" else []
    return "".join(f'<span class="tag {cls}">{_esc(label)}</span>' for cls, label in tags)


def _num(v: float | None) -> str:
    return "&ndash;" if v is None else f"{v:.4f}"


# -- PNG -------------------------------------------------------------------------------------

def to_png(search: Search, out: str, dpi: int = 150) -> None:
    """The tree as a PNG through matplotlib (Agg): boxes with each candidate's start, scores and
    combined score; the answer's path orange, kept green, ended tagged.

    Raises:
        ValueError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch
    except ImportError:
        raise ValueError("a PNG needs matplotlib: pip install 'mahalo[plot]' (or write --out tree.html)") from None
    objs, path = search.objectives, dict(enumerate(search.answer_path))
    steps, rows = len(search.steps), max(len(s.candidates) for s in search.steps)
    fig_w, fig_h = min(2.3 * steps + 0.6, 120.0), min(0.95 * rows + 1.6, 120.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing")
            for k, step in enumerate(search.steps):
                kept = search.kept(k)
                ax.text(k + 0.41, 0.62, f"step {k}", ha="center", fontsize=8, weight="bold", parse_math=False)
                for i, c in enumerate(step.candidates):
                    _png_card(ax, FancyBboxPatch, k, i, c, objs, i in kept, path.get(k) == i)
                    if k > 0:
                        on = path.get(k) == i and path.get(k - 1) == c.parent
                        color, lw = ("#e07b00", 2.4) if on else ("#2e9b4f", 1.0) if i in kept else ("#c0c0c0", 0.6)
                        ax.plot([k - 0.18, k], [-c.parent, -i], color=color, lw=lw, zorder=1.5 if on else 1)
            width = max(30, int(fig_w * 15))  # characters of 8 pt text across the figure
            title = "\n".join([*_wrapped(f"prompt {search.index}: {_plain(search.prompt, 3 * width)}", width),
                               *_wrapped(f"answer: {_plain(search.text, 4 * width)}", width)])
            ax.set_title(title, fontsize=8, loc="left", parse_math=False)
            ax.set_xlim(-0.1, steps - 0.08)
            ax.set_ylim(-rows + 0.45, 0.8)
            ax.axis("off")
            fig.tight_layout()
            fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)


def _png_card(ax: Any, box: Any, k: int, i: int, c: Candidate, objs: list[str], kept: bool, on_path: bool) -> None:
    edge, lw, face = ("#e07b00", 2.2, "#fff1dd") if on_path else ("#2e9b4f", 1.3, "white") if kept else \
        ("#b0b0b0", 0.6, "#f4f4f4")
    ax.add_patch(box((k, -i - 0.4), 0.82, 0.8, boxstyle="round,pad=0.01", fc=face, ec=edge, lw=lw, zorder=2))
    if c.end != "step":  # ended: a dark tag in the corner
        ax.text(k + 0.8, -i + 0.36, f"ended: {c.end}", fontsize=5, ha="right", va="top", color="white",
                parse_math=False, zorder=4, bbox={"boxstyle": "round,pad=0.2", "fc": "#555", "ec": "none"})
    scores = " ".join(f"{o[:6]}={c.scores[o]:.2f}" for o in objs if o in c.scores)
    label = f"#{i}\n{_plain(c.text, 26)}\n{scores}\ncombined={c.combined:.3f}"
    ax.text(k + 0.03, -i + 0.34, label, fontsize=5.5, va="top", ha="left", family="monospace", parse_math=False,
            zorder=3, clip_on=True)


def _wrapped(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, replace_whitespace=False) or [text]


def _plain(text: str, width: int) -> str:
    """One line of ``text`` for the PNG: whitespace as spaces, what the font cannot draw as ·."""
    flat = " ".join(shown(text).split()) if text.strip() else repr(text)
    flat = "".join(ch if ch.isprintable() and ord(ch) < 0x2400 else "\u00b7" for ch in flat)
    return textwrap.shorten(flat, width, placeholder="...") if " " in flat else (
        flat if len(flat) <= width else flat[: width - 3] + "...")


def write(search: Search, out: str) -> str:
    """Write the picture to ``out`` (``.html``/``.htm`` or ``.png``); returns the kind written.

    Raises:
        ValueError: another suffix, an unwritable path, no matplotlib for a PNG.
    """
    kind = Path(out).suffix.lower().lstrip(".")
    if kind not in ("html", "htm", "png"):
        raise ValueError(f"--out {out}: write a .html or a .png file")
    file = Path(out).expanduser()
    if file.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file, e.g. --out {file / 'tree.html'}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        if kind == "png":
            to_png(search, str(file))
        else:
            file.write_text(to_html(search), encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--out {out} cannot be written ({err.strerror or err}): choose a writable path") from None
    return "png" if kind == "png" else "html"

