"""`fourd-jax study`: every arm runs, the report has its fields, and the same seed gives the same study.json."""

import csv
import json

import pytest

from fourd_jax import cli, study

SMALL = ["--config.num_scenes=10", "--config.split_fractions=(0.5, 0.1, 0.4)",
         "--config.eval_max_new_tokens=12", "--config.dift.optim.total_steps=2",
         "--config.dift.train.checkpoint_every=2", "--config.dift.data.seq_buckets=(1024,)",
         "--config.rl.optim.total_steps=2", "--config.rl.train.checkpoint_every=2",
         "--config.rl.sample.max_new_tokens=12", "--config.rl.data.seq_buckets=(1024,)",
         "--config.warmup.optim.total_steps=2", "--config.warmup.train.checkpoint_every=2"]


@pytest.fixture(autouse=True)
def away_from_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the packaged configs are found from any directory


def test_every_arm_runs_and_is_reported(tmp_path, capsys):
    assert cli.main(["study", "--workdir", str(tmp_path), *SMALL]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert set(result["arms"]) == set(study.ARMS) and result["seeds"] == 1
    seed = tmp_path / "seed_0"
    for arm, entry in result["arms"].items():
        (table,) = entry["per_seed"]
        n = sum(row["n"] for row in table["subtasks"].values())
        assert n == table["micro"]["n"] > 0, arm
        for row in [*table["subtasks"].values(), table["micro"], table["macro"]]:
            lo, hi = row["ci"]
            assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0, arm
        assert entry["spread"]["micro"] == {"mean": table["micro"]["accuracy"], "std_over_seeds": 0.0}
        assert len((seed / f"eval_{arm}" / "predictions.jsonl").read_text().splitlines()) == n, arm
    # Each arm is the dift arm's training with one change.
    configs = {arm: json.loads((seed / arm / "manifest.json").read_text())["config"] for arm in study.ARMS}
    assert configs["text_sft"]["data"]["assistant"] == "text_trace"
    assert configs["dift_no_latent"]["loss"]["latent_weight"] == 0.0
    assert configs["blind"]["data"]["video"] is False and configs["dift"]["data"]["video"] is True
    assert configs["blind"]["data"]["assistant"] == "text_trace"
    assert configs["rl_full"]["rl"]["latent_gradient"] is True and configs["rl_text"]["rl"]["latent_gradient"] is False
    for arm in ("text_sft", "dift_no_latent", "blind"):
        changed = {k for k in configs[arm] if configs[arm][k] != configs["dift"][k]}
        assert changed <= {"data", "loss"} | ({"model"} if arm == "blind" else set()), (arm, changed)
    # the blind arm's model differs in its starting checkpoint only
    assert {k for k in configs["blind"]["model"] if configs["blind"]["model"][k] != configs["dift"]["model"][k]} \
        == {"init_from"}
    # Every supervised arm starts from the one warm-up; the blind arm from the same warm-up without video.
    for arm in ("text_sft", "dift", "dift_no_latent"):
        assert configs[arm]["model"]["init_from"] == str(seed / "warmup" / "checkpoints"), arm
    assert configs["blind"]["model"]["init_from"] == str(seed / "warmup_blind" / "checkpoints")
    warmups = {w: json.loads((seed / w / "manifest.json").read_text())["config"] for w in ("warmup", "warmup_blind")}
    assert warmups["warmup"]["data"]["video"] is True and warmups["warmup_blind"]["data"]["video"] is False
    assert {k for k in warmups["warmup"] if warmups["warmup"][k] != warmups["warmup_blind"][k]} == {"data"}
    for arm in ("rl_text", "rl_full"):
        (dynamics,) = result["arms"][arm]["dynamics"]
        assert len(dynamics["reward"]) == 2 and dynamics["grad_norm_var"] >= 0.0
        assert dynamics["logprob_drift_max"] <= 1e-4
    rows = list(csv.DictReader((tmp_path / "study.csv").open()))
    assert {r["arm"] for r in rows} == set(study.ARMS) and {"micro", "macro"} <= {r["subtask"] for r in rows}
    assert (tmp_path / "study_accuracy.png").exists() and (tmp_path / "study_rl_reward.png").exists()
    assert "blind" in capsys.readouterr().out


def test_the_same_seed_gives_the_same_study_json(tmp_path):
    for run in ("a", "b"):
        assert cli.main(["study", "--workdir", str(tmp_path / run), "--arms", "dift,blind", *SMALL]) == 0
    assert (tmp_path / "a" / "study.json").read_bytes() == (tmp_path / "b" / "study.json").read_bytes()


def test_bad_study_arguments_are_one_sentence(tmp_path, capsys):
    assert cli.main(["study", "--workdir", str(tmp_path), "--arms", "dift,nope"]) == 2
    assert "unknown study arms ['nope']" in capsys.readouterr().err
    assert cli.main(["study", "--workdir", str(tmp_path), "--seeds", "0"]) == 2
    assert "argument --seeds: must be a whole number >= 1, not 0" in capsys.readouterr().err
