"""4DThinker data files (SPEC 3.6): SFT rows, the same rows as conversations, and RL rows.

SFT rows are `id, text_input, text_output, image_input, image_output`: `text_input` holds the
question and the option lines "A. ..".."D. ..", `text_output` the reasoning trace ending in
`<answer>..</answer>`, `image_input` the paths of the 1 fps frames (or a video in `video` /
`video_path`), `image_output` one imagery image per `<output_image>` marker of the trace. A
`conversations` row carries the same text in a human and a gpt turn. RL rows, mixed in the same
file, are the raw QA layout (`qa_layout`). The sub-task is inferred (`text.infer_subtask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data.importers.qa_layout import qa_row
from fourd_jax.data.importers.rows import (
    BAD_ANSWER,
    IMAGERY_COUNT,
    MISSING_FIELD,
    BadRow,
    ImportStats,
    read_rows,
    samples_from_rows,
)
from fourd_jax.data.importers.samples import DEFAULT_MAX_FRAMES, Source, sample_record, source_for
from fourd_jax.data.importers.text import (
    ANSWER_SPAN,
    answer_letter,
    conversation_as_sft,
    infer_subtask,
    required_text,
    split_text_input,
)


def _sft_sample(src: Source, row: dict[str, Any], number: int, layout: str = "sft") -> dict[str, Any]:
    question, options, suffix = split_text_input(required_text(row, "text_input"))
    trace = required_text(row, "text_output")
    answers = ANSWER_SPAN.findall(trace)
    if not answers:
        raise BadRow(BAD_ANSWER, "field 'text_output' has no <answer>...</answer>")
    answer = answer_letter(answers[-1], options, "text_output")
    markers = trace.count("<output_image>")
    image_output = row.get("image_output") or []
    if isinstance(image_output, list) and len(image_output) != markers:
        raise BadRow(IMAGERY_COUNT, f"field 'text_output' has {markers} <output_image> markers but "
                                    f"'image_output' lists {len(image_output)} images")
    if row.get("image_input") is not None:  # the released layout: paths of the 1 fps frames
        frames, timestamps, fps = src.media.frame_list(row["image_input"], "image_input")
    elif any(row.get(k) is not None for k in ("video", "video_path", "frame_paths")):  # a video, as RL rows
        frames, timestamps, fps, _ = src.media.row_media(row)
    else:
        raise BadRow(MISSING_FIELD, "field 'image_input' (or 'video') is missing")
    imagery = src.media.images(image_output, "image_output")
    meta = src.meta(row, "id", number, format=layout)
    if suffix:
        meta["text_after_options"] = suffix
    return sample_record(sample_id=src.sample_id("4dthinker", row, "id", number), source="4dthinker",
                         subtask=infer_subtask(question, options), question=question, options=options,
                         answer=answer, frames=frames, timestamps=timestamps, fps=fps, trace=trace, imagery=imagery,
                         meta=meta)


def import_4dthinker(jsonl_path: str | Path, root: str | Path | None = None,
                     max_frames: int | None = DEFAULT_MAX_FRAMES["4dthinker"], *, fps: float = 1.0,
                     skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a 4DThinker JSON lines file of SFT rows (`text_input`, `text_output`, frames in
    `image_input` or a video in `video` / `video_path`, `image_output`), the same rows as
    `conversations` (human turn with `<video>`, gpt turn with the trace), and/or RL rows
    (`Question`, ...). SFT rows keep the trace and `image_output` as imagery.

    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = source_for(jsonl_path, root, fps, max_frames)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        if "conversations" in row:
            return _sft_sample(src, conversation_as_sft(row), number, layout="conversations")
        if "text_input" in row:
            return _sft_sample(src, row, number)
        if "Question" in row:
            return qa_row(src, row, number, "4dthinker", None)
        raise BadRow(MISSING_FIELD, "field 'text_input' (SFT) or 'Question' (RL) is missing")

    yield from samples_from_rows(src.path, read_rows(src.path), build, skip_bad_records, stats)
