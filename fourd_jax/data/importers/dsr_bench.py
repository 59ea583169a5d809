"""DSR-Bench files (JSON, JSON lines or parquet): rows `videoID, question, options, answer, type`.

`videoID` names a file under the video root, given with or without its extension (tried:
VIDEO_SUFFIXES); `options` is a list of four (or its JSON text, as table exports store it);
`type` is one of the 13 DSR sub-tasks. Videos are sampled as for DSR raw QA (`dsr`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data.importers.dsr import dsr_subtask
from fourd_jax.data.importers.media import Media
from fourd_jax.data.importers.rows import (
    BAD_OPTIONS,
    UNREADABLE_MEDIA,
    BadRow,
    ImportStats,
    read_rows,
    samples_from_rows,
)
from fourd_jax.data.importers.samples import DEFAULT_MAX_FRAMES, sample_record, shown_for, source_for
from fourd_jax.data.importers.text import answer_letter, option_text, required, required_text
from fourd_jax.data.taxonomy import LETTERS

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


def _bench_options(value: Any) -> list[str]:
    if isinstance(value, str):  # table exports store the list as its JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(BAD_OPTIONS, "field 'options' is text that is not a JSON list") from None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise BadRow(BAD_OPTIONS, "field 'options' must be a list of 4 options")
    return [option_text(v, letter, "options") for letter, v in zip(LETTERS, value, strict=True)]


def _bench_video(media: Media, video_id: Any) -> Path:
    path = media.path(video_id, "videoID")
    if path.is_file():
        return path
    for suffix in VIDEO_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise BadRow(UNREADABLE_MEDIA, f"no video file {path}[{'|'.join(VIDEO_SUFFIXES)}] exists for field 'videoID'")


def import_dsr_bench(path: str | Path, video_root: str | Path | None = None,
                     max_frames: int | None = DEFAULT_MAX_FRAMES["dsr_bench"], *, fps: float = 1.0,
                     skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from DSR-Bench rows (JSON, JSON lines or parquet); `type` is the sub-task.

    Each video gives `max_frames` (32) frames sampled uniformly over the clip, times rounded to
    0.1 s (`fps` is not used); `*_dir_pred` questions show all but the last two (`shown_for`).
    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = source_for(path, video_root, fps, max_frames, uniform=True)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        question, options = required_text(row, "question"), _bench_options(required(row, "options"))
        answer = answer_letter(required(row, "answer"), options, "answer")
        subtask = dsr_subtask(required(row, "type"), "type")
        frames, timestamps, fps_used = src.media.video(_bench_video(src.media, required(row, "videoID")))
        return sample_record(sample_id=src.sample_id("dsr", row, None, number), source="dsr", subtask=subtask,
                             question=question, options=options, answer=answer, frames=frames, timestamps=timestamps,
                             fps=fps_used, meta=src.meta(row, None, number, videoID=row["videoID"]),
                             shown_frames=shown_for(subtask, len(frames)))

    yield from samples_from_rows(src.path, read_rows(src.path), build, skip_bad_records, stats)
