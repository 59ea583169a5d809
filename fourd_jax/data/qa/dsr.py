"""DSR Suite questions (SPEC 4) computed exactly from a simulated scene.

The scene's T frames are the "sampled frames". Every sub-task except `*_dir_pred` shows all T
frames and asks about an interval of at least 4 consecutive frames, using every frame in it;
`*_dir_pred` shows frames 0..T-3 and asks where an entity moves from frame T-3 to frame T-1.

Agents are the camera or an object with a front; their axes are x forward, y left, z up. For
the camera these are the optical axis, -camera x and -camera y (OpenCV); for an object, its
heading laid flat on the ground, z cross x, and world up. The camera may also fill an object
slot, at its own centre, with the optical axis as its facing direction. Absolute sub-tasks
express everything in the agent's pose at one frame t (any shown frame, possibly outside the
interval); relative ones re-evaluate the agent's pose at every frame.

Measures (keys come from the describers of `dsr_describe`, thresholds of SPEC 4):
- dis: |p1 - p2| per frame (the agent plays no part; abs and rel differ only in wording).
- dir: p1 - p2 per frame in the agent frame.
- ori: the slot entity's forward axis per frame in the agent frame.
- spd: per-step displacement length, in metres per frame step. Absolute: world displacement (a
  fixed pose does not change lengths). Relative: displacement of the entity's coordinates in
  the moving agent frame, i.e. its speed as the moving agent sees it.
- spd_comp: two such series compared step by step (first slot "the former").
- dir_pred: p(T-1) - p(T-3), one vector; absolute in the pose at t (t in 0..T-3, so the pose is
  shown), relative as the change of the entity's coordinates in the agent frame.

Choices where SPEC 4 is silent:
- non_temp is the direction of p1 - p2 at one shown frame t in the agent's pose at t (one
  segment), with the objects named by their boxes at t.
- The agent never fills a slot, except the reference (second) slot of dir and non_temp, so
  "where is A relative to the camera, from the camera's perspective" can be asked.
- Named objects (slots and an object agent) must be visible at the interval's first frame
  (frame T-3 for dir_pred, frame t for non_temp); the camera is always available.
- A vector shorter than ZERO_LENGTH has no direction (the describers of `dsr_describe`, which
  also hold SPEC 4's segmentation rules, reject it); the question generator drops the candidate
  (SPEC: "a zero vector drops the question").
- Distractors are cut on their segment lists and then rendered, so a cut comparison reads
  "(1) The former is always faster." like a key of one segment would.
- A sub-task is skipped when no candidate (interval, agent, slots) gives a valid key with at
  most 15 segments and three distinct distractors.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from fourd_jax.data.qa.common import QA, box_text, place_key, redraw_distinct
from fourd_jax.data.qa.dsr_describe import DESCRIBERS, ZERO_LENGTH
from fourd_jax.data.sim.scene import Scene
from fourd_jax.data.taxonomy import DSR_SUBTASKS
from fourd_jax.errors import InputError

MAX_SEGMENTS = 15
MIN_INTERVAL_FRAMES = 4
MIN_SCENE_FRAMES = 8
CAMERA = -1  # entity code of the camera; objects are their index in scene.objects
_INTERVAL_DRAWS = 3

# ----------------------------------------------------------------------------- geometry

# subtask -> (measure, mode); mode "abs" uses one pose, "rel" a pose per frame.
_TEMPORAL_MEASURES = ("dis", "dir", "ori", "spd", "spd_comp", "dir_pred")
_SUBTASKS = {
    **{f"{mode}_{m}": (m, mode) for mode in ("abs", "rel") for m in _TEMPORAL_MEASURES},
    "non_temp": ("non_temp", "abs"),
}
_SLOT_COUNT = {"dis": 2, "dir": 2, "ori": 1, "spd": 1, "spd_comp": 2, "dir_pred": 1, "non_temp": 2}
_KIND = {"dis": "magnitude", "spd": "magnitude", "dir": "direction", "ori": "direction", "dir_pred": "direction",
         "non_temp": "direction", "spd_comp": "comparison"}
_HOW = {
    "dis": "|p(slot 0) - p(slot 1)| in world metres at each interval frame",
    "dir": "p(slot 0) - p(slot 1) in the agent axes (x forward, y left, z up) at each interval frame",
    "ori": "forward axis of slot 0 in the agent axes at each interval frame",
    "spd": "length of the per-step displacement of slot 0 (metres per frame step); relative: of its "
           "coordinates in the agent frame of each frame",
    "spd_comp": "per-step displacement lengths of slot 0 (former) and slot 1 (latter), compared step by step",
    "dir_pred": "p(T-1) - p(T-3) of slot 0 in the agent axes at agent_frame; relative: change of its "
                "coordinates between the agent frames of T-3 and T-1",
    "non_temp": "p(slot 0) - p(slot 1) at agent_frame in the agent axes at agent_frame",
}


def entity_positions(scene: Scene, entity: int) -> np.ndarray:
    """World positions [T, 3] of an entity (CAMERA or an object index)."""
    return scene.camera_centers if entity == CAMERA else scene.centers[entity]


def entity_axes(scene: Scene, entity: int) -> np.ndarray:
    """Agent axes [T, 3, 3] of an entity: columns are forward, left and up in world coordinates."""
    if entity == CAMERA:
        rot = scene.cam_to_world[:, :3, :3]  # columns: camera x right, y down, z forward
        return np.stack([rot[:, :, 2], -rot[:, :, 0], -rot[:, :, 1]], axis=2)
    flat = scene.headings[entity] * np.array([1.0, 1.0, 0.0])
    length = np.linalg.norm(flat, axis=1, keepdims=True)
    if np.any(length < ZERO_LENGTH):
        raise InputError(f"object {entity} ({scene.objects[entity].name}) heads straight up or down; "
                         "its agent axes are undefined.")
    forward = flat / length
    up = np.broadcast_to(np.array([0.0, 0.0, 1.0]), forward.shape)
    return np.stack([forward, np.cross(up, forward), up], axis=2)


def _in_pose(vectors: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """World vectors [K, 3] in the coordinates of one pose [3, 3] or one pose per row [K, 3, 3]."""
    return vectors @ axes if axes.ndim == 2 else np.einsum("ki,kij->kj", vectors, axes)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a question is about: the frames it uses, the agent (and its frame if absolute), the slots."""

    frames: tuple[int, ...]
    agent: int
    agent_frame: int | None
    slots: tuple[int, ...]


