"""MLLM-4D questions with spatio-temporal chain-of-thought traces (SPEC 5).

The trace states the camera and object centres at the first and the last frame, then answers:

    <thinking>Spatial State (Initial Frame):
    - Camera Center: [x, y, z]
    - Object Center: [x, y, z]
    Spatial State (Final Frame):
    - Camera Center: [x, y, z]
    - Object Center: [x, y, z]
    <one sentence></thinking><answer>B</answer>

Coordinates are metres in the first frame's camera axes (OpenCV: x right, y down, z forward),
so the initial camera centre is [0, 0, 0]. The answer is the option letter, which is what the
ST-reward's exact-match accuracy compares against.
"""

from __future__ import annotations

import numpy as np

from fourd_jax.data.qa.common import QA, pick_distractors, place_key, visible_frames
from fourd_jax.data.qa.fourdthinker import classify_direction, object_series
from fourd_jax.data.sim.scene import Scene, world_to_camera
from fourd_jax.data.taxonomy import OBJECT_DIRECTIONS


def center_text(point: np.ndarray | None) -> str:
    """A centre as the trace writes it: "[x, y, z]" in metres to 2 decimals, or "null" when unknown.
    Values that round to zero are written "0.00", never "-0.00" (the initial camera centre is a
    rounding error away from the origin on either side)."""
    if point is None:
        return "null"
    return "[" + ", ".join(f"{round(float(v), 2) + 0.0:.2f}" for v in point) + "]"


def st_cot(scene: Scene, obj: int | None, sentence: str, answer: str) -> str:
    """The ST-CoT trace for an object (or None for no object) and a final answer."""
    last = scene.num_frames - 1
    cam = [world_to_camera(scene, 0, scene.camera_centers[t]) for t in (0, last)]
    objs = [None, None] if obj is None else [world_to_camera(scene, 0, scene.centers[obj, t]) for t in (0, last)]
    lines = []
    for label, c, o in (("Initial", cam[0], objs[0]), ("Final", cam[1], objs[1])):
        lines += [f"Spatial State ({label} Frame):", f"- Camera Center: {center_text(c)}",
                  f"- Object Center: {center_text(o)}"]
    return "<thinking>" + "\n".join(lines) + f"\n{sentence}</thinking><answer>{answer}</answer>"


def direction_question(scene: Scene, boxes: np.ndarray, obj: int, rng: np.random.Generator) -> QA | None:
    """In which direction an object moves, answered from its 3D centres."""
    if 0 not in visible_frames(boxes, obj):
        return None
    key = classify_direction(object_series(scene, obj)["displacement_cam"])
    if key is None:
        return None
    options, letter = place_key(key, pick_distractors(key, OBJECT_DIRECTIONS, rng), rng)
    name = scene.objects[obj].name
    sentence = f"Comparing the {name}'s centre at the first and last frame, it is {key.lower()}."
    return QA("mllm4d", "object_direction", f"In which direction is the {name} moving during the video?",
              options, letter, (obj,), tuple(range(scene.num_frames)), st_cot(scene, obj, sentence, letter),
              meta={"frame": "first camera (OpenCV axes)"})


def mllm4d_questions(scene: Scene, boxes: np.ndarray, rng: np.random.Generator) -> list[QA]:
    """One direction question about a moving object, when one is clear."""
    movers = [o.object_id for o in scene.objects if o.motion != "static"]
    for obj in rng.permutation(movers):
        qa = direction_question(scene, boxes, int(obj), rng)
        if qa is not None:
            return [qa]
    return []
