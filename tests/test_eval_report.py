"""fourd_jax.eval.report: accuracy tables with 95% intervals, result files and stage comparisons on
hand-made predictions. Expected intervals are computed here independently: the Wilson interval as the
roots of its defining quadratic, (p_hat - p)^2 = z^2 p (1 - p) / n."""

import csv
import json
import math

import numpy as np
import pytest

from fourd_jax.eval import report
from fourd_jax.eval.report import (
    Prediction,
    accuracy_table,
    compare_table,
    macro_interval,
    merge_stage_results,
    plot_stages,
    wilson_interval,
    write_results,
)

Z = 1.959964


def wilson_ref(correct: int, n: int) -> list[float]:
    """The Wilson score interval as the two roots in p of (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0."""
    p_hat = correct / n
    roots = np.sort(np.roots([1 + Z * Z / n, -(2 * p_hat + Z * Z / n), p_hat * p_hat]).real)
    return [float(np.clip(roots[0], 0, 1)), float(np.clip(roots[-1], 0, 1))]


def macro_ref(counts: list[tuple[int, int]]) -> list[float]:
    """Mean of k accuracies +- z sqrt(sum of per-sub-task variances) / k, each variance ((hi - lo) / 2z)^2."""
    k = len(counts)
    mean = sum(c / n for c, n in counts) / k
    var = sum(((hi - lo) / (2 * Z)) ** 2 for lo, hi in (wilson_ref(c, n) for c, n in counts))
    half = Z * math.sqrt(var) / k
    return [max(0.0, mean - half), min(1.0, mean + half)]


def _preds(subtask: str, n: int, correct: int, unanswered: int = 0, num_options: int = 4,
           groups: tuple[str, ...] = (), family: str = "dsr") -> list[Prediction]:
    """n predictions of `subtask`: `correct` right, `unanswered` with no extracted letter, the rest wrong."""
    out = []
    for i in range(n):
        if i < correct:
            predicted = "B"
        elif i < correct + unanswered:
            predicted = None
        else:
            predicted = "C"
        out.append(Prediction(f"{subtask}-{i}", family, subtask, "B", predicted, num_options, f"answer {predicted}",
                              groups=groups))
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
    assert not Prediction("1", "dsr", "t", "A", "A", reason="media unreadable").correct  # unscored is wrong
    with pytest.raises(ValueError, match="num_options"):
        Prediction("1", "dsr", "t", "A", "A", num_options=0)


# ----------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("correct, n, expected", [
    # By hand, z = 1.959964, z^2 = 3.841459:
    # 0/10: [0, (z^2/n) / (1 + z^2/n)] = [0, 0.384146 / 1.384146].
    (0, 10, (0.0, 0.27753)),
    (10, 10, (0.72247, 1.0)),
    # 5/10: 0.5 +- z sqrt(0.025 + z^2/400) / 1.384146 = 0.5 +- 0.26341.
    (5, 10, (0.23659, 0.76341)),
    # 81/263: p = 0.307985, z^2/n = 0.014606; center (p + 0.007303) / 1.014606 = 0.310750,
    # half z sqrt(p (1 - p) / 263 + z^2 / (4 * 263^2)) / 1.014606 = 0.055461.
    (81, 263, (0.25529, 0.36621)),
])
def test_wilson_interval_hand_values(correct, n, expected):
    lo, hi = wilson_interval(correct, n)
    assert (lo, hi) == pytest.approx(expected, abs=1e-5)
    assert [lo, hi] == pytest.approx(wilson_ref(correct, n), abs=1e-9)


