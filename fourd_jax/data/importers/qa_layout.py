"""The raw QA layout, shared by 4DThinker's RL rows and DSR's raw QA: `Question`, options in
fields `A`..`D`, the answer in `Correct`, and media in `frame_paths`, `video_path` or `video`
(the first present, in that order)."""

from __future__ import annotations

from typing import Any

from fourd_jax.data.importers.samples import Source, sample_record, shown_for
from fourd_jax.data.importers.text import answer_letter, infer_subtask, option_text, required, required_text
from fourd_jax.data.taxonomy import LETTERS


def _qa_options(row: dict[str, Any]) -> list[str]:
    """The four options of a row in the raw QA layout (fields A, B, C, D)."""
    return [option_text(required(row, letter), letter, letter) for letter in LETTERS]


def qa_row(src: Source, row: dict[str, Any], number: int, source: str, subtask: str | None) -> dict[str, Any]:
    """A sample from the raw QA layout (4DThinker RL rows, DSR raw QA); subtask None: inferred."""
    question, options = required_text(row, "Question"), _qa_options(row)
    answer = answer_letter(required(row, "Correct"), options, "Correct")
    frames, timestamps, fps, media_key = src.media.row_media(row)
    meta = src.meta(row, "id", number, **{media_key: row[media_key]})
    if source == "4dthinker":
        meta["format"] = "rl"
    subtask = subtask or infer_subtask(question, options)
    return sample_record(sample_id=src.sample_id(source, row, "id", number), source=source, subtask=subtask,
                         question=question, options=options, answer=answer, frames=frames, timestamps=timestamps,
                         fps=fps, meta=meta, shown_frames=shown_for(subtask, len(frames)))
