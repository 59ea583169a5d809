"""Importers of released 4D video QA datasets (4DThinker, DSR Suite, VLM4D, MLLM-4D SFT) into 4D records.

Each importer is a generator of samples in the decoded record form (`records.encode` accepts
them); `import_to_records` writes one ArrayRecord file and reports what it read, wrote and
skipped. A bad row is skipped and counted, or raises `InputError` naming the file and row: a
sample is never written half right.

One module per format holds its layout: `fourdthinker` (SPEC 3.6), `dsr` (raw QA, SPEC 4),
`dsr_bench`, `vlm4d` and `mllm4d` (SPEC 5; the conversations layout of MLLM-4D's SFT
data). They share `rows` (reading JSON, JSON lines and parquet files;
bad rows and their counts), `media` (video decoding, frame sampling, media paths, images),
`text` (fields, options, answer letters, the 4DThinker question family), `qa_layout` (the raw
QA layout of 4DThinker RL rows and DSR) and `samples` (the record a row becomes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fourd_jax.data import records
from fourd_jax.data.importers.dsr import import_dsr
from fourd_jax.data.importers.dsr_bench import VIDEO_SUFFIXES, import_dsr_bench
from fourd_jax.data.importers.fourdthinker import import_4dthinker
from fourd_jax.data.importers.media import decode_video, even_indices
from fourd_jax.data.importers.mllm4d import import_mllm4d
from fourd_jax.data.importers.rows import (
    BAD_ANSWER,
    BAD_FIELD,
    BAD_OPTIONS,
    IMAGERY_COUNT,
    INVALID_JSON,
    MISSING_FIELD,
    TOO_FEW_FRAMES,
    UNREADABLE_MEDIA,
    ImportStats,
)
from fourd_jax.data.importers.samples import DEFAULT_MAX_FRAMES, shown_for
from fourd_jax.data.importers.text import infer_subtask, split_text_input
from fourd_jax.data.importers.vlm4d import import_vlm4d
from fourd_jax.errors import InputError

__all__ = [
    "BAD_ANSWER", "BAD_FIELD", "BAD_OPTIONS", "DEFAULT_MAX_FRAMES", "IMAGERY_COUNT", "IMPORTERS", "INVALID_JSON",
    "MISSING_FIELD", "TOO_FEW_FRAMES", "UNREADABLE_MEDIA", "VIDEO_SUFFIXES", "ImportStats", "decode_video",
    "even_indices", "import_4dthinker", "import_dsr", "import_dsr_bench", "import_mllm4d", "import_to_records",
    "import_vlm4d",
    "infer_subtask", "shown_for", "split_text_input",
]

IMPORTERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "4dthinker": import_4dthinker,
    "dsr": import_dsr,
    "dsr_bench": import_dsr_bench,
    "vlm4d": import_vlm4d,
    "mllm4d": import_mllm4d,
}


def import_to_records(fmt: str, src: str | Path, out_path: str | Path, *, root: str | Path | None = None,
                      max_frames: int | None = None, fps: float = 1.0,
                      skip_bad_records: bool = True) -> ImportStats:
    """Import `src` in format `fmt` (a key of IMPORTERS) into one ArrayRecord file at `out_path`.

    `max_frames` None means the format's default (DEFAULT_MAX_FRAMES). Bad rows are skipped and
    counted, or with `skip_bad_records=False` raise InputError naming the file and row. An import
    that keeps no record is an error naming the first failing row. Either way the output file is
    then neither created nor replaced.
    """
    if fmt not in IMPORTERS:
        raise InputError(f"import format {fmt!r} is unknown; use one of {', '.join(IMPORTERS)}.")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"--out {out_path} is a directory; name the .array_record file to write.")
    stats = ImportStats()
    samples = IMPORTERS[fmt](src, root, DEFAULT_MAX_FRAMES[fmt] if max_frames is None else max_frames, fps=fps,
                             skip_bad_records=skip_bad_records, stats=stats)
    partial = out_path.with_name(f".{out_path.name}.import")  # renamed to out_path only if records were kept
    stats.written = records.write(partial, samples)
    if not stats.written:
        partial.unlink(missing_ok=True)
        first = f"; the first: {stats.first_skipped[0].rstrip('.')}" if stats.first_skipped else ""
        raise InputError(f"no record kept from {src} as format {fmt!r} ({stats.summary()}){first}.")
    os.replace(partial, out_path)
    return stats