def test_wilson_interval_edges_and_bad_input():
    for n in (1, 2, 7, 50, 1000):
        for correct in sorted({0, 1, n // 2, n - 1, n}):
            lo, hi = wilson_interval(correct, n)
            assert 0.0 <= lo <= correct / n <= hi <= 1.0
            assert [lo, hi] == pytest.approx(wilson_ref(correct, n), abs=1e-9)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert report.Z95 == Z
    for correct, n in ((-1, 3), (4, 3), (0, -1)):
        with pytest.raises(ValueError, match="correct"):
            wilson_interval(correct, n)


def test_macro_interval_from_subtask_intervals():
    rows = [{"accuracy": c / n, "ci": wilson_ref(c, n)} for c, n in ((3, 4), (1, 2), (2, 4))]
    assert list(macro_interval(rows)) == pytest.approx(macro_ref([(3, 4), (1, 2), (2, 4)]), abs=1e-12)
    # One sub-task: mean +- z * (hi - lo) / 2z, i.e. the symmetric interval of its own width.
    lo, hi = wilson_ref(81, 263)
    p = 81 / 263
    assert list(macro_interval([{"accuracy": p, "ci": [lo, hi]}])) == pytest.approx(
        [p - (hi - lo) / 2, p + (hi - lo) / 2], abs=1e-12)
    with pytest.raises(ValueError, match="no sub-task"):
        macro_interval([])


# ----------------------------------------------------------------------------- tables


def test_accuracy_table_exact(predictions):
    table = accuracy_table(predictions)
    assert list(table) == ["subtasks", "micro", "macro", "groups", "unscored"]
    assert list(table["subtasks"]) == ["alpha", "beta", "gamma"]
    alpha = table["subtasks"]["alpha"]
    assert list(alpha) == ["n", "correct", "accuracy", "ci", "chance", "unanswered"]
    # unanswered: the fixture's questions with no extracted letter (beta 1, gamma 2), also in micro
    assert [table["subtasks"][k]["unanswered"] for k in ("alpha", "beta", "gamma")] == [0, 1, 2]
    assert table["micro"]["unanswered"] == 3
    assert {k: alpha[k] for k in ("n", "correct", "accuracy", "chance")} == {"n": 4, "correct": 3, "accuracy": 0.75,
                                                                             "chance": 0.25}
    assert alpha["ci"] == pytest.approx(wilson_ref(3, 4), abs=1e-9)
    assert alpha["ci"] == pytest.approx([0.30064, 0.95441], abs=1e-5)
    # None counts wrong; 5 options make chance 0.2
    beta = table["subtasks"]["beta"]
    assert (beta["n"], beta["correct"], beta["accuracy"]) == (2, 1, 0.5) and beta["chance"] == pytest.approx(0.2)
    assert beta["ci"] == pytest.approx(wilson_ref(1, 2), abs=1e-9)
    gamma = table["subtasks"]["gamma"]
    assert (gamma["n"], gamma["correct"], gamma["accuracy"], gamma["chance"]) == (4, 2, 0.5, 0.25)
    micro = table["micro"]
    assert (micro["n"], micro["correct"]) == (10, 6)
    assert micro["accuracy"] == pytest.approx(0.6)
    assert micro["ci"] == pytest.approx(wilson_ref(6, 10), abs=1e-9)
    assert micro["chance"] == pytest.approx((8 * 0.25 + 2 * 0.2) / 10)  # 0.24
    macro = table["macro"]
    assert macro["subtasks"] == 3
    assert macro["accuracy"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert macro["ci"] == pytest.approx(macro_ref([(3, 4), (1, 2), (2, 4)]), abs=1e-9)
    assert macro["chance"] == pytest.approx((0.25 + 0.2 + 0.25) / 3)
    assert table["groups"] == {} and table["unscored"] == []


def test_mixed_num_options_chance():
    preds = _preds("t", 2, 1) + _preds("t", 2, 1, num_options=5)
    row = accuracy_table(preds)["subtasks"]["t"]
    assert row["chance"] == pytest.approx((0.25 + 0.25 + 0.2 + 0.2) / 4)


def test_unscored_count_as_wrong_and_unreadable_stays_out_of_macro(predictions):
    unscored = [
        Prediction("too-long", "dsr", "alpha", "B", None, reason="the sample has 900 tokens, more than max_length 512"),
        Prediction("bad.array_record:3", "unknown", report.UNREADABLE, "", None, reason="not a msgpack record"),
    ]
    table = accuracy_table(predictions + unscored)
    alpha = table["subtasks"]["alpha"]
    assert (alpha["n"], alpha["correct"], alpha["accuracy"]) == (5, 3, 0.6)
    assert alpha["ci"] == pytest.approx(wilson_ref(3, 5), abs=1e-9)
    assert table["subtasks"][report.UNREADABLE]["n"] == 1
    assert (table["micro"]["n"], table["micro"]["correct"]) == (12, 6)
    assert table["micro"]["ci"] == pytest.approx(wilson_ref(6, 12), abs=1e-9)
    # macro over alpha, beta, gamma only
    assert table["macro"]["subtasks"] == 3
    assert table["macro"]["accuracy"] == pytest.approx((0.6 + 0.5 + 0.5) / 3)
    assert table["macro"]["ci"] == pytest.approx(macro_ref([(3, 5), (1, 2), (2, 4)]), abs=1e-9)
    assert table["unscored"] == [
        {"sample_id": "too-long", "reason": "the sample has 900 tokens, more than max_length 512"},
        {"sample_id": "bad.array_record:3", "reason": "not a msgpack record"}]
    # Only unreadable questions: macro is over that one row rather than over nothing.
    only = accuracy_table(unscored[1:])
    assert only["macro"]["subtasks"] == 1 and only["macro"]["accuracy"] == 0.0


def vlm4d_predictions() -> list[Prediction]:
    exo = ("vlm4d", "vlm4d/real", "vlm4d/real_exo")
    ego = ("vlm4d", "vlm4d/real", "vlm4d/real_ego")
    synthetic = ("vlm4d", "vlm4d/synthetic")
    return (_preds("counting", 5, 4, groups=exo, family="vlm4d") + _preds("counting", 3, 1, groups=ego, family="vlm4d")
            + _preds("direction", 4, 1, groups=synthetic, family="vlm4d"))


def test_groups_rows():
    table = accuracy_table(vlm4d_predictions())
    groups = table["groups"]
    assert list(groups) == ["vlm4d", "vlm4d/real", "vlm4d/real_ego", "vlm4d/real_exo", "vlm4d/synthetic"]
    for name, (correct, n) in {"vlm4d": (6, 12), "vlm4d/real": (5, 8), "vlm4d/real_ego": (1, 3),
                               "vlm4d/real_exo": (4, 5), "vlm4d/synthetic": (1, 4)}.items():
        row = groups[name]
        assert (row["n"], row["correct"]) == (n, correct)
        assert row["accuracy"] == pytest.approx(correct / n)
        assert row["ci"] == pytest.approx(wilson_ref(correct, n), abs=1e-9)
        assert row["chance"] == pytest.approx(0.25)


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
    extra = [Prediction("long-1", "dsr", "alpha", "B", None, reason="too long")]
    table = write_results(out, predictions + extra)
    assert table == accuracy_table(predictions + extra)
    saved = json.loads((out / "results.json").read_text())
    assert saved == table
    assert saved["subtasks"]["alpha"]["ci"] == pytest.approx(wilson_ref(3, 5), abs=1e-9)
    assert saved["unscored"] == [{"sample_id": "long-1", "reason": "too long"}]

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subtask", "n", "correct", "accuracy", "ci_low", "ci_high", "chance", "unanswered"]
    assert [r["unanswered"] for r in rows] == ["0", "1", "2", "3", ""]  # the unscored one is not unanswered
    assert [r["subtask"] for r in rows] == ["alpha", "beta", "gamma", "micro", "macro"]
    assert {k: rows[0][k] for k in ("subtask", "n", "correct", "accuracy", "chance")} == {
        "subtask": "alpha", "n": "5", "correct": "3", "accuracy": "0.6", "chance": "0.25"}
    assert [float(rows[0]["ci_low"]), float(rows[0]["ci_high"])] == pytest.approx(wilson_ref(3, 5), abs=1e-9)
    assert float(rows[1]["chance"]) == pytest.approx(0.2)
    assert (rows[3]["n"], rows[3]["correct"]) == ("11", "6")
    assert float(rows[3]["accuracy"]) == pytest.approx(6 / 11)
    assert [float(rows[3]["ci_low"]), float(rows[3]["ci_high"])] == pytest.approx(wilson_ref(6, 11), abs=1e-9)
    assert rows[4]["n"] == "" and float(rows[4]["accuracy"]) == pytest.approx(1.6 / 3)
    assert [float(rows[4]["ci_low"]), float(rows[4]["ci_high"])] == pytest.approx(
        macro_ref([(3, 5), (1, 2), (2, 4)]), abs=1e-9)

    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(predictions) + 1
    first = json.loads(lines[0])
    assert first == {"sample_id": "gamma-0", "family": "dsr", "subtask": "gamma", "answer": "B", "predicted": "B",
                     "num_options": 4, "completion": "answer B", "reason": None, "groups": [], "correct": True}
    assert json.loads(lines[-1])["reason"] == "too long" and not json.loads(lines[-1])["correct"]
    assert sum(json.loads(line)["correct"] for line in lines) == 6
    assert sum(json.loads(line)["predicted"] is None for line in lines) == 4

    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


def test_write_results_groups_in_csv(tmp_path):
    write_results(tmp_path, vlm4d_predictions())
    with open(tmp_path / "results.csv", newline="") as f:
        rows = {r["subtask"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["counting", "direction", "micro", "macro", "vlm4d", "vlm4d/real", "vlm4d/real_ego",
                          "vlm4d/real_exo", "vlm4d/synthetic"]
    assert (rows["vlm4d/real_exo"]["n"], rows["vlm4d/real_exo"]["correct"]) == ("5", "4")
    assert float(rows["vlm4d/real_exo"]["ci_low"]) == pytest.approx(wilson_ref(4, 5)[0], abs=1e-9)


def test_write_results_extra(tmp_path, predictions):
    table = write_results(tmp_path, predictions, extra={"checkpoint": "/ckpt/rl/100", "family": "dsr"})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"] == "/ckpt/rl/100" and saved["family"] == "dsr"
    assert {k: saved[k] for k in table} == table
    with pytest.raises(ValueError, match="micro"):
        write_results(tmp_path, predictions, extra={"micro": 1})


# ----------------------------------------------------------------------------- stages


def _stages(predictions):
    dift = accuracy_table(predictions)
    # rl: alpha 4/4, gamma 3/4, no beta; a sub-task only rl has
    rl = accuracy_table(_preds("alpha", 4, 4) + _preds("gamma", 4, 3) + _preds("delta", 5, 1))
    # blind: alpha 1/4, beta 0/2, gamma 1/4
    blind = accuracy_table(_preds("alpha", 4, 1) + _preds("beta", 2, 0, num_options=5) + _preds("gamma", 4, 1))
    return {"blind": blind, "dift": dift, "rl": rl}


def cell(correct: int, n: int) -> str:
    lo, hi = wilson_ref(correct, n)
    return f"{100 * correct / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def parse_rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell, cells split on runs of two or more spaces."""
    import re

    rows = {}
    for line in text.splitlines():
        if line and not line.startswith("-") and not line.startswith("unscored"):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells
    return rows


def test_compare_table(predictions):
    text = compare_table(_stages(predictions))
    lines = text.splitlines()
    assert lines[0].split() == ["subtask", "n", "chance", "blind", "dift", "rl", "no", "letter"]
    rows = parse_rows(text)
    # the last column: questions with no letter per stage (only dift's fixture has any: beta 1, gamma 2)
    assert rows["alpha"] == ["alpha", "4", "25.0%", cell(1, 4), cell(3, 4), cell(4, 4), "0/0/0"]
    assert rows["alpha"][3:6] == ["25.0% [4.6, 69.9]", "75.0% [30.1, 95.4]", "100.0% [51.0, 100.0]"]
    assert rows["beta"] == ["beta", "2", "20.0%", cell(0, 2), cell(1, 2), "-", "0/1/-"]
    assert rows["delta"] == ["delta", "5", "25.0%", "-", "-", cell(1, 5), "-/-/0"]
    assert rows["gamma"] == ["gamma", "4", "25.0%", cell(1, 4), cell(2, 4), cell(3, 4), "0/2/0"]
    # micro: blind 2/10, dift 6/10, rl 8/13; the stages scored different counts
    assert rows["micro"] == ["micro", "10/13", "24.0%", cell(2, 10), cell(6, 10), cell(8, 13), "0/3/0"]
    # macro: mean of sub-task accuracies with the interval from their intervals
    macro = rows["macro"]
    assert macro[:2] == ["macro", "23.3%"]
    for got, counts in zip(macro[2:], ([(1, 4), (0, 2), (1, 4)], [(3, 4), (1, 2), (2, 4)],
                                       [(4, 4), (3, 4), (1, 5)]), strict=True):
        mean = sum(c / n for c, n in counts) / 3
        lo, hi = macro_ref(counts)
        assert got == f"{100 * mean:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert [line.split()[0] for line in lines if line and not line.startswith("-")][1:] == [
        "alpha", "beta", "delta", "gamma", "micro", "macro"]

    no_chance = compare_table({"dift": accuracy_table(predictions)}, chance=False)
    assert no_chance.splitlines()[0].split() == ["subtask", "n", "dift", "no", "letter"]
    assert parse_rows(no_chance)["alpha"] == ["alpha", "4", cell(3, 4), "0"]


def test_compare_table_groups_and_unscored():
    preds = vlm4d_predictions() + [Prediction("x", "vlm4d", "counting", "B", None, reason="unreadable media",
                                              groups=("vlm4d", "vlm4d/synthetic"))]
    text = compare_table({"rl": accuracy_table(preds)})
    rows = parse_rows(text)
    names = [line.split()[0] for line in text.splitlines() if line and not line.startswith("-")]
    assert names[1:] == ["counting", "direction", "micro", "macro", "vlm4d", "vlm4d/real", "vlm4d/real_ego",
                         "vlm4d/real_exo", "vlm4d/synthetic", "unscored"]
    assert rows["vlm4d/real_exo"] == ["vlm4d/real_exo", "5", "25.0%", cell(4, 5), "0"]
    assert rows["vlm4d/synthetic"] == ["vlm4d/synthetic", "5", "25.0%", cell(1, 5), "0"]
    assert rows["micro"] == ["micro", "13", "25.0%", cell(6, 13), "0"]
    assert text.splitlines()[-1] == "unscored (counted wrong): rl 1"


def test_merge_stage_results(predictions):
    stages = _stages(predictions)
    merged = merge_stage_results(stages)
    assert list(merged) == ["subtasks", "micro", "macro"]
    assert list(merged["subtasks"]) == ["alpha", "beta", "delta", "gamma"]
    alpha = merged["subtasks"]["alpha"]
    assert list(alpha) == ["n", "chance", "blind", "dift", "rl", "ci", "unanswered"]
    assert alpha["unanswered"] == {"blind": 0, "dift": 0, "rl": 0}
    assert merged["subtasks"]["beta"]["unanswered"] == {"blind": 0, "dift": 1, "rl": None}
    assert merged["micro"]["unanswered"] == {"blind": 0, "dift": 3, "rl": 0}
    assert {k: alpha[k] for k in ("n", "chance", "blind", "dift", "rl")} == {"n": 4, "chance": 0.25, "blind": 0.25,
                                                                              "dift": 0.75, "rl": 1.0}
    assert list(alpha["ci"]) == ["blind", "dift", "rl"]
    for stage, correct in (("blind", 1), ("dift", 3), ("rl", 4)):
        assert alpha["ci"][stage] == pytest.approx(wilson_ref(correct, 4), abs=1e-9)
    beta = merged["subtasks"]["beta"]
    assert (beta["n"], beta["blind"], beta["dift"], beta["rl"]) == (2, 0.0, 0.5, None)
    assert beta["chance"] == pytest.approx(0.2) and beta["ci"]["rl"] is None
    assert beta["ci"]["blind"] == pytest.approx(wilson_ref(0, 2), abs=1e-9)
    delta = merged["subtasks"]["delta"]
    assert (delta["n"], delta["chance"], delta["blind"], delta["dift"], delta["rl"]) == (5, 0.25, None, None, 0.2)
    assert delta["ci"]["blind"] is None and delta["ci"]["rl"] == pytest.approx(wilson_ref(1, 5), abs=1e-9)
    micro = merged["micro"]
    assert micro["n"] == 10 and micro["n_by_stage"] == {"blind": 10, "dift": 10, "rl": 13}
    assert micro["blind"] == pytest.approx(0.2) and micro["dift"] == pytest.approx(0.6)
    assert micro["rl"] == pytest.approx(8 / 13)
    assert micro["chance"] == pytest.approx(0.24)
    assert micro["ci"]["rl"] == pytest.approx(wilson_ref(8, 13), abs=1e-9)
    macro = merged["macro"]
    assert list(macro) == ["chance", "blind", "dift", "rl", "ci"]
    assert macro["dift"] == pytest.approx(1.75 / 3) and macro["rl"] == pytest.approx(1.95 / 3)
    assert macro["blind"] == pytest.approx(0.5 / 3)
    assert macro["ci"]["dift"] == pytest.approx(macro_ref([(3, 4), (1, 2), (2, 4)]), abs=1e-9)
    json.dumps(merged)  # the demo writes it as results.json
    # Equal counts everywhere: no n_by_stage.
    same = merge_stage_results({"dift": stages["dift"], "again": accuracy_table(predictions)})
    assert list(same["micro"]) == ["n", "chance", "dift", "again", "ci", "unanswered"]
    for name in ("chance", "ci", "n", "unanswered"):
        with pytest.raises(ValueError, match="clash"):
            merge_stage_results({name: accuracy_table(predictions)})


def test_merge_stage_results_groups():
    merged = merge_stage_results({"dift": accuracy_table(vlm4d_predictions())})
    assert list(merged) == ["subtasks", "micro", "macro", "groups"]
    real = merged["groups"]["vlm4d/real"]
    assert (real["n"], real["dift"]) == (8, pytest.approx(5 / 8))
    assert real["ci"]["dift"] == pytest.approx(wilson_ref(5, 8), abs=1e-9)


def test_tables_without_intervals_still_compare(predictions):
    # A table written before intervals existed: the interval comes from its counts.
    old = accuracy_table(predictions)
    for row in [*old["subtasks"].values(), old["micro"]]:
        del row["ci"]
    del old["macro"]["ci"]
    rows = parse_rows(compare_table({"old": old}))
    assert rows["alpha"][-2:] == [cell(3, 4), "0"] and rows["macro"][-1] == "58.3%"
    assert merge_stage_results({"old": old})["subtasks"]["alpha"]["ci"]["old"] == pytest.approx(wilson_ref(3, 4))


def capture_figures(monkeypatch) -> list:
    figures = []
    original = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figures.append(fig), original(fig, path)))
    return figures


def error_bar_spans(ax) -> list[list[float]]:
    """low, high, low, high, ... of the error bars of each bar container, from the drawn line segments."""
    spans = []
    for container in ax.containers:
        if getattr(container, "errorbar", None) is not None:
            segments = container.errorbar.lines[2][0].get_segments()
            spans.append([float(y) for s in segments for y in (s[0][1], s[1][1])])
    return spans


def flat_intervals(counts) -> list[float]:
    return [end for c, n in counts for end in wilson_ref(c, n)]


def test_plot_stages(tmp_path, predictions, monkeypatch):
    figures = capture_figures(monkeypatch)
    path = tmp_path / "plots" / "stages.png"
    plot_stages(_stages(predictions), path)
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000
    (ax,) = figures[0].axes
    spans = error_bar_spans(ax)
    assert len(spans) == 3  # one bar series with error bars per stage
    # blind: alpha 1/4, beta 0/2, gamma 1/4; rl: alpha 4/4, delta 1/5, gamma 3/4 (sub-tasks sorted)
    assert spans[0] == pytest.approx(flat_intervals(((1, 4), (0, 2), (1, 4))), abs=1e-9)
    assert spans[2] == pytest.approx(flat_intervals(((4, 4), (1, 5), (3, 4))), abs=1e-9)
    labels = ax.get_legend_handles_labels()[1]
    assert [label for label in labels if label != "chance"] == [
        "blind (micro 20.0%)", "dift (micro 60.0%)", "rl (micro 61.5%)"]


def test_accuracy_plot_has_error_bars(tmp_path, predictions, monkeypatch):
    figures = capture_figures(monkeypatch)
    write_results(tmp_path, predictions)
    (ax,) = figures[0].axes
    (spans,) = error_bar_spans(ax)
    assert spans == pytest.approx(flat_intervals(((3, 4), (1, 2), (2, 4))), abs=1e-9)


def test_families_with_the_same_sub_task_stay_apart():
    """As `data inspect` counts them: 4dthinker's and mllm4d's object_direction are two rows."""
    preds = ([Prediction(f"a{i}", "4dthinker", "object_direction", "A", "A" if i < 3 else "B") for i in range(4)]
             + [Prediction(f"b{i}", "mllm4d", "object_direction", "A", "A" if i < 1 else None) for i in range(2)])
    table = accuracy_table(preds)
    assert list(table["subtasks"]) == ["4dthinker/object_direction", "mllm4d/object_direction"]
    assert [(r["n"], r["correct"], r["unanswered"]) for r in table["subtasks"].values()] == [(4, 3, 0), (2, 1, 1)]
    assert table["macro"]["subtasks"] == 2 and table["macro"]["accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # One family: rows keep their plain sub-task names.
    assert list(accuracy_table(preds[:4])["subtasks"]) == ["object_direction"]
