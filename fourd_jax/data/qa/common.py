"""What every question family produces, and the option/letter bookkeeping they share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fourd_jax.data.taxonomy import LETTERS


@dataclasses.dataclass(frozen=True)
class QA:
    """One multiple-choice question about one scene, with everything a record needs.

    `imagery` lists, per `<output_image>` marker in `trace`, the (frame index, object id) whose
    mask is overlaid on that frame to make the imagery image.
    """

    family: str
    subtask: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    target_objects: tuple[int, ...]
    shown_frames: tuple[int, ...]
    trace: str = ""
    imagery: tuple[tuple[int, int], ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        """The text of the correct option."""
        return self.options[LETTERS.index(self.answer)]


def place_key(key: str, distractors: Sequence[str], rng: np.random.Generator) -> tuple[tuple[str, ...], str]:
    """Options with the key at a uniformly random letter; distractors keep their order."""
    if len(distractors) != 3 or key in distractors or len(set(distractors)) != 3:
        raise ValueError(f"need 3 distinct distractors different from the key, got {list(distractors)}")
    slot = int(rng.integers(4))
    options = list(distractors)
    options.insert(slot, key)
    return tuple(options), LETTERS[slot]


def pick_distractors(key: str, pool: Sequence[str], rng: np.random.Generator,
                     preferred: Sequence[str] = ()) -> list[str]:
    """Three distinct wrong options: `preferred` ones first (in order), then random from `pool`."""
    chosen: list[str] = []
    for option in preferred:
        if option != key and option not in chosen:
            chosen.append(option)
        if len(chosen) == 3:
            return chosen
    rest = [o for o in pool if o != key and o not in chosen]
    if len(rest) < 3 - len(chosen):
        raise ValueError(f"pool has too few alternatives to {key!r}")
    for i in rng.permutation(len(rest))[: 3 - len(chosen)]:
        chosen.append(rest[int(i)])
    return chosen


def redraw_distinct(key: str, draw: Callable[[], str | None], attempts: int = 200) -> list[str] | None:
    """Three distinct draws that differ from the key, or None if `draw` cannot supply them
    (a draw of None is a rejected one)."""
    out: list[str] = []
    for _ in range(attempts):
        candidate = draw()
        if candidate is not None and candidate != key and candidate not in out:
            out.append(candidate)
            if len(out) == 3:
                return out
    return None


def evenly_spaced(indices: Sequence[int], count: int) -> list[int]:
    """Up to `count` entries of `indices`, evenly spread, first and last included."""
    indices = list(indices)
    if len(indices) <= count:
        return indices
    picks = np.linspace(0, len(indices) - 1, count).round().astype(int)
    return [indices[i] for i in picks]


def visible_frames(boxes: np.ndarray, object_id: int) -> list[int]:
    """Frames in which the object has a bounding box."""
    return [t for t in range(boxes.shape[1]) if not np.isnan(boxes[object_id, t, 0])]


def box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(str(int(round(float(v)))) for v in box) + "]"
