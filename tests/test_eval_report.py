"""fourd_jax.eval.report: accuracy tables, result files and stage comparisons on hand-made predictions."""

import csv
import json

import pytest

from fourd_jax.eval.report import (
    Prediction,
    accuracy_table,
    compare_table,
    merge_stage_results,
    plot_stages,
    write_results,
)


def _preds(subtask: str, n: int, correct: int, unanswered: int = 0, num_options: int = 4) -> list[Prediction]:
    """n predictions of `subtask`: `correct` right, `unanswered` with no extracted letter, the rest wrong."""
    out = []
    for i in range(n):
        if i < correct:
            predicted = "B"
        elif i < correct + unanswered:
            predicted = None
        else:
            predicted = "C"
        out.append(Prediction(f"{subtask}-{i}", "dsr", subtask, "B", predicted, num_options, f"answer {predicted}"))
    return out


@pytest.fixture
def predictions() -> list[Prediction]:
    # alpha: 3/4, 4-way. beta: 1/2 (one unanswered), 5-way. gamma: 2/4 (two unanswered), 4-way.
    return (
        _preds("gamma", 4, 2, unanswered=2)
        + _preds("alpha", 4, 3)
        + _preds("beta", 2, 1, unanswered=1, num_options=5)
    )


def test_correct_property():
    assert Prediction("1", "dsr", "t", "A", "A").correct
    assert Prediction("1", "dsr", "t", "A", " a ").correct  # case and whitespace from extraction
    assert not Prediction("1", "dsr", "t", "A", "B").correct
    assert not Prediction("1", "dsr", "t", "A", None).correct
    with pytest.raises(ValueError, match="num_options"):
        Prediction("1", "dsr", "t", "A", "A", num_options=0)


def test_accuracy_table_exact(predictions):
    table = accuracy_table(predictions)
    assert list(table["subtasks"]) == ["alpha", "beta", "gamma"]
    assert table["subtasks"]["alpha"] == {"n": 4, "correct": 3, "accuracy": 0.75, "chance": 0.25}
    # None counts wrong; 5 options make chance 0.2
    assert table["subtasks"]["beta"] == {"n": 2, "correct": 1, "accuracy": 0.5, "chance": pytest.approx(0.2)}
    assert table["subtasks"]["gamma"] == {"n": 4, "correct": 2, "accuracy": 0.5, "chance": 0.25}
    micro = table["micro"]
    assert (micro["n"], micro["correct"]) == (10, 6)
    assert micro["accuracy"] == pytest.approx(0.6)
    assert micro["chance"] == pytest.approx((8 * 0.25 + 2 * 0.2) / 10)  # 0.24
    macro = table["macro"]
    assert macro["subtasks"] == 3
    assert macro["accuracy"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert macro["chance"] == pytest.approx((0.25 + 0.2 + 0.25) / 3)


def test_mixed_num_options_chance():
    preds = _preds("t", 2, 1) + _preds("t", 2, 1, num_options=5)
    row = accuracy_table(preds)["subtasks"]["t"]
    assert row["chance"] == pytest.approx((0.25 + 0.25 + 0.2 + 0.2) / 4)


def test_empty_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_table([])
    with pytest.raises(ValueError, match="no predictions"):
        write_results(tmp_path / "out", [])
    with pytest.raises(ValueError, match="at least one"):
        compare_table({})
    with pytest.raises(ValueError, match="at least one"):
        merge_stage_results({})


def test_write_results(tmp_path, predictions):
    out = tmp_path / "nested" / "eval"
    table = write_results(out, predictions)
    assert table == accuracy_table(predictions)
    assert json.loads((out / "results.json").read_text()) == table

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["subtask"] for r in rows] == ["alpha", "beta", "gamma", "micro", "macro"]
    assert rows[0] == {"subtask": "alpha", "n": "4", "correct": "3", "accuracy": "0.75", "chance": "0.25"}
    assert float(rows[1]["chance"]) == pytest.approx(0.2)
    assert (rows[3]["n"], rows[3]["correct"]) == ("10", "6")
    assert float(rows[3]["accuracy"]) == pytest.approx(0.6)
    assert rows[4]["n"] == "" and float(rows[4]["accuracy"]) == pytest.approx(1.75 / 3)

    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(predictions)
    first = json.loads(lines[0])
    assert first == {"sample_id": "gamma-0", "family": "dsr", "subtask": "gamma", "answer": "B", "predicted": "B",
                     "num_options": 4, "completion": "answer B", "correct": True}
    assert sum(json.loads(line)["correct"] for line in lines) == 6
    assert sum(json.loads(line)["predicted"] is None for line in lines) == 3

    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


