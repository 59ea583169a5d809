"""The rows of a data file, and the bookkeeping of the rows that cannot become samples.

A ".json" file may hold one JSON value or JSON lines (one object per line); a ".parquet" file
(DSR-Bench is released as one) is read with pyarrow. Rows are numbered from 1: the line in a JSON
lines file, otherwise the position in reading order.

A bad row (a missing field, unreadable media, an answer that is not one of A-D, imagery that
does not match its markers) raises `BadRow` while its sample is built; `samples_from_rows` then
skips and counts it in `ImportStats`, or raises `InputError` naming the file and row: a sample is
never written half right.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourd_jax.errors import InputError

# Why a row was skipped: the keys of ImportStats.skipped.
MISSING_FIELD = "missing field"
BAD_FIELD = "bad field"
BAD_OPTIONS = "bad options"
BAD_ANSWER = "bad answer"
IMAGERY_COUNT = "imagery count mismatch"
UNREADABLE_MEDIA = "unreadable media"
TOO_FEW_FRAMES = "too few frames"
INVALID_JSON = "invalid json"

FIRST_SKIPPED = 5  # skipped rows an import reports one by one


class BadRow(Exception):
    """A row that cannot become a correct sample; `reason` is the category counted in ImportStats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class ImportStats:
    """What an import did: rows read, samples written, and rows skipped per reason."""

    read: int = 0
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_problem: dict[str, str] = field(default_factory=dict)  # reason -> message of its first skipped row
    first_skipped: list[str] = field(default_factory=list)  # the first FIRST_SKIPPED skipped rows' messages

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped row under `reason`, keeping the first message of each reason and the
        first few messages overall."""
        self.skipped[reason] += 1
        self.first_problem.setdefault(reason, message)
        if len(self.first_skipped) < FIRST_SKIPPED:
            self.first_skipped.append(f"{reason}: {message}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line such as "read 10, written 8, skipped 2 (bad answer: 1, missing field: 1)"."""
        text = f"read {self.read}, written {self.written}, skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) + ")"
        return text


@dataclass(frozen=True)
class Row:
    number: int
    data: Any
    problem: str | None = None  # why the row could not even be parsed


def read_rows(path: Path) -> list[Row]:
    """The rows of a JSON, JSON lines or parquet file."""
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # local: heavy, and only parquet files need it
        except ImportError:
            raise InputError(f"{path} is parquet, which needs pyarrow (pip install pyarrow).") from None
        return [Row(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as whole:
        return _json_lines(path, text, whole)
    return [Row(i + 1, v) for i, v in enumerate(value)] if isinstance(value, list) else [Row(1, value)]


def _json_lines(path: Path, text: str, whole: json.JSONDecodeError) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(number, json.loads(line)))
        except json.JSONDecodeError as e:
            if not rows:  # not even the first line parses: the file is neither format
                raise InputError(f"{path} is neither JSON nor JSON lines ({whole.msg} at line {whole.lineno})."
                                 ) from None
            rows.append(Row(number, None, f"the line is not valid JSON ({e.msg})"))
    if not rows:
        raise InputError(f"{path} holds no rows.")
    return rows


def samples_from_rows(path: Path, rows: Iterable[Row], build: Callable[[dict[str, Any], int], dict[str, Any]],
                      skip_bad_records: bool, stats: ImportStats | None) -> Iterator[dict[str, Any]]:
    """Build a sample from each row; a bad row is counted in `stats` and skipped, or raises
    InputError naming the file and row. A repeated sample id gets "@<row>" appended."""
    stats = stats if stats is not None else ImportStats()
    seen: set[str] = set()
    for row in rows:
        stats.read += 1
        try:
            if row.problem:
                raise BadRow(INVALID_JSON, row.problem)
            if not isinstance(row.data, dict):
                raise BadRow(BAD_FIELD, f"the row is a JSON {type(row.data).__name__}, not an object")
            sample = build(row.data, row.number)
        except BadRow as bad:
            message = f"{path} row {row.number}: {bad}."
            if not skip_bad_records:
                raise InputError(message) from None
            stats.skip(bad.reason, message)
            continue
        if sample["sample_id"] in seen:
            sample["sample_id"] += f"@{row.number}"
        seen.add(sample["sample_id"])
        yield sample
