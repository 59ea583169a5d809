"""4DThinker questions (SPEC 3.6) from exact geometry, with imagery-grounded reasoning traces.

Sub-tasks and their classes:
- camera_motion (12 moves, combined as "X, Y and Z"): the scene's camera moves.
- object_direction (11): the object's displacement from the first to the last frame in the
  first frame's camera axes (right, up = -y, toward the camera = -z); its trace gives the
  object's positions in those same axes, after stating the camera's own motion. Depth wins when its
  magnitude is the largest; otherwise left/right and up/down, diagonal when the smaller planar
  component is at least half the larger.
- object_speed (6): the per-step speed series (see `classify_speed`).
- object_distance (5): the object-camera distance series (see `classify_distance`).
A question is only asked when its answer is clear: classifiers return None inside a margin
around their thresholds, and the question is skipped.

Object questions come in four forms drawn with SPEC's weights (two per scene): direct (the
object by name), bbox (the object by its first-frame bounding box), distance, speed. Traces
follow `<think> ... <output_image> ... </think><answer>X. text</answer>`; each `<output_image>`
is a frame with the object's mask overlaid (QA.imagery says which).
"""

from __future__ import annotations

import numpy as np

from fourd_jax.data.qa.common import QA, box_text, evenly_spaced, pick_distractors, place_key, visible_frames
from fourd_jax.data.sim.scene import Scene, world_to_camera
from fourd_jax.data.taxonomy import (
    CAMERA_MOVES,
    LETTERS,
    MOVE_EFFECT,
    OBJECT_DIRECTIONS,
    OBJECT_DISTANCES,
    OBJECT_SPEEDS,
    OPPOSITE_MOVE,
)
from fourd_jax.errors import InputError

FORMS = {"direct": 0.32, "bbox": 0.45, "distance": 0.20, "speed": 0.03}
OBJECT_QUESTIONS = 2  # per video (SPEC 3.6: two forms drawn)
FORM_DRAWS = 6
STATIONARY_METRES = 0.05


def join_moves(moves: list[str]) -> str:
    """"X", "X and Y", "X, Y and Z" in the canonical move order."""
    moves = sorted(moves, key=CAMERA_MOVES.index)
    return moves[0] if len(moves) == 1 else ", ".join(moves[:-1]) + " and " + moves[-1]


def split_moves(combo: str) -> list[str]:
    """The moves of a "X, Y and Z" string (the inverse of `join_moves`)."""
    return combo.replace(" and ", ", ").split(", ")


# ----------------------------------------------------------------------------- classifiers


def classify_direction(displacement_cam: np.ndarray) -> str | None:
    """Direction class of a displacement in camera axes (x right, y down, z forward)."""
    right, up, away = float(displacement_cam[0]), -float(displacement_cam[1]), float(displacement_cam[2])
    if np.linalg.norm(displacement_cam) < STATIONARY_METRES:
        return "Stationary"
    if np.linalg.norm(displacement_cam) < 0.3:
        return None  # barely moving: neither clearly stationary nor clearly moving
    planar = max(abs(right), abs(up))
    if abs(away) > 1.2 * planar:
        return "Moving Away from Camera" if away > 0 else "Moving Toward Camera"
    if abs(away) > planar / 1.2:
        return None  # depth and planar motion too close to call
    small, large = sorted((abs(right), abs(up)))
    horizontal = "Left" if right < 0 else "Right"
    vertical = "Up" if up > 0 else "Down"
    if small >= 0.6 * large:
        return f"Moving {horizontal}-{vertical}"
    if small > 0.4 * large:
        return None
    return f"Moving {horizontal}" if abs(right) > abs(up) else f"Moving {vertical}"


