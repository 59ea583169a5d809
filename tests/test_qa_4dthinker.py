"""4DThinker and MLLM-4D questions: keys re-derived independently from stored geometry."""

import re
from collections import Counter

import numpy as np
import pytest

from fourd_jax.data.qa import fourdthinker as ft
from fourd_jax.data.qa.dsr import dsr_questions
from fourd_jax.data.qa.mllm4d import mllm4d_questions
from fourd_jax.data.sim.scene import SceneConfig, camera_path, project, sample_scene

SEEDS = range(150)
SPEED_OF_MOTION = {
    "constant": "Maintaining a Constant Speed", "turning": "Maintaining a Constant Speed",
    "flying": "Maintaining a Constant Speed", "accelerating": "Speeding Up", "decelerating": "Slowing Down",
    "accel_decel": "First Speeding Up, Then Slowing Down", "decel_accel": "First Slowing Down, Then Speeding Up",
    "varying": "Moving at Varying Speeds",
}


def projected_boxes(scene):
    """Small boxes around projected centres (NaN when behind the camera or off the image)."""
    n, t = scene.centers.shape[:2]
    boxes = np.full((n, t, 4), np.nan, np.float32)
    h, w = scene.image_size
    for f in range(t):
        uv, z = project(scene, f, scene.centers[:, f])
        for i in range(n):
            if z[i] > 0.2 and 0 <= uv[i, 0] < w and 0 <= uv[i, 1] < h:
                boxes[i, f] = [uv[i, 0] - 4, uv[i, 1] - 4, uv[i, 0] + 4, uv[i, 1] + 4]
    return boxes


@pytest.fixture(scope="module")
def scenes():
    return [(s, projected_boxes(s)) for s in (sample_scene(seed) for seed in SEEDS)]


def moves_from_poses(poses: np.ndarray) -> set[str]:
    """Camera moves recovered from the first and last pose only (not from the scene's labels)."""
    (r0, _, f0), (r1, _, f1) = (poses[0, :3, :3].T, poses[-1, :3, :3].T)
    found = set()
    yaw = np.degrees(np.arctan2(f1[1], f1[0]) - np.arctan2(f0[1], f0[0]))
    yaw = (yaw + 180) % 360 - 180
    pitch = np.degrees(np.arcsin(f1[2]) - np.arcsin(f0[2]))

    def roll(r, f):
        level_right = np.array([f[1], -f[0], 0.0]) / np.hypot(f[0], f[1])
        level_down = np.cross(f, level_right)
        return np.degrees(np.arctan2(r @ level_down, r @ level_right))

    turn = roll(r1, f1) - roll(r0, f0)
    delta = poses[-1, :3, 3] - poses[0, :3, 3]
    ahead = np.array([f0[0], f0[1], 0.0]) / np.hypot(f0[0], f0[1])
    side = np.array([ahead[1], -ahead[0], 0.0])
    for value, threshold, positive, negative in (
        (yaw, 5, "Pan Left", "Pan Right"), (pitch, 5, "Tilt Up", "Tilt Down"),
        (turn, 5, "Roll Clockwise", "Roll Counter-Clockwise"), (delta @ ahead, 0.3, "Dolly In", "Dolly Out"),
        (delta @ side, 0.3, "Truck Right", "Truck Left"), (delta[2], 0.3, "Pedestal Up", "Pedestal Down"),
    ):
        if abs(value) > threshold:
            found.add(positive if value > 0 else negative)
    return found


def test_camera_moves_follow_their_definitions():
    base = dict(position=np.zeros(3), yaw=0.4, pitch=-0.3, num_frames=3)
    for move in ft.CAMERA_MOVES:
        size = 20.0 if move.split()[0] in ("Pan", "Tilt", "Roll") else 1.0
        assert moves_from_poses(camera_path(((move, size),), **base)) == {move}


def test_camera_question_key_equals_the_motion_in_the_poses(scenes):
    asked = 0
    for scene, boxes in scenes:
        qa = ft.camera_question(scene, boxes, np.random.default_rng(0))
        if qa is None:
            continue
        asked += 1
        assert set(qa.key.replace(" and ", ", ").split(", ")) == moves_from_poses(scene.cam_to_world)
        assert len(set(qa.options)) == 4 and qa.options.count(qa.key) == 1
        assert all(ft._consistent(o) for o in qa.options)
        assert qa.trace.count("<output_image>") == len(qa.imagery) >= 2
        assert qa.trace.endswith(f"<answer>{qa.answer}. {qa.key}</answer>")
        anchor = qa.imagery[0][1]
        assert scene.objects[anchor].motion == "static"
        assert all(not np.isnan(boxes[anchor, t, 0]) for t, _ in qa.imagery)
    assert asked > 80