def _local_positions(scene: Scene, entity: int, setup: _Setup, frames: Sequence[int]) -> np.ndarray:
    """Positions [K, 3] of an entity at `frames` in agent coordinates (origin at the agent)."""
    frames = list(frames)
    origin = entity_positions(scene, setup.agent)
    axes = entity_axes(scene, setup.agent)
    if setup.agent_frame is None:
        return _in_pose(entity_positions(scene, entity)[frames] - origin[frames], axes[frames])
    t = setup.agent_frame
    return _in_pose(entity_positions(scene, entity)[frames] - origin[t], axes[t])


def _key_data(scene: Scene, measure: str, setup: _Setup) -> Any:
    """The series a key is described from: magnitudes [K], vectors [K, 3] or two magnitude series."""
    frames = list(setup.frames)
    axes = entity_axes(scene, setup.agent)
    pose = axes[frames] if setup.agent_frame is None else axes[setup.agent_frame]
    if measure == "dis":
        a, b = (entity_positions(scene, e)[frames] for e in setup.slots)
        return np.linalg.norm(a - b, axis=1)
    if measure in ("dir", "non_temp"):
        a, b = (entity_positions(scene, e)[frames] for e in setup.slots)
        return _in_pose(a - b, pose)
    if measure == "ori":
        return _in_pose(entity_axes(scene, setup.slots[0])[frames, :, 0], pose)
    if measure == "dir_pred":
        local = _local_positions(scene, setup.slots[0], setup, frames)
        return (local[-1] - local[0])[None]
    speeds = [np.linalg.norm(np.diff(_local_positions(scene, e, setup, frames), axis=0), axis=1)
              for e in setup.slots]
    return speeds[0] if measure == "spd" else tuple(speeds)


