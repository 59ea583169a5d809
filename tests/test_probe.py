"""`fourd-jax probe`: camera-move labels, the multiple-choice scoring of a reader, and one small run."""

import json

import numpy as np

from fourd_jax import cli, probe
from fourd_jax.data import records
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize


def test_move_labels_follow_each_parameter():
    # yaw, pitch, roll, forward, right, up; 0 = decreases, 1 = unchanged, 2 = increases
    assert probe.move_labels([]).tolist() == [1, 1, 1, 1, 1, 1]
    assert probe.move_labels(["Pan Left", "Dolly Out"]).tolist() == [2, 1, 1, 0, 1, 1]
    assert probe.move_labels(["Pan Right", "Tilt Up", "Pedestal Down"]).tolist() == [0, 2, 1, 1, 1, 0]
    assert probe.split_moves("Pan Right, Tilt Up and Truck Left") == ["Pan Right", "Tilt Up", "Truck Left"]


def test_choice_accuracy_picks_the_option_with_the_best_summed_log_prob():
    labels = np.array([probe.move_labels(["Pan Left"]), probe.move_labels(["Tilt Up"])])
    options = [[probe.move_labels(m) for m in (["Pan Right"], ["Pan Left"], ["Roll Clockwise"], ["Dolly In"])],
               [probe.move_labels(m) for m in (["Tilt Up"], ["Tilt Down"], ["Pan Left"], ["Truck Left"])]]
    scenes = probe.Scenes(frames=[None, None], labels=labels, questions=[(options[0], 1), (options[1], 2)])
    sure = np.log(np.full((2, 6, 3), 1e-6))
    for row, lab in enumerate(labels):
        sure[row, np.arange(6), lab] = 0.0  # certain of each scene's true labels
    result = probe.choice_accuracy(sure, scenes)
    # scene 0's key (B, Pan Left) is picked; scene 1's key is C but its true moves are option A's
    assert result["n"] == 2 and result["accuracy"] == 0.5 and result["per_parameter"] == [1.0] * 6
    lo, hi = result["ci"]
    assert lo < 0.5 < hi


def test_a_small_probe_run_scores_every_held_out_camera_question(tmp_path, capsys):
    config = SynthConfig(scene=SceneConfig(num_frames=4, image_size=(56, 56)), families=("4dthinker",),
                         split_fractions=(0.5, 0.25, 0.25))
    synthesize(tmp_path / "d", 12, seed=3, config=config, progress=False)
    questions = sum(r["subtask"] == "camera_motion" for r in records.read(tmp_path / "d" / "test", False))
    assert cli.main(["probe", str(tmp_path / "d"), "--steps", "3", "--out", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["scenes"] == {"train": 6, "val": 3, "test": 3}
    for reader in ("pixel_differences", "random_tower", "trained_tower"):
        assert result[reader]["n"] == questions and 0.0 <= result[reader]["accuracy"] <= 1.0
    assert "trained_tower" in capsys.readouterr().out
    assert cli.main(["probe", str(tmp_path / "nowhere")]) == 2


def test_the_demo_preset_tower_is_probed_and_a_bad_preset_is_one_sentence(tmp_path, capsys):
    config = SynthConfig(scene=SceneConfig(num_frames=4, image_size=(56, 56)), families=("4dthinker",),
                         split_fractions=(0.5, 0.25, 0.25))
    synthesize(tmp_path / "d", 8, seed=5, config=config, progress=False)
    result = probe.run(tmp_path / "d", preset="demo", steps=2)
    assert result["trained_tower"]["steps"] == 2 and 0.0 <= result["random_tower"]["accuracy"] <= 1.0
    assert cli.main(["probe", str(tmp_path / "d"), "--preset", "huge"]) == 2
    assert "--preset 'huge' is not one of" in capsys.readouterr().err
    assert cli.main(["probe", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "argument --steps: must be a whole number >= 1, not 0" in capsys.readouterr().err
