"""DSR Suite raw QA files (SPEC 4): QA dicts `{"Type", "Question", "A".."D", "Correct"}`.

Two layouts: a JSON object mapping a video path to its QA dicts (a list, or one dict), or rows
(the raw QA layout, `qa_layout`) that each name their media in `frame_paths`, `video_path` or
`video`. In the mapping layout rows are numbered over all QA dicts in reading order. `Type` is
the sub-task, one of the 13 DSR sub-tasks. Videos give `max_frames` (32) frames sampled
uniformly over the whole clip, times rounded to 0.1 s, as DSR Suite samples them; `*_dir_pred`
questions show all but the last two sampled frames (`samples.shown_for`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data.importers.qa_layout import qa_row
from fourd_jax.data.importers.rows import BAD_FIELD, BadRow, ImportStats, Row, read_rows, samples_from_rows
from fourd_jax.data.importers.samples import DEFAULT_MAX_FRAMES, source_for
from fourd_jax.data.importers.text import required
from fourd_jax.data.taxonomy import DSR_SUBTASKS


def dsr_subtask(value: Any, key: str) -> str:
    if value not in DSR_SUBTASKS:
        raise BadRow(BAD_FIELD, f"field '{key}' holds {value!r}, which is not one of the 13 DSR sub-tasks")
    return value


def _dsr_rows(rows: list[Row]) -> list[Row]:
    """Rows of a raw DSR file: a mapping layout (video path -> QA dicts) becomes one row per QA dict,
    with the video under `video` unless the QA dict names its own media."""
    if len(rows) != 1 or not isinstance(rows[0].data, dict) or "Question" in rows[0].data:
        return rows
    flat = []
    for video, qas in rows[0].data.items():
        for qa in qas if isinstance(qas, list) else [qas]:
            if isinstance(qa, dict) and not any(k in qa for k in ("frame_paths", "video_path", "video")):
                qa = {**qa, "video": video}
            flat.append(Row(len(flat) + 1, qa))
    return flat


def import_dsr(json_path: str | Path, video_root: str | Path | None = None,
               max_frames: int | None = DEFAULT_MAX_FRAMES["dsr"], *, fps: float = 1.0,
               skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a raw DSR QA file (the two layouts in the module docstring); `Type` is the sub-task.

    Videos give `max_frames` (32) frames sampled uniformly over the clip, times rounded to 0.1 s
    (`fps` is not used for them); frame lists give `max_frames` evenly spaced frames. `*_dir_pred`
    questions show all but the last two of them (`shown_for`).
    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = source_for(json_path, video_root, fps, max_frames, uniform=True)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        return qa_row(src, row, number, "dsr", dsr_subtask(required(row, "Type"), "Type"))

    yield from samples_from_rows(src.path, _dsr_rows(read_rows(src.path)), build, skip_bad_records, stats)