def _has_zero_vector(kind: str, data: Any) -> bool:
    return kind == "direction" and bool(np.any(np.linalg.norm(data, axis=1) < ZERO_LENGTH))


def _json_ready(kind: str, data: Any) -> Any:
    if kind == "comparison":
        return [np.asarray(s).tolist() for s in data]
    return np.asarray(data).tolist()

# ----------------------------------------------------------------------------- questions


def _entity_ref(scene: Scene, entity: int) -> str | int:
    return "camera" if entity == CAMERA else scene.objects[entity].object_id


def _entity_text(scene: Scene, boxes: np.ndarray, entity: int, frame: int) -> str:
    if entity == CAMERA:
        return "the camera"
    return f"the {scene.objects[entity].name} with initial bounding box coordinates {box_text(boxes[entity, frame])}"


def _candidates(scene: Scene, boxes: np.ndarray, measure: str, first_frame: int) -> list[tuple[int, tuple[int, ...]]]:
    """Every (agent, slots) allowed for a measure with objects visible at `first_frame`."""
    visible = [n for n in range(len(scene.objects)) if np.all(np.isfinite(boxes[n, first_frame]))]
    entities = [CAMERA, *visible]
    agents = [CAMERA, *(n for n in visible if scene.objects[n].has_front)]
    agent_may_be_reference = measure in ("dir", "non_temp")
    out = []
    for agent in agents:
        for slots in itertools.permutations(entities, _SLOT_COUNT[measure]):
            if measure == "ori" and slots[0] != CAMERA and not scene.objects[slots[0]].has_front:
                continue
            if agent in slots[:-1] or (agent == slots[-1] and not agent_may_be_reference):
                continue
            out.append((agent, slots))
    return out


def _draw_frames(scene: Scene, measure: str, mode: str, rng: np.random.Generator) -> tuple[tuple[int, ...], int | None]:
    """(interval frames, absolute agent frame or None) for one attempt at a question."""
    t_count = scene.num_frames
    if measure == "dir_pred":
        frames = (t_count - 3, t_count - 1)
        return frames, int(rng.integers(t_count - 2)) if mode == "abs" else None
    if measure == "non_temp":
        t = int(rng.integers(t_count))
        return (t,), t
    spans = [(s, e) for s in range(t_count) for e in range(s + MIN_INTERVAL_FRAMES - 1, t_count)]
    start, end = spans[int(rng.integers(len(spans)))]
    return tuple(range(start, end + 1)), int(rng.integers(t_count)) if mode == "abs" else None


def _question_text(scene: Scene, boxes: np.ndarray, subtask: str, setup: _Setup) -> str:
    measure, mode = _SUBTASKS[subtask]
    times = scene.timestamps
    first = setup.frames[0]
    agent = _entity_text(scene, boxes, setup.agent, first)
    a, *rest = (_entity_text(scene, boxes, e, first) for e in setup.slots)
    b = rest[0] if rest else ""
    if measure == "non_temp":
        return f"At {times[first]:.1f}s, from the perspective of {agent}, in which direction is {a} relative to {b}?"
    view = (f"from the perspective of {agent} at {times[setup.agent_frame]:.1f}s" if mode == "abs"
            else f"following the perspective of {agent}")
    t0, t1 = times[setup.frames[0]], times[setup.frames[-1]]
    if measure == "dir_pred":
        verb = "move" if mode == "abs" else "appear to move"
        return (f"The video ends at {t0:.1f}s. {view[0].upper()}{view[1:]}, in which direction will {a} {verb} "
                f"between {t0:.1f}s and {t1:.1f}s?")
    asked = {
        "dis": f"how does the distance between {a} and {b} change?",
        "dir": f"how does the direction of {a} relative to {b} change?",
        "ori": f"how does the facing direction of {a} change?",
        "spd": f"how does the speed of {a} change?",
        "spd_comp": f"how does the speed of {a} (the former) compare with the speed of {b} (the latter)?",
    }[measure]
    return f"Between {t0:.1f}s and {t1:.1f}s, {view}, {asked}"


