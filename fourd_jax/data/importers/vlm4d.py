"""VLM4D QA files (SPEC 5): rows `id, video, question_type, question, choices, answer`.

`choices` maps the letters A-D to their texts; `answer` is the text of the correct choice. As
released, `video` is a Hugging Face URL; it is read from its path after `/resolve/<revision>/`
under the video root (`media`). `question_type` is the sub-task.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data.importers.rows import BAD_ANSWER, BAD_OPTIONS, BadRow, ImportStats, read_rows, samples_from_rows
from fourd_jax.data.importers.samples import DEFAULT_MAX_FRAMES, sample_record, source_for
from fourd_jax.data.importers.text import option_text, required, required_text
from fourd_jax.data.taxonomy import LETTERS


def _vlm4d_choices(value: Any) -> tuple[list[str], list[str]]:
    """(options, the raw choice texts as str()) of a VLM4D `choices` map with keys A-D."""
    if not isinstance(value, dict) or sorted(value) != list(LETTERS):
        raise BadRow(BAD_OPTIONS, "field 'choices' must map exactly the keys A, B, C and D")
    raw = [str(value[letter]) for letter in LETTERS]
    return [option_text(value[letter], letter, "choices") for letter in LETTERS], raw


def import_vlm4d(json_path: str | Path, video_root: str | Path | None = None,
                 max_frames: int | None = DEFAULT_MAX_FRAMES["vlm4d"], *, fps: float = 1.0,
                 skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a VLM4D QA file. The answer letter is the one choice whose text equals
    `answer` (both compared as str(), spaces at the ends ignored); none or several is a bad row.

    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = source_for(json_path, video_root, fps, max_frames)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        question, subtask = required_text(row, "question"), required_text(row, "question_type")
        options, raw_choices = _vlm4d_choices(required(row, "choices"))
        answer_text = str(required(row, "answer")).strip()
        letters = [L for L, choice in zip(LETTERS, raw_choices, strict=True) if choice.strip() == answer_text]
        if len(letters) != 1:
            raise BadRow(BAD_ANSWER, f"field 'answer' {answer_text!r} equals {len(letters)} of the choices, not one")
        frames, timestamps, fps_used = src.media.video(src.media.path(required(row, "video"), "video"))
        meta = src.meta(row, "id", number, video=row["video"], answer_text=answer_text)
        return sample_record(sample_id=src.sample_id("vlm4d", row, "id", number), source="vlm4d", subtask=subtask,
                             question=question, options=options, answer=letters[0], frames=frames,
                             timestamps=timestamps, fps=fps_used, meta=meta)

    yield from samples_from_rows(src.path, read_rows(src.path), build, skip_bad_records, stats)
