"""The sample a row becomes: a record in decoded form whose geometry is marked unknown.

Released data carries no geometry, so the geometry fields hold the schema's "unknown" shapes,
and `family` equals `source`. `Source` names the data file in sample ids and `meta`, and holds
the media reader of its rows; `shown_for` says which sampled frames a question shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fourd_jax.data import records
from fourd_jax.data.importers.media import Media, check_sampling
from fourd_jax.data.importers.rows import TOO_FEW_FRAMES, BadRow

DEFAULT_MAX_FRAMES = {"4dthinker": 50, "dsr": 32, "dsr_bench": 32, "vlm4d": 32, "mllm4d": 32}


def sample_record(*, sample_id: str, source: str, subtask: str, question: str, options: list[str], answer: str,
                  frames: np.ndarray, timestamps: np.ndarray, fps: float, meta: dict[str, Any], trace: str = "",
                  imagery: Iterable[np.ndarray] = (), shown_frames: Sequence[int] | None = None) -> dict[str, Any]:
    """A complete record (decoded form) with geometry marked unknown; every frame is shown unless
    `shown_frames` says which."""
    return {
        "schema_version": records.SCHEMA_VERSION,
        "sample_id": sample_id,
        "source": source,
        "family": source,
        "subtask": subtask,
        "frames": frames,
        "fps": float(fps),
        "timestamps": np.asarray(timestamps, np.float32),
        "shown_frames": list(range(len(frames))) if shown_frames is None else list(shown_frames),
        "question": question,
        "options": list(options),
        "answer": answer,
        "trace": trace,
        "imagery": list(imagery),
        "intrinsics": np.zeros((0, 0), np.float32),
        "cam_to_world": np.zeros((0, 4, 4), np.float32),
        "object_ids": [],
        "object_categories": [],
        "object_names": [],
        "object_centers": np.zeros((0, 0, 3), np.float32),
        "object_headings": np.zeros((0, 0, 3), np.float32),
        "target_objects": [],
        "meta": meta,
    }


@dataclass(frozen=True)
class Source:
    """Where rows come from: the data file (named in ids and messages) and the media reader."""

    path: Path
    media: Media

    def sample_id(self, source: str, row: dict[str, Any], id_key: str | None, number: int) -> str:
        original = row.get(id_key) if id_key else None
        return f"{source}:{self.path.stem}:{original if original is not None else number}"

    def meta(self, row: dict[str, Any], id_key: str | None, number: int, **extra: Any) -> dict[str, Any]:
        meta = {"source_file": self.path.name, "row": number, **extra}
        if id_key and row.get(id_key) is not None:
            meta["original_id"] = row[id_key]
        return meta


def source_for(path: str | Path, root: str | Path | None, fps: float, max_frames: int | None,
               uniform: bool = False) -> Source:
    """The Source of a data file, its media under `root` (default: the file's directory)."""
    check_sampling(fps, max_frames)
    path = Path(path)
    return Source(path, Media(Path(root) if root is not None else path.parent, fps, max_frames, uniform))


def shown_for(subtask: str, num_frames: int) -> list[int]:
    """The frames a question shows: all, except that `*_dir_pred` withholds the last two sampled
    frames (it asks where an entity goes from frame T-3 to T-1, SPEC 4), as synthetic records do."""
    if not subtask.endswith("_dir_pred"):
        return list(range(num_frames))
    if num_frames < 3:
        raise BadRow(TOO_FEW_FRAMES, f"a {subtask} question withholds the last two sampled frames, so it needs "
                                     f"at least 3, but the media gives {num_frames}")
    return list(range(num_frames - 2))