def _distractors(rng: np.random.Generator, kind: str, data: Any, key_segments: list[str]) -> list[str] | None:
    """Three distinct wrong options: random data like `data` through the same describer, cut to a
    segment count within +-3 of the key's (and at most MAX_SEGMENTS, like any key); a draw with
    too few segments is drawn again."""
    describer = DESCRIBERS[kind]
    count = len(key_segments)
    low, high = max(1, count - 3), min(count + 3, MAX_SEGMENTS)

    def draw() -> str | None:
        segments = describer.segments(describer.random_like(rng, data))
        if len(segments) < low:
            return None
        return describer.render(segments[:int(rng.integers(low, high + 1))])

    return redraw_distinct(describer.render(key_segments), draw)


def _question_for(
    scene: Scene, boxes: np.ndarray, subtask: str, setup: _Setup, rng: np.random.Generator
) -> QA | None:
    """The question for one setup, or None when its key is invalid or distractors run out."""
    measure, mode = _SUBTASKS[subtask]
    kind = _KIND[measure]
    data = _key_data(scene, measure, setup)
    if _has_zero_vector(kind, data):
        return None
    segments = DESCRIBERS[kind].segments(data)
    if len(segments) > MAX_SEGMENTS:
        return None
    distractors = _distractors(rng, kind, data, segments)
    if distractors is None:
        return None
    key = DESCRIBERS[kind].render(segments)
    options, answer = place_key(key, distractors, rng)
    t_count = scene.num_frames
    meta = {
        "interval": [setup.frames[0], setup.frames[-1]],
        "frames": list(setup.frames),
        "agent": _entity_ref(scene, setup.agent),
        "agent_mode": "absolute" if setup.agent_frame is not None else "relative",
        "agent_frame": setup.agent_frame,
        "slots": [_entity_ref(scene, e) for e in setup.slots],
        "measure": measure,
        "values": _json_ready(kind, data),
        "key": key,
        "how": _HOW[measure],
    }
    return QA(
        family="dsr", subtask=subtask, question=_question_text(scene, boxes, subtask, setup),
        options=options, answer=answer,
        target_objects=tuple(scene.objects[e].object_id for e in setup.slots if e != CAMERA),
        shown_frames=tuple(range(t_count - 2 if measure == "dir_pred" else t_count)), meta=meta,
    )


def _one_question(scene: Scene, boxes: np.ndarray, subtask: str, rng: np.random.Generator) -> QA | None:
    measure, mode = _SUBTASKS[subtask]
    for _ in range(_INTERVAL_DRAWS):
        frames, agent_frame = _draw_frames(scene, measure, mode, rng)
        candidates = _candidates(scene, boxes, measure, frames[0])
        for index in rng.permutation(len(candidates)):
            agent, slots = candidates[int(index)]
            qa = _question_for(scene, boxes, subtask, _Setup(frames, agent, agent_frame, slots), rng)
            if qa is not None:
                return qa
    return None


def dsr_questions(
    scene: Scene, boxes: np.ndarray, rng: np.random.Generator, subtasks: Sequence[str] = DSR_SUBTASKS
) -> list[QA]:
    """At most one DSR question per requested sub-task about `scene`, in the order requested.

    `boxes` is float [N, T, 4] pixel boxes (x1, y1, x2, y2) per object and frame, NaN where the
    object is not visible. A sub-task is skipped when no valid question exists. Deterministic
    given `rng`.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    expected = (len(scene.objects), scene.num_frames, 4)
    if boxes.shape != expected:
        raise InputError(f"boxes must have shape {list(expected)} (objects, frames, 4), got {list(boxes.shape)}.")
    if scene.num_frames < MIN_SCENE_FRAMES:
        raise InputError(f"DSR questions need at least {MIN_SCENE_FRAMES} frames, the scene has {scene.num_frames}.")
    unknown = [s for s in subtasks if s not in _SUBTASKS]
    if unknown:
        raise InputError(f"unknown DSR sub-task {unknown[0]!r}; expected one of {', '.join(DSR_SUBTASKS)}.")
    questions = []
    for subtask in subtasks:
        qa = _one_question(scene, boxes, subtask, rng)
        if qa is not None:
            questions.append(qa)
    return questions
