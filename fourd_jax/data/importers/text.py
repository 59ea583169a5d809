"""The text of a row: required fields, options, answer letters, conversations turns, and the question family.

Options may carry their own "A. " prefix (dropped; another letter means misordered options).
Answers are a letter, a letter with its option's text, or an option's text; text compares case-
and spacing-insensitively, without a trailing full stop. Problems are raised as `BadRow`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fourd_jax.data.importers.rows import BAD_ANSWER, BAD_FIELD, BAD_OPTIONS, MISSING_FIELD, BadRow
from fourd_jax.data.taxonomy import CAMERA_MOVES, LETTERS, OBJECT_DIRECTIONS, OBJECT_DISTANCES, OBJECT_SPEEDS

_OPTION_LINE = re.compile(r"^\s*([A-D])[.)]\s*(.*?)\s*$")
ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # of a reasoning trace
_PLACEHOLDER = re.compile(r"<(?:video|image)>\s*")  # media placeholders of a human turn
_LETTER_FIRST = re.compile(r"^([A-D])(?:\s*[.):]\s*|\s+|$)(.*)$", re.DOTALL)


def required(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise BadRow(MISSING_FIELD, f"field '{key}' is missing")
    return row[key]


def required_text(row: dict[str, Any], key: str) -> str:
    value = required(row, key)
    if not isinstance(value, str) or not value.strip():
        raise BadRow(BAD_FIELD, f"field '{key}' must be a non-empty string")
    return value.strip()


def _normalised(text: str) -> str:
    """Text compared case- and spacing-insensitively, without a trailing full stop."""
    return " ".join(str(text).split()).rstrip(".").casefold()


def option_text(value: Any, letter: str, key: str) -> str:
    """An option without its own "A. " prefix; a prefix with another letter means misordered options."""
    if value is None or isinstance(value, dict | list):
        raise BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' must be text or a number")
    text = str(value).strip()
    prefixed = _OPTION_LINE.match(text)
    if prefixed:
        if prefixed.group(1) != letter:
            raise BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' is prefixed {prefixed.group(1)!r}")
        text = prefixed.group(2)
    if not text:
        raise BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' is empty")
    return text


def answer_letter(value: Any, options: Sequence[str], key: str) -> str:
    """The answer letter of "D", "D. Pan Right" (the text must then match option D) or an option's text."""
    text = str(value).strip() if isinstance(value, str | int | float) else ""
    letter_first = _LETTER_FIRST.match(text)
    if letter_first:
        letter, rest = letter_first.groups()
        if not rest.strip() or _normalised(rest) == _normalised(options[LETTERS.index(letter)]):
            return letter
    matches = [L for L, option in zip(LETTERS, options, strict=True) if _normalised(option) == _normalised(text)]
    if len(matches) == 1:
        return matches[0]
    raise BadRow(BAD_ANSWER, f"field '{key}' holds {value!r}, which is not one of A-D or of the options")


def split_text_input(text_input: str) -> tuple[str, list[str], str]:
    """(question, four options, text after them) of a 4DThinker `text_input`: the question, then
    lines "A. ..." to "D. ..." (the last such block; blank lines may sit between them)."""
    lines = text_input.splitlines()
    found = None
    for start, line in enumerate(lines):
        first = _OPTION_LINE.match(line)
        if not first or first.group(1) != "A":
            continue
        options, end = [first.group(2)], start
        for j in range(start + 1, len(lines)):
            if len(options) == 4:
                break
            if not lines[j].strip():
                continue
            nxt = _OPTION_LINE.match(lines[j])
            if not nxt or nxt.group(1) != LETTERS[len(options)]:
                break
            options.append(nxt.group(2))
            end = j
        if len(options) == 4:
            found = (start, end, options)
    if found is None:
        raise BadRow(BAD_OPTIONS, "field 'text_input' has no four option lines starting 'A.' to 'D.'")
    start, end, options = found
    question = "\n".join(lines[:start]).strip()
    if not question:
        raise BadRow(BAD_FIELD, "field 'text_input' has no question before its options")
    if not all(options):
        raise BadRow(BAD_OPTIONS, "field 'text_input' has an empty option")
    return question, options, "\n".join(lines[end + 1:]).strip()


def _is_camera_move_combination(option: str) -> bool:
    moves = {_normalised(m) for m in CAMERA_MOVES}
    parts = re.split(r",\s*|\s+and\s+", _normalised(option))
    return all(part in moves for part in parts)


def infer_subtask(question: str, options: Sequence[str]) -> str:
    """The 4DThinker question family: "camera_motion", "object_direction", "object_speed",
    "object_distance", or "unknown".

    Rule: if all four options come from one family's released vocabulary (SPEC 3.6; camera
    options may combine moves as "X, Y and Z"), that family. Otherwise by words in the question,
    in this order: "speed" -> speed; "distance" -> distance; "camera" followed by a word of
    motion ("move", "moving", "movement", "motion") -> camera; "direction" -> direction.
    """
    normalised = [_normalised(o) for o in options]
    for subtask, vocabulary in (("object_direction", OBJECT_DIRECTIONS), ("object_speed", OBJECT_SPEEDS),
                                ("object_distance", OBJECT_DISTANCES)):
        if all(o in {_normalised(v) for v in vocabulary} for o in normalised):
            return subtask
    if all(_is_camera_move_combination(o) for o in options):
        return "camera_motion"
    words = question.casefold()
    if "speed" in words:
        return "object_speed"
    if "distance" in words:
        return "object_distance"
    if re.search(r"\bcamera\b.*\b(move|moves|moving|movement|motion)\b", words, re.DOTALL):
        return "camera_motion"
    if "direction" in words:
        return "object_direction"
    return "unknown"


def conversation_as_sft(row: dict[str, Any]) -> dict[str, Any]:
    """A `conversations` row ([{"from": "human", "value": "<video>..."}, {"from": "gpt", ...}]) in
    the SFT fields: the first human turn (media placeholders removed) is `text_input`, the first
    model turn after it `text_output`; media and imagery keys are kept."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow(BAD_FIELD, "field 'conversations' must be a list of {\"from\", \"value\"} turns")
    speakers = [str(t.get("from", t.get("role", ""))).lower() for t in turns]
    try:
        asked = next(i for i, who in enumerate(speakers) if who in ("human", "user"))
        answered = next(i for i in range(asked + 1, len(turns)) if speakers[i] in ("gpt", "assistant"))
    except StopIteration:
        raise BadRow(BAD_FIELD, "field 'conversations' has no human turn followed by a gpt turn") from None
    text = lambda turn: turn.get("value", turn.get("content"))  # noqa: E731
    if not isinstance(text(turns[asked]), str) or not isinstance(text(turns[answered]), str):
        raise BadRow(BAD_FIELD, "field 'conversations' has a turn whose value is not a string")
    return {**{k: v for k, v in row.items() if k != "conversations"},
            "text_input": _PLACEHOLDER.sub("", text(turns[asked])), "text_output": text(turns[answered])}