def classify_speed(speeds: np.ndarray) -> str | None:
    """Speed class of a per-step speed series (m/s); None when the shape is not clear.

    Relative to the mean speed m: constant when the range is <= 0.15 m; speeding up / slowing
    down when monotone (steps within 0.03 m against the trend) with a total change >= 0.5 m;
    first up then down (or the reverse) when the extreme is interior with both sides monotone
    and each side changing >= 0.4 m; varying when the series turns at least twice with swings
    >= 0.4 m.
    """
    v = np.asarray(speeds, float)
    mean = float(v.mean())
    if mean < STATIONARY_METRES:
        return None
    span = float(v.max() - v.min())
    steps = np.diff(v)
    tol = 0.03 * mean
    if span <= 0.15 * mean:
        return "Maintaining a Constant Speed"
    if span < 0.4 * mean:
        return None
    if np.all(steps >= -tol) and v[-1] - v[0] >= 0.5 * mean:
        return "Speeding Up"
    if np.all(steps <= tol) and v[0] - v[-1] >= 0.5 * mean:
        return "Slowing Down"
    for label, extreme, sign in (("First Speeding Up, Then Slowing Down", int(np.argmax(v)), 1.0),
                                 ("First Slowing Down, Then Speeding Up", int(np.argmin(v)), -1.0)):
        if 0 < extreme < len(v) - 1:
            before, after = sign * steps[:extreme], sign * steps[extreme:]
            if (np.all(before >= -tol) and np.all(after <= tol)
                    and sign * (v[extreme] - v[0]) >= 0.4 * mean and sign * (v[extreme] - v[-1]) >= 0.4 * mean):
                return label
    if _turns(v, 0.4 * mean) >= 2:
        return "Moving at Varying Speeds"
    return None


def _turns(v: np.ndarray, swing: float) -> int:
    """How often a series reverses direction after moving at least `swing` each way (zig-zag)."""
    turns, direction, peak, trough = 0, 0, v[0], v[0]
    for x in v[1:]:
        if direction == 0:
            peak, trough = max(peak, x), min(trough, x)
            if x - trough >= swing:
                direction, peak = 1, x
            elif peak - x >= swing:
                direction, trough = -1, x
        elif direction == 1:
            if x > peak:
                peak = x
            elif peak - x >= swing:
                turns, direction, trough = turns + 1, -1, x
        else:
            if x < trough:
                trough = x
            elif x - trough >= swing:
                turns, direction, peak = turns + 1, 1, x
    return turns


def classify_distance(distances: np.ndarray) -> str | None:
    """Distance-to-camera class of a series (m); None when not clear.

    Relative to the mean distance m: same when the range is <= 4% of m; closer / farther when
    the end differs from the start by >= 8% of m and the series never goes back by more than 1%;
    closer-then-farther (or the reverse) when the extreme is interior and both ends are >= 6%
    of m away from it.
    """
    d = np.asarray(distances, float)
    mean = float(d.mean())
    span = float(d.max() - d.min())
    if span <= 0.04 * mean:
        return "Maintaining Roughly the Same Distance"
    if span < 0.06 * mean:
        return None
    tol = 0.01 * mean
    if d[0] - d[-1] >= 0.08 * mean and d.max() <= d[0] + tol and d.min() >= d[-1] - tol:
        return "Getting Closer to Camera"
    if d[-1] - d[0] >= 0.08 * mean and d.min() >= d[0] - tol and d.max() <= d[-1] + tol:
        return "Getting Farther from Camera"
    low, high = int(np.argmin(d)), int(np.argmax(d))
    if 0 < low < len(d) - 1 and min(d[0], d[-1]) - d[low] >= 0.06 * mean:
        return "First Getting Closer, Then Farther"
    if 0 < high < len(d) - 1 and d[high] - max(d[0], d[-1]) >= 0.06 * mean:
        return "First Getting Farther, Then Closer"
    return None


def object_series(scene: Scene, obj: int) -> dict[str, np.ndarray]:
    """The measurements the object questions use, from the stored trajectories."""
    centers = scene.centers[obj]
    cameras = scene.camera_centers
    return {
        "displacement_cam": world_to_camera(scene, 0, centers[-1]) - world_to_camera(scene, 0, centers[0]),
        "speeds": np.linalg.norm(np.diff(centers, axis=0), axis=1) * scene.fps,
        "distances": np.linalg.norm(centers - cameras, axis=1),
    }


# ----------------------------------------------------------------------------- questions


