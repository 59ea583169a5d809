"""4DThinker and MLLM-4D questions: keys re-derived independently from stored geometry."""

import re
from collections import Counter

import numpy as np
import pytest
from independent_keys import SPEED_OF_MOTION, distance_key_holds, independent_direction, moves_from_poses

from fourd_jax.data.qa import fourdthinker as ft
from fourd_jax.data.qa.dsr import dsr_questions
from fourd_jax.data.qa.mllm4d import mllm4d_questions
from fourd_jax.data.sim.scene import SceneConfig, camera_path, project, sample_scene, speed_profile
from fourd_jax.data.synth import SynthConfig
from fourd_jax.data.taxonomy import CAMERA_MOVES, OPPOSITE_MOVE
from fourd_jax.errors import InputError

SEEDS = range(150)
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


def test_camera_moves_follow_their_definitions():
    base = dict(position=np.zeros(3), yaw=0.4, pitch=-0.3, num_frames=3)
    for move in CAMERA_MOVES:
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
        # Distractors: every move flipped first, then each single flip, then random combinations.
        moves = qa.key.replace(" and ", ", ").split(", ")
        flipped = [ft.join_moves([OPPOSITE_MOVE[m] for m in moves])]
        if len(moves) > 1:
            flipped += [ft.join_moves([OPPOSITE_MOVE[m] if i == j else m for j, m in enumerate(moves)])
                        for i in range(len(moves))]
        distractors = [o for o in qa.options if o != qa.key]
        assert distractors[:min(3, len(flipped))] == flipped[:3]
    assert asked > 80


def test_object_question_forms_follow_their_weights(scenes):
    forms = Counter()
    for k, (scene, boxes) in enumerate(scenes):
        questions = ft.fourdthinker_questions(scene, boxes, np.random.default_rng(k))
        object_questions = [q for q in questions if q.subtask != "camera_motion"]
        assert len(object_questions) <= ft.OBJECT_QUESTIONS
        assert len({(q.meta["form"], q.target_objects) for q in object_questions}) == len(object_questions)
        forms.update(q.meta["form"] for q in object_questions)
    total = sum(forms.values())
    assert total > 1.8 * len(scenes)  # almost every scene gets both object questions
    for form, weight in ft.FORMS.items():
        assert abs(forms[form] / total - weight) < 0.06, (form, forms)


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
                    assert distance_key_holds(scene, obj, qa.key)
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


PAN_TILT = ("Pan Left", "Pan Right", "Tilt Up", "Tilt Down")


def test_a_camera_vocabulary_limits_the_moves_and_fixed_options_keep_each_moves_letter():
    config = SceneConfig(max_camera_moves=1, camera_moves=PAN_TILT)
    keys, letters = Counter(), Counter()
    for seed in range(200):
        scene = sample_scene(seed, config)
        assert {m for m, _ in scene.camera_moves} <= set(PAN_TILT) and len(scene.camera_moves) <= 1
        qa = ft.camera_question(scene, projected_boxes(scene), np.random.default_rng(seed), PAN_TILT, True)
        if qa is None:
            continue
        assert qa.options == PAN_TILT and qa.answer == "ABCD"[PAN_TILT.index(qa.key)]
        assert moves_from_poses(scene.cam_to_world) == {qa.key}
        keys[qa.key] += 1
        letters[qa.answer] += 1
    assert sum(keys.values()) > 100 and set(keys) == set(PAN_TILT)
    assert min(letters.values()) > 0.15 * sum(letters.values())  # keys spread over A-D
    # Shuffled options still draw their distractors from the vocabulary only.
    scene = next(s for s in (sample_scene(k, config) for k in range(50)) if s.camera_moves)
    qa = ft.camera_question(scene, projected_boxes(scene), np.random.default_rng(1), PAN_TILT, False)
    assert qa is None or set(qa.options) == set(PAN_TILT)


@pytest.mark.parametrize(("kwargs", "phrase"), [
    (dict(camera_moves=("Pan Left", "Zoom In")), "camera_moves"),
    (dict(camera_moves=()), "camera_moves"),
    (dict(camera_moves=PAN_TILT, max_camera_moves=3), "max_camera_moves 3"),
])
def test_a_bad_camera_vocabulary_is_one_sentence(kwargs, phrase):
    with pytest.raises(InputError, match=phrase):
        SceneConfig(**kwargs)


def test_fixed_camera_options_need_four_moves_and_one_move_scenes():
    with pytest.raises(InputError, match="fixed_camera_options needs"):
        SynthConfig(scene=SceneConfig(max_camera_moves=2, camera_moves=PAN_TILT), fixed_camera_options=True)
    with pytest.raises(InputError, match="fixed_camera_options needs"):
        SynthConfig(scene=SceneConfig(max_camera_moves=1), fixed_camera_options=True)