def test_write_results_extra(tmp_path, predictions):
    table = write_results(tmp_path, predictions, extra={"checkpoint": "/ckpt/rl/100", "family": "dsr"})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"] == "/ckpt/rl/100" and saved["family"] == "dsr"
    assert {k: saved[k] for k in table} == table
    with pytest.raises(ValueError, match="micro"):
        write_results(tmp_path, predictions, extra={"micro": 1})


def _stages(predictions):
    dift = accuracy_table(predictions)
    # rl: alpha 4/4, gamma 3/4, no beta; a sub-task only rl has
    rl = accuracy_table(_preds("alpha", 4, 4) + _preds("gamma", 4, 3) + _preds("delta", 5, 1))
    return {"dift": dift, "rl": rl}


def test_compare_table(predictions):
    text = compare_table(_stages(predictions))
    lines = text.splitlines()
    assert lines[0].split() == ["subtask", "n", "chance", "dift", "rl"]
    rows = {line.split()[0]: line.split() for line in lines if line and not line.startswith("-")}
    assert rows["alpha"] == ["alpha", "4", "25.0%", "75.0%", "100.0%"]
    assert rows["beta"] == ["beta", "2", "20.0%", "50.0%", "-"]
    assert rows["delta"] == ["delta", "5", "25.0%", "-", "20.0%"]
    assert rows["gamma"] == ["gamma", "4", "25.0%", "50.0%", "75.0%"]
    # micro: dift 6/10, rl 8/13; the stages scored different counts
    assert rows["micro"] == ["micro", "10/13", "24.0%", "60.0%", "61.5%"]
    # macro: dift (75+50+50)/3, rl (100+20+75)/3
    assert rows["macro"] == ["macro", "23.3%", "58.3%", "65.0%"]
    assert [line.split()[0] for line in lines if line and not line.startswith("-")][1:] == [
        "alpha", "beta", "delta", "gamma", "micro", "macro"]

    no_chance = compare_table({"dift": accuracy_table(predictions)}, chance=False)
    assert no_chance.splitlines()[0].split() == ["subtask", "n", "dift"]
    assert "25.0%" not in no_chance


def test_merge_stage_results(predictions):
    merged = merge_stage_results(_stages(predictions))
    assert set(merged) == {"subtasks", "micro", "macro"}
    assert list(merged["subtasks"]) == ["alpha", "beta", "delta", "gamma"]
    assert merged["subtasks"]["alpha"] == {"n": 4, "chance": 0.25, "dift": 0.75, "rl": 1.0}
    assert merged["subtasks"]["beta"] == {"n": 2, "chance": pytest.approx(0.2), "dift": 0.5, "rl": None}
    assert merged["subtasks"]["delta"] == {"n": 5, "chance": 0.25, "dift": None, "rl": 0.2}
    micro = merged["micro"]
    assert micro["n"] == 10 and micro["n_by_stage"] == {"dift": 10, "rl": 13}
    assert micro["dift"] == pytest.approx(0.6) and micro["rl"] == pytest.approx(8 / 13)
    assert micro["chance"] == pytest.approx(0.24)
    macro = merged["macro"]
    assert set(macro) == {"chance", "dift", "rl"}
    assert macro["dift"] == pytest.approx(1.75 / 3) and macro["rl"] == pytest.approx(1.95 / 3)
    json.dumps(merged)  # the demo writes it as results.json
    with pytest.raises(ValueError, match="clash"):
        merge_stage_results({"chance": accuracy_table(predictions)})


def test_plot_stages(tmp_path, predictions):
    path = tmp_path / "plots" / "stages.png"
    plot_stages(_stages(predictions), path)
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000
