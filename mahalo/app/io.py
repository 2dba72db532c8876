"""Prompts in, JSONL results out, resume.

Each output line is one prompt's record, written with a single ``write`` and flushed, so an
interrupted run loses at most the prompt in flight. A re-run with the same output skips the
prompts already written (matched by their index and text) and appends the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer: its position in the input and its text."""

    index: int
    prompt: str


def read_prompts(path: str, field: str) -> list[PromptItem]:
    """Prompts of a JSONL file, one object per line, the prompt in ``field``.

    Raises:
        ValueError: a missing file, malformed JSON, a missing or empty field (file:line).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"prompts file not found: {path}")
    items = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            items.append(PromptItem(len(items), _prompt_of(line, field, f"{path}:{lineno}")))
    if not items:
        raise ValueError(f"prompts file {path} has no prompts")
    return items


def _prompt_of(line: str, field: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise ValueError(f"{where}: no field {field!r} (set prompt_field=NAME to the field holding the prompt)")
    value = obj[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {field!r} must be a non-empty string")
    return value


def done_keys(path: str | None) -> set[tuple[int, str]]:
    """(index, prompt) of every complete record already in the output file.

    A torn last line (a run killed mid-write) is cut off so appending stays valid JSONL.

    Raises:
        ValueError: a complete line that is not a mahalo record (the file is not ours).
    """
    if path is None or not Path(path).is_file():
        return set()
    _drop_torn_tail(Path(path))
    keys = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                keys.add((int(rec["index"]), str(rec["prompt"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{path}:{lineno}: not a mahalo result record; choose another output file"
                ) from None
    return keys


def _drop_torn_tail(file: Path) -> None:
    data = file.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run", file, len(data) - cut)
    with file.open("r+b") as f:
        f.truncate(cut)


class ResultWriter:
    """Appends one JSON record per line and flushes it to disk at once."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file = None
        if path is not None:
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._file = open(Path(path).expanduser(), "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pending(items: list[PromptItem], done: set[tuple[int, str]]) -> Iterator[PromptItem]:
    """The items not yet in ``done``."""
    return (it for it in items if (it.index, it.prompt) not in done)
