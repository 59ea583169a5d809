"""MLLM-4D SFT items (SPEC 5): `conversations` = [{"from", "value"}] with a `video` or `image`.

The human turn holds a `<video>` (or `<image>`) placeholder, the question and the option lines
"A. ..".."D. ..": the multiple-choice questions that records hold. The gpt turn is the ST-CoT
trace, `<thinking>Spatial State (Initial Frame): ...</thinking><answer>..</answer>`; it is kept
whole as the record's `trace`, which the SFT stage supervises (`configs/sft.py`) and from which
the ST-reward reads the true camera and object centres (`train.rl.sample_reward`). The answer is
the last `<answer>` span: a letter, or an option's text. `video` is a path under the media root
(decoded at `fps`, at most `max_frames` frames); `image` is one image path or a list of frame
paths (taken as 1 fps frames). The sub-task is the row's `question_type` when it has one, else
inferred from the question (`text.infer_subtask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data.importers.rows import (
    BAD_ANSWER,
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
    required,
    required_text,
    split_text_input,
)


def _media(src: Source, row: dict[str, Any]) -> tuple[Any, Any, float, str]:
    """(frames, timestamps, fps, key) of an item's `video`, or of its `image` path(s)."""
    if row.get("video") is not None:
        return (*src.media.video(src.media.path(row["video"], "video")), "video")
    if row.get("image") is not None:
        images = row["image"] if isinstance(row["image"], list) else [row["image"]]
        return (*src.media.frame_list(images, "image"), "image")
    raise BadRow(MISSING_FIELD, "field 'video' (or 'image') is missing")


def mllm4d_sample(src: Source, row: dict[str, Any], number: int) -> dict[str, Any]:
    """The record of one MLLM-4D conversations item (bad rows raise BadRow)."""
    text = conversation_as_sft({"conversations": required(row, "conversations")})
    try:  # the 4DThinker field names in the messages become this layout's turns
        question, options, suffix = split_text_input(required_text(text, "text_input"))
        trace = required_text(text, "text_output")
    except BadRow as e:
        turns = {"field 'text_input'": "the human turn of field 'conversations'",
                 "field 'text_output'": "the gpt turn of field 'conversations'"}
        detail = str(e)
        for old, new in turns.items():
            detail = detail.replace(old, new)
        raise BadRow(e.reason, detail) from None
    answers = ANSWER_SPAN.findall(trace)
    if not answers:
        raise BadRow(BAD_ANSWER, "the gpt turn of field 'conversations' has no <answer>...</answer>")
    answer = answer_letter(answers[-1], options, "conversations")
    frames, timestamps, fps, media_key = _media(src, row)
    subtask = row.get("question_type")
    if not isinstance(subtask, str) or not subtask.strip():
        subtask = infer_subtask(question, options)
    meta = src.meta(row, "id", number, format="conversations", **{media_key: row[media_key]})
    if suffix:
        meta["text_after_options"] = suffix
    return sample_record(sample_id=src.sample_id("mllm4d", row, "id", number), source="mllm4d",
                         subtask=subtask.strip(), question=question, options=options, answer=answer, frames=frames,
                         timestamps=timestamps, fps=fps, trace=trace, meta=meta)


def import_mllm4d(json_path: str | Path, root: str | Path | None = None,
                  max_frames: int | None = DEFAULT_MAX_FRAMES["mllm4d"], *, fps: float = 1.0,
                  skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples (family "mllm4d", the trace kept) from an MLLM-4D SFT file of conversations items
    (a JSON list or JSON lines). Bad rows raise InputError, or with `skip_bad_records` are skipped
    and counted in `stats`."""
    src = source_for(json_path, root, fps, max_frames)
    yield from samples_from_rows(src.path, read_rows(src.path),
                                 lambda row, number: mllm4d_sample(src, row, number), skip_bad_records, stats)