def independent_direction(scene, obj):
    pose = scene.cam_to_world[0]
    right, down, forward = pose[:3, 0], pose[:3, 1], pose[:3, 2]
    d = scene.centers[obj, -1] - scene.centers[obj, 0]
    x, up, z = d @ right, -(d @ down), d @ forward
    if np.linalg.norm(d) < 0.05:
        return "Stationary"
    if abs(z) > 1.2 * max(abs(x), abs(up)):
        return "Moving Away from Camera" if z > 0 else "Moving Toward Camera"
    words = []
    if min(abs(x), abs(up)) >= 0.6 * max(abs(x), abs(up)):
        words = ["Left" if x < 0 else "Right", "Up" if up > 0 else "Down"]
        return "Moving " + "-".join(words)
    return "Moving " + (("Left" if x < 0 else "Right") if abs(x) > abs(up) else ("Up" if up > 0 else "Down"))


def test_object_question_keys_match_the_trajectories(scenes):
    seen = Counter()
    for scene, boxes in scenes:
        for obj in range(len(scene.objects)):
            for form in ("direct", "bbox", "distance", "speed"):
                qa = ft.object_question(scene, boxes, obj, form, np.random.default_rng(obj))
                if qa is None:
                    continue
                seen[qa.subtask] += 1
                if qa.subtask == "object_direction":
                    assert qa.key == independent_direction(scene, obj)
                elif qa.subtask == "object_distance":
                    d = [np.linalg.norm(scene.centers[obj, t] - scene.cam_to_world[t, :3, 3])
                         for t in range(scene.num_frames)]
                    if qa.key == "Getting Closer to Camera":
                        assert d[-1] < d[0]
                    elif qa.key == "Getting Farther from Camera":
                        assert d[-1] > d[0]
                    elif qa.key == "Maintaining Roughly the Same Distance":
                        assert max(d) - min(d) <= 0.05 * np.mean(d)
                    else:
                        extreme = int(np.argmin(d) if "Closer, Then" in qa.key else np.argmax(d))
                        assert 0 < extreme < len(d) - 1
                else:  # the speed class must match how the simulator generated the motion
                    assert qa.key == SPEED_OF_MOTION[scene.objects[obj].motion]
                assert qa.options.count(qa.key) == 1 and len(set(qa.options)) == 4
                assert 4 <= len(qa.imagery) <= 8 and qa.trace.count("<output_image>") == len(qa.imagery)
                if form == "bbox":
                    assert re.search(r"the object at \[\d+, \d+, \d+, \d+\] in the first frame", qa.question)
    assert min(seen[s] for s in ("object_direction", "object_distance", "object_speed")) > 50


@pytest.mark.parametrize("motion", ["constant", "accelerating", "decelerating", "accel_decel", "decel_accel",
                                    "varying"])
def test_every_generated_speed_profile_is_classified(motion):
    from fourd_jax.data.sim.scene import speed_profile

    rng = np.random.default_rng(3)
    tau = np.linspace(0, 1, 16)
    label = ft.classify_speed(speed_profile(motion, 0.5, tau, rng)[1:])
    assert label == SPEED_OF_MOTION[motion]


def test_mllm4d_traces_state_the_true_centres(scenes):
    asked = 0
    for scene, boxes in scenes:
        for qa in mllm4d_questions(scene, boxes, np.random.default_rng(1)):
            asked += 1
            numbers = [np.array(m.split(", "), float) for m in re.findall(r"\[([-0-9., ]+)\]", qa.trace)]
            cam0, obj0, cam1, obj1 = numbers
            def to_cam0(p, pose=scene.cam_to_world[0]):
                return (p - pose[:3, 3]) @ pose[:3, :3]

            obj = qa.target_objects[0]
            np.testing.assert_allclose(cam0, 0.0, atol=0.006)
            np.testing.assert_allclose(cam1, to_cam0(scene.cam_to_world[-1, :3, 3]), atol=0.006)
            np.testing.assert_allclose(obj0, to_cam0(scene.centers[obj, 0]), atol=0.006)
            np.testing.assert_allclose(obj1, to_cam0(scene.centers[obj, -1]), atol=0.006)
            assert qa.trace.startswith("<thinking>Spatial State (Initial Frame):")
            assert qa.trace.endswith(f"</thinking><answer>{qa.answer}</answer>")
            assert qa.key == independent_direction(scene, obj)
    assert asked > 50


def test_key_letters_are_balanced_over_all_families(scenes):
    letters = Counter()
    for k, (scene, boxes) in enumerate(scenes):
        rng = np.random.default_rng(k)
        for qa in (dsr_questions(scene, boxes, rng) + ft.fourdthinker_questions(scene, boxes, rng)
                   + mllm4d_questions(scene, boxes, rng)):
            letters[qa.answer] += 1
    total = sum(letters.values())
    assert total >= 2000
    for letter in "ABCD":
        assert abs(letters[letter] / total - 0.25) <= 0.05, letters


def test_questions_are_deterministic():
    scene = sample_scene(7, SceneConfig(num_frames=12))
    boxes = projected_boxes(scene)
    a = ft.fourdthinker_questions(scene, boxes, np.random.default_rng(5))
    b = ft.fourdthinker_questions(scene, boxes, np.random.default_rng(5))
    assert [(q.question, q.options, q.answer, q.trace) for q in a] == [(q.question, q.options, q.answer, q.trace)
                                                                       for q in b]