def camera_question(scene: Scene, boxes: np.ndarray, rng: np.random.Generator,
                    camera_moves: tuple[str, ...] = CAMERA_MOVES, fixed_options: bool = False) -> QA | None:
    """Which way the camera moves; the trace watches a static object (start, middle, end).

    Distractors come from `camera_moves` (the moves the scenes were drawn from). With
    `fixed_options`, the options are the four single moves of `camera_moves` in that order, so each
    move keeps its letter: a model then needs to read the video, not to find which option line holds
    the move it saw (the in-context lookup a pretrained VLM brings and a small model trained from
    scratch lacks; docs/LEARNING.md). Its keys are uniform over A-D when the moves are.
    """
    if not scene.camera_moves:
        return None
    moves = [m for m, _ in scene.camera_moves]
    key = join_moves(moves)
    static = [o.object_id for o in scene.objects if o.motion == "static"]
    anchors = [(len(visible_frames(boxes, i)), i) for i in static]
    anchors = [(n, i) for n, i in anchors if n >= 2]
    if not anchors:
        return None
    _, anchor = max(anchors)
    # Imagery: the first and the last frame the anchor is seen in (SPEC: start, up to two middle, end).
    frames = evenly_spaced(visible_frames(boxes, anchor), 2)
    if fixed_options:
        if len(camera_moves) != 4 or len(moves) != 1 or key not in camera_moves:
            raise InputError(f"fixed camera options need four single moves and one-move scenes, not the moves "
                             f"{list(camera_moves)} and the key {key!r}.")
        options, letter = tuple(camera_moves), LETTERS[camera_moves.index(key)]
    else:
        opposite = join_moves([OPPOSITE_MOVE[m] for m in moves])
        partial = [join_moves([OPPOSITE_MOVE[m] if i == j else m for j, m in enumerate(moves)])
                   for i in range(len(moves))] if len(moves) > 1 else []
        pool = sorted({join_moves(list(rng.choice(camera_moves, size=len(moves), replace=False)))
                       for _ in range(30)} | set(camera_moves))
        pool = [p for p in pool if _consistent(p)]
        options, letter = place_key(key, pick_distractors(key, pool, rng, [opposite, *partial]), rng)
    name = scene.objects[anchor].name
    seen = []
    for t in frames:
        box = boxes[anchor, t]
        where = _image_region((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, scene.image_size)
        seen.append(f"at {scene.timestamps[t]:.1f}s it is {where} <output_image>")
    # The motion is stated first, as in the object traces, then the imagery of the static anchor shows
    # it, and the conclusion repeats it a few tokens later. A short trace leaves a small model's budget
    # to reading the video: with three frames of longer text between them, the demo's model restated
    # its own first sentence in only half of its answers (docs/LEARNING.md).
    trace = (f"<think>The camera moves: {key}. The {name} does not move: " + ", and ".join(seen)
             + f". So the answer is: {key}.</think><answer>{letter}. {key}</answer>")
    return QA("4dthinker", "camera_motion", "How does the camera move during the video?", options, letter,
              (anchor,), tuple(range(scene.num_frames)), trace, tuple((t, anchor) for t in frames),
              {"moves": [list(m) for m in scene.camera_moves], "anchor": anchor})


def _consistent(combo: str) -> bool:
    """A move combination never contains a move together with its opposite or twice one parameter."""
    moves = split_moves(combo)
    params = [MOVE_EFFECT[m][0] for m in moves]
    return len(set(params)) == len(params)


def object_question(scene: Scene, boxes: np.ndarray, obj: int, form: str, rng: np.random.Generator) -> QA | None:
    """A direction (direct or bbox form), distance or speed question about one object."""
    series = object_series(scene, obj)
    seen = visible_frames(boxes, obj)
    if 0 not in seen or len(seen) < 4:
        return None
    name = scene.objects[obj].name
    if form in ("direct", "bbox"):
        key, classes, subtask = classify_direction(series["displacement_cam"]), OBJECT_DIRECTIONS, "object_direction"
        subject = (f"the {name}" if form == "direct"
                   else f"the object at {box_text(boxes[obj, 0])} in the first frame")
        question = f"In which direction is {subject} moving during the video?"
    elif form == "distance":
        key, classes, subtask = classify_distance(series["distances"]), OBJECT_DISTANCES, "object_distance"
        question = f"How does the distance between the {name} and the camera change during the video?"
    else:
        key, classes, subtask = classify_speed(series["speeds"]), OBJECT_SPEEDS, "object_speed"
        question = f"How does the speed of the {name} change during the video?"
    if key is None or (subtask != "object_direction" and scene.objects[obj].motion == "static"):
        return None
    options, letter = place_key(key, pick_distractors(key, classes, rng), rng)
    frames = evenly_spaced(seen, int(rng.integers(4, 9)))
    trace = _object_trace(scene, boxes, obj, frames, subtask, key, series) + f"<answer>{letter}. {key}</answer>"
    return QA("4dthinker", subtask, question, options, letter, (obj,), tuple(range(scene.num_frames)), trace,
              tuple((t, obj) for t in frames), {"form": form, "motion": scene.objects[obj].motion})


def _object_trace(scene, boxes, obj, frames, subtask, key, series) -> str:
    """The object trace, reasoning in the frame its key is defined in.

    It states the camera's own motion first, then one step per imagery frame: for direction, the
    object's position in the first frame's camera axes (the key's frame: a moving camera changes
    where an object appears, not where it is in those axes); for distance, its distance to the
    camera at that moment (the key's series); for speed, its speed (frame-free).
    """
    name = scene.objects[obj].name
    cameras = scene.camera_centers
    moves = [m for m, _ in scene.camera_moves]
    camera = f"The camera moves: {join_moves(moves)}." if moves else "The camera does not move."
    if subtask == "object_direction":
        camera += " I place the " + name + " in the axes of the first frame's view."
    steps = []
    for k, t in enumerate(frames):
        lead = "First" if k == 0 else "Then"
        if subtask == "object_direction":
            right, down, ahead = world_to_camera(scene, 0, scene.centers[obj, t])
            where = (f"{abs(right):.1f} m {'right' if right >= 0 else 'left'}, {abs(down):.1f} m "
                     f"{'below' if down >= 0 else 'above'} and {ahead:.1f} m ahead")
        elif subtask == "object_speed" and t > 0:
            where = f"moving at about {series['speeds'][t - 1]:.1f} m/s"
        else:
            distance = float(np.linalg.norm(scene.centers[obj, t] - cameras[t]))
            where = f"about {distance:.1f} m from the camera"
        steps.append(f"{lead}, at {scene.timestamps[t]:.1f}s, the {name} is {where}. <output_image>")
    return (f"<think>{camera} I follow the {name} through the video. " + " ".join(steps)
            + f" So the answer is: {key}.</think>")


def _image_region(x: float, y: float, size: tuple[int, int]) -> str:
    h, w = size
    col = "left" if x < w / 3 else "right" if x > 2 * w / 3 else "centre"
    row = "top" if y < h / 3 else "bottom" if y > 2 * h / 3 else "middle"
    return "in the centre of the view" if (row, col) == ("middle", "centre") else f"at the {row} {col} of the view"


def fourdthinker_questions(scene: Scene, boxes: np.ndarray, rng: np.random.Generator,
                           camera_moves: tuple[str, ...] = CAMERA_MOVES,
                           fixed_camera_options: bool = False) -> list[QA]:
    """The camera question (options as `camera_question` takes them) and OBJECT_QUESTIONS object questions.

    Each object question's form is drawn on its own with SPEC's weights (FORMS), so the forms'
    shares follow the weights; a form that no object of the scene can answer is drawn again (up
    to FORM_DRAWS draws in all), and no object is asked about twice in the same form.
    """
    out = []
    camera = camera_question(scene, boxes, rng, camera_moves, fixed_camera_options)
    if camera is not None:
        out.append(camera)
    forms = list(FORMS)
    weights = np.array([FORMS[f] for f in forms])
    movers = [o.object_id for o in scene.objects if o.motion != "static"]
    candidates = movers if movers else [o.object_id for o in scene.objects]
    asked: set[tuple[str, int]] = set()
    for _ in range(FORM_DRAWS):
        if len(asked) == OBJECT_QUESTIONS:
            break
        form = str(rng.choice(forms, p=weights / weights.sum()))
        for obj in rng.permutation(candidates):
            qa = object_question(scene, boxes, int(obj), form, rng)
            if qa is not None and (form, int(obj)) not in asked:
                asked.add((form, int(obj)))
                out.append(qa)
                break
    return out
