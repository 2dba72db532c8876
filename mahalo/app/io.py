"""Prompts in, JSONL results out, resume.

Each output line is one prompt's record, written with a single ``write`` and flushed, so an
interrupted run loses at most the prompt in flight. Every field of the input record is copied into
its output record. A re-run with the same output skips the prompts already written (matched by
their index and text) and appends the rest; :func:`config_changes` tells a re-run that the file
was written with another config, :func:`foreign` that it answers other prompts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mahalo.chat import as_messages

log = logging.getLogger(__name__)


# Keys of mahalo's own output records; an input field of the same name is kept as ``input_<name>``.
RECORD_KEYS = ("index", "prompt", "text", "stop_reason", "scores", "stats", "steps", "answer_path", "config", "error",
               "replica", "attempt")


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer: its position in the input, its text and the input record's fields."""

    index: int
    prompt: str  # the (last) user message
    fields: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None  # a whole conversation, when the record gives one

    @property
    def conversation(self) -> str | list[dict[str, str]]:
        """What is decoded: the conversation, or the prompt string."""
        return self.messages if self.messages is not None else self.prompt

    def input_fields(self) -> dict[str, Any]:
        """The input record's fields for the output record (``input_<name>`` where mahalo's own
        record uses the name; the prompt field itself when it is ``prompt`` is the record's own)."""
        out = {}
        for key, value in self.fields.items():
            if key == "prompt" and value == self.prompt:
                continue
            out[f"input_{key}" if key in RECORD_KEYS else key] = value
        return out


def read_prompts(path: str, field: str) -> list[PromptItem]:
    """Prompts of a JSONL file, one object per line: the prompt in ``field`` (a string, or a
    conversation), or, when the record has no ``field``, an OpenAI-style conversation in
    ``messages``.

    Raises:
        ValueError: a missing file or a directory; a line that is not UTF-8, malformed JSON, a
            missing or empty field, a malformed conversation (file:line).
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"prompts={path} is a directory: give a JSONL file (one JSON object per line)")
    if not file.is_file():
        raise ValueError(f"prompts file not found: {path}")
    items = []
    # bytes.splitlines breaks lines where text mode does (\n, \r\n, \r), so line numbers agree
    for lineno, raw in enumerate(file.read_bytes().splitlines(), 1):
        line = _text_of(raw, f"{path}:{lineno}")
        if not line.strip():
            continue
        obj = _object_of(line, f"{path}:{lineno}")
        items.append(_item_of(len(items), obj, field, f"{path}:{lineno}"))
    if not items:
        raise ValueError(f"prompts file {path} has no prompts")
    return items


def _text_of(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(raw[: err.start].decode("utf-8")) + 1  # in characters, as an editor counts; valid up to there
        raise ValueError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}): save the file as UTF-8"
        ) from None


def _object_of(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _item_of(index: int, obj: dict[str, Any], field: str, where: str) -> PromptItem:
    key = field if field in obj else "messages" if "messages" in obj else None
    if key is None:
        raise ValueError(f"{where}: no field {field!r} and no 'messages' (set prompt_field=NAME to the field "
                         "holding the prompt)")
    value = obj[key]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        return PromptItem(index, value, obj)
    try:
        messages = as_messages(value)
    except ValueError as err:
        raise ValueError(f"{where}: field {key!r}: {err}") from None
    return PromptItem(index, messages[-1]["content"], obj, messages)


def check_output(path: str | None) -> None:
    """An output path must name a file that can be created or appended to. An existing file is
    opened for append (nothing is written); for a missing one a nameless temporary file is created
    in its nearest existing directory (the writer makes the directories between). Nothing is left
    behind.

    Raises:
        ValueError: the path is a directory, its parent is a file, or it cannot be written.
    """
    if path is None:
        return
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"output={path} is a directory: give a file, e.g. output={file / 'answers.jsonl'}")
    parent = next((p for p in file.parents if p.exists()), Path.cwd())
    if not parent.is_dir():
        raise ValueError(f"output={path}: {parent} is a file, not a directory")
    try:
        if file.is_file():
            with file.open("ab"):
                pass
        elif file.exists():  # a device or a pipe: opening it may block or act
            if not os.access(file, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        else:
            with tempfile.TemporaryFile(dir=parent):
                pass
    except OSError as err:
        raise ValueError(f"output={path} cannot be written ({err.strerror or err}): choose a writable path") from None


@dataclass
class Existing:
    """What an output file already holds."""

    keys: set[tuple[int, str]] = field(default_factory=set)  # (index, prompt) of every record
    config: dict[str, Any] | None = None  # the config of its first record
    errors: int = 0  # records of prompts that failed


def existing(path: str | None) -> Existing:
    """The complete records already in the output file; the file is only read.

    A torn last line (a run killed mid-write) is not a record: :class:`ResultWriter` cuts it off
    before it appends, so a run that stops before answering anything leaves the file as it was.

    Raises:
        ValueError: a complete line that is not a mahalo record (the file is not ours).
    """
    found = Existing()
    file = Path(path).expanduser() if path is not None else None
    if file is None or not file.is_file():
        return found
    data = file.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    for lineno, raw in enumerate(complete.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            found.keys.add((int(rec["index"]), str(rec["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{path}:{lineno}: not a mahalo result record; choose another output file") from None
        if found.config is None and isinstance(rec.get("config"), dict):
            found.config = rec["config"]
        found.errors += "error" in rec
    return found


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every config key that differs (top-level keys in ``ignore`` skipped).

    A key the old file does not have is no change when its new value is empty (``None``, ``[]``,
    ``{}``, ``""``): an option added to mahalo after the file was written (``sampling.stop``, say),
    left at a default that does nothing, decodes what the old version decoded."""
    a = {k: v for k, v in _flatten(old).items() if k.split(".")[0] not in ignore}
    b = {k: v for k, v in _flatten(new).items() if k.split(".")[0] not in ignore}
    missing = object()
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing) and not (k not in a and _empty(b[k]))
    ]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict, str)) and not value)


def _drop_torn_tail(file: Path) -> None:
    data = file.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run", file, len(data) - cut)
    with file.open("r+b") as f:
        f.truncate(cut)


class ResultWriter:
    """Appends one JSON record per line and flushes it to disk at once. The file is created (or
    opened, and a torn last line of a killed run cut off) at the first record, so a run that
    answers nothing leaves no file behind, or the file as it was."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file = None
        self._regular = True

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            file = Path(self.path).expanduser()
            file.parent.mkdir(parents=True, exist_ok=True)
            if file.is_file():
                _drop_torn_tail(file)  # so appending stays valid JSONL
            self._file = open(file, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._regular = file.is_file()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._regular:  # a device (output=/dev/null) cannot be synced
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


def foreign(items: list[PromptItem], done: set[tuple[int, str]]) -> tuple[int, str] | None:
    """The (index, prompt) of ``done`` with the lowest index that is not one of ``items`` (its
    index is not theirs, or the prompt at that index differs): the file answers other prompts."""
    ours = {(it.index, it.prompt) for it in items}
    return next((key for key in sorted(done) if key not in ours), None)
