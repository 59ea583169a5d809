"""Per-sub-task accuracy from extracted answers, and the files an evaluation run leaves behind.

This is the pure end of evaluation: it never sees a model. Generation and answer extraction produce
`Prediction`s; here they become an accuracy table (per sub-task, micro, macro, each next to its chance
level and with its 95% interval), written as JSON, CSV, JSONL and a bar chart, and several stages'
tables (e.g. blind, after DIFT and after 4DRL) are set side by side.

Every accuracy carries its n and a 95% interval: the Wilson score interval (`wilson_interval`) for a
count of correct answers (sub-tasks, micro, groups), and for macro the normal interval described in
`macro_interval`. Questions that could not be scored (`Prediction.reason` set) are wrong answers in
every denominator and are listed by id under "unscored".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fourd_jax.errors import InputError
from fourd_jax.files import as_path

__all__ = ["UNREADABLE", "Z95", "Prediction", "accuracy_table", "compare_table", "macro_interval",
           "merge_stage_results", "plot_stages", "wilson_interval", "write_results"]

# z of a two-sided 95% normal interval
Z95 = 1.959964
# the sub-task of a question whose record could not even be decoded far enough to know its sub-task
UNREADABLE = "unreadable"
# keys of merge_stage_results rows that are not stage names
_RESERVED = ("n", "chance", "n_by_stage", "ci", "unanswered")


@dataclass(frozen=True)
class Prediction:
    """One multiple-choice question after generation: the key letter and the letter extracted, if any.

    `reason` is set when the question could not be scored at all (its record is unreadable, or it fits
    no sequence bucket); it then counts as a wrong answer. `groups` names extra report rows the
    question also belongs to (e.g. "vlm4d/real", "vlm4d/real_exo").
    """

    sample_id: str
    family: str  # benchmark family: "dsr", "fourdthinker", "mllm4d", "vlm4d", ...
    subtask: str
    answer: str  # key letter
    predicted: str | None  # extracted letter, None when no answer could be extracted
    num_options: int = 4
    completion: str = ""
    reason: str | None = None  # why the question was not scored (None: it was)
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # chance is 1 / num_options, so it must be a positive count
        if self.num_options < 1:
            raise InputError(f"Prediction {self.sample_id!r} has num_options={self.num_options}; it must be >= 1.")

    @property
    def correct(self) -> bool:
        """True when the extracted letter is the key; an unanswered or unscored question is wrong."""
        if self.predicted is None or self.reason is not None:
            return False
        # extraction may keep case or stray spaces ("b", " B"); the letter is what counts
        return self.predicted.strip().upper() == self.answer.strip().upper()


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% with the default z) of `correct` successes out of `n`, as fractions.

    With p = correct / n: (p + z^2 / 2n +- z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n), clipped
    to [0, 1]. n = 0 gives the uninformative (0.0, 1.0).
    """
    if n < 0 or not 0 <= correct <= n:
        raise InputError(f"wilson_interval needs 0 <= correct <= n, got correct={correct} and n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denominator
    # At p = 0 (p = 1) the lower (upper) end is exactly 0 (1); rounding would leave it a hair off.
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


def macro_interval(rows: Sequence[dict], z: float = Z95) -> tuple[float, float]:
    """95% interval of a macro accuracy (the mean of k sub-task accuracies) from the sub-tasks' intervals.

    Each sub-task's variance is read off its own 95% interval as ((hi - lo) / (2 z))^2 (so a sub-task at
    0% or 100% still contributes its Wilson width, where p (1 - p) / n would be 0); the sub-tasks are
    independent, so the mean has variance sum_i var_i / k^2, and the interval is the normal one,
    mean +- z sqrt(sum_i var_i) / k, clipped to [0, 1]. `rows` are dicts with "accuracy" and "ci".
    """
    if not rows:
        raise InputError("macro_interval got no sub-task rows.")
    k = len(rows)
    mean = sum(r["accuracy"] for r in rows) / k
    variance = sum(((r["ci"][1] - r["ci"][0]) / (2 * z)) ** 2 for r in rows) / (k * k)
    half = z * math.sqrt(variance)
    return max(0.0, mean - half), min(1.0, mean + half)


def _count_row(rows: Sequence[Prediction]) -> dict:
    correct = sum(p.correct for p in rows)
    return {
        "n": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows),
        "ci": list(wilson_interval(correct, len(rows))),
        "chance": sum(1.0 / p.num_options for p in rows) / len(rows),
        # scored questions whose completion gave no option letter (counted wrong above)
        "unanswered": sum(p.reason is None and p.predicted is None for p in rows),
    }


def row_names(predictions: Sequence[Prediction]) -> list[str]:
    """Each prediction's table row: its sub-task, as "family/sub-task" when the predictions span more
    than one family (as `data inspect` counts them), so that families' same-named sub-tasks stay apart."""
    families = {p.family for p in predictions if p.subtask != UNREADABLE}
    qualify = len(families) > 1
    return [f"{p.family}/{p.subtask}" if qualify and p.subtask != UNREADABLE else p.subtask for p in predictions]


def accuracy_table(predictions: Sequence[Prediction]) -> dict:
    """Accuracy, 95% interval and chance per sub-task (names sorted), micro, macro and per group.

    Layout (accuracies and interval ends as fractions)::

        {"subtasks": {name: {"n", "correct", "accuracy", "ci": [lo, hi], "chance", "unanswered"}},
         "micro": {"n", "correct", "accuracy", "ci", "chance", "unanswered"},
         "macro": {"accuracy", "ci", "chance", "subtasks"},
         "groups": {name: {"n", "correct", "accuracy", "ci", "chance", "unanswered"}},
         "unscored": [{"sample_id", "reason"}]}

    Sub-task rows are named by `row_names` ("family/sub-task" when families are mixed). "unanswered"
    counts the scored questions whose completion gave no letter; they are wrong answers.

    Chance of a sub-task is the mean of 1 / num_options over its samples, so sub-tasks mixing 4- and 5-way
    questions get the exact expected accuracy of uniform guessing. Unscored predictions are wrong answers
    in their sub-task and in micro. Macro is the mean over sub-tasks, leaving out the "unreadable"
    pseudo-sub-task (questions whose sub-task is unknown; they do count in micro) unless it is the only
    one; its interval is `macro_interval`. Sub-task and micro intervals are `wilson_interval`. Groups
    (sorted) come from `Prediction.groups`, one Wilson row each ({} when no prediction names a group).
    """
    if not predictions:
        raise InputError("accuracy_table got no predictions; there is nothing to score (was the eval set empty?).")
    by_subtask: dict[str, list[Prediction]] = {}
    by_group: dict[str, list[Prediction]] = {}
    for p, name in zip(predictions, row_names(predictions), strict=True):
        by_subtask.setdefault(name, []).append(p)
        for group in p.groups:
            by_group.setdefault(group, []).append(p)

    subtasks = {name: _count_row(by_subtask[name]) for name in sorted(by_subtask)}
    micro = _count_row(predictions)
    # macro weighs every sub-task equally, so small sub-tasks are not drowned by large ones
    real = [row for name, row in subtasks.items() if name != UNREADABLE] or list(subtasks.values())
    macro = {
        "accuracy": sum(row["accuracy"] for row in real) / len(real),
        "ci": list(macro_interval(real)),
        "chance": sum(row["chance"] for row in real) / len(real),
        "subtasks": len(real),
    }
    groups = {name: _count_row(by_group[name]) for name in sorted(by_group)}
    unscored = [{"sample_id": p.sample_id, "reason": p.reason} for p in predictions if p.reason is not None]
    return {"subtasks": subtasks, "micro": micro, "macro": macro, "groups": groups, "unscored": unscored}


def write_results(out_dir: str | Path, predictions: Sequence[Prediction], extra: dict | None = None) -> dict:
    """Score `predictions` and write results.json, results.csv, predictions.jsonl and accuracy.png to `out_dir`.

    results.json is the `accuracy_table` with `extra` (e.g. the checkpoint path) merged in at the top
    level; `extra` may not reuse the table's keys. results.csv has one row per sub-task, then micro,
    macro and the groups, with columns subtask, n, correct, accuracy, ci_low, ci_high, chance,
    unanswered. The bar
    chart has the 95% intervals as error bars. Returns the accuracy table (without `extra`).
    """
    table = accuracy_table(predictions)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(table))
    if clash:
        raise InputError(f"write_results extra keys {clash} would overwrite the accuracy table's keys.")
    out = as_path(out_dir)  # a local directory or a URL (gs://...): each file is written whole
    out.mkdir(parents=True, exist_ok=True)

    (out / "results.json").write_text(json.dumps({**table, **extra}, indent=2) + "\n")

    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["subtask", "n", "correct", "accuracy", "ci_low", "ci_high", "chance", "unanswered"])

    def line(name: str, row: dict, counts: bool = True) -> None:
        # macro is a mean of ratios: it has no sample, correct or unanswered count of its own
        n, correct, unanswered = (row["n"], row["correct"], row["unanswered"]) if counts else ("", "", "")
        writer.writerow([name, n, correct, row["accuracy"], row["ci"][0], row["ci"][1], row["chance"], unanswered])

    for name, row in table["subtasks"].items():
        line(name, row)
    line("micro", table["micro"])
    line("macro", table["macro"], counts=False)
    for name, row in table["groups"].items():
        line(name, row)
    (out / "results.csv").write_bytes(rows.getvalue().encode())  # bytes: the csv module's \r\n kept as written

    (out / "predictions.jsonl").write_text(
        "".join(json.dumps({**dataclasses.asdict(p), "correct": p.correct}) + "\n" for p in predictions))

    _plot_accuracy(table, out / "accuracy.png")
    return table


def compare_table(columns: dict[str, dict], chance: bool = True) -> str:
    """Plain-text table of any number of stages' accuracy tables (keyed by stage name, in that order).

    One row per sub-task (union over stages, sorted), then micro and macro rows, then one row per group
    when a stage has groups (e.g. "vlm4d/real"); columns are subtask, n, chance (unless `chance=False`),
    one column per stage, each cell "acc% [lo, hi]" (the 95% interval, in percent), and "no letter": the
    questions each stage answered without an option letter, "/"-joined in column order. A stage without a
    sub-task shows "-"; when stages scored different sample counts, n shows them all ("10/12"). A last
    line counts the unscored questions of each stage that has any (they are counted wrong above).
    """
    stages = _check_columns(columns)
    header = ["subtask", "n"] + (["chance"] if chance else []) + stages + ["no letter"]

    def body_line(name: str, rows: dict[str, dict | None], with_n: bool = True) -> list[str]:
        present = [r for r in rows.values() if r is not None]
        line = [name, _join_counts(r["n"] for r in present) if with_n else ""]
        if chance:
            line.append(_pct(present[0]["chance"]))
        # questions answered with no letter, per stage in column order ("-" where a stage lacks the row)
        unanswered = "/".join("-" if rows[s] is None else str(rows[s].get("unanswered", 0)) for s in stages)
        return line + [_cell(rows[s]) for s in stages] + [unanswered if with_n else ""]

    body = [body_line(name, {s: columns[s]["subtasks"].get(name) for s in stages}) for name in _subtask_names(columns)]
    totals = [body_line("micro", {s: columns[s]["micro"] for s in stages}),
              body_line("macro", {s: columns[s]["macro"] for s in stages}, with_n=False)]
    groups = [body_line(name, {s: columns[s].get("groups", {}).get(name) for s in stages})
              for name in _group_names(columns)]

    widths = [max(len(line[i]) for line in [header, *body, *totals, *groups]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        # sub-task names read left to right; numbers line up on the right
        cells = zip(line, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule, *(fmt(line) for line in body), rule, *(fmt(line) for line in totals)]
    if groups:
        lines += [rule, *(fmt(line) for line in groups)]
    unscored = {s: len(columns[s].get("unscored", ())) for s in stages}
    if any(unscored.values()):
        lines.append("unscored (counted wrong): " + ", ".join(f"{s} {k}" for s, k in unscored.items() if k))
    return "\n".join(lines)


def merge_stage_results(columns: dict[str, dict]) -> dict:
    """Several stages' accuracy tables (any number, keyed by stage name) as one results.json.

    Layout, stages in the order given, accuracies and interval ends as fractions::

        {"subtasks": {name: {"n", "chance", <stage>: acc, ..., "ci": {<stage>: [lo, hi], ...},
                             "unanswered": {<stage>: count, ...}}},
         "micro": {"n", "chance", <stage>: acc, ..., "ci": {<stage>: [lo, hi], ...}, "unanswered": {...}},
         "macro": {"chance", <stage>: acc, ..., "ci": {<stage>: [lo, hi], ...}}}

    e.g. {"subtasks": {"abs_dis": {"n": 12, "chance": 0.25, "blind": 0.25, "dift": 0.5, "rl": 0.58,
    "ci": {"blind": [...], "dift": [...], "rl": [...]}}}, ...}. A sub-task missing from a stage gets None
    for that stage (and its "ci"). n and chance come from the first stage that has the row; if the stages
    scored different sample counts, the row also gets "n_by_stage". When any stage has groups (VLM4D
    splits), a "groups" entry with the same row layout follows.
    """
    stages = _check_columns(columns)
    clash = sorted(set(stages) & set(_RESERVED))
    if clash:
        raise InputError(f"merge_stage_results stage names {clash} clash with the result keys {list(_RESERVED)}.")

    def merged(rows: dict[str, dict | None], with_n: bool = True) -> dict:
        present = {s: r for s, r in rows.items() if r is not None}
        first = next(iter(present.values()))
        out: dict = {"n": first["n"]} if with_n else {}
        out["chance"] = first["chance"]
        out.update({s: (r["accuracy"] if r is not None else None) for s, r in rows.items()})
        out["ci"] = {s: (_interval(r) if r is not None else None) for s, r in rows.items()}
        if with_n:
            out["unanswered"] = {s: (r.get("unanswered", 0) if r is not None else None) for s, r in rows.items()}
        if with_n and len({r["n"] for r in present.values()}) > 1:
            out["n_by_stage"] = {s: r["n"] for s, r in present.items()}
        return out

    result = {
        "subtasks": {name: merged({s: columns[s]["subtasks"].get(name) for s in stages})
                     for name in _subtask_names(columns)},
        "micro": merged({s: columns[s]["micro"] for s in stages}),
        "macro": merged({s: columns[s]["macro"] for s in stages}, with_n=False),
    }
    groups = _group_names(columns)
    if groups:
        result["groups"] = {name: merged({s: columns[s].get("groups", {}).get(name) for s in stages})
                            for name in groups}
    return result


def plot_stages(columns: dict[str, dict], path: str | Path) -> None:
    """Grouped bar chart: one group per sub-task, one bar per stage (any number, in the order given) with
    its 95% interval as an error bar, and a dashed chance line across each group."""
    stages = _check_columns(columns)
    names = _subtask_names(columns)
    fig, ax = _figure(len(names) * max(1, len(stages)) * 0.35)
    group = 0.8  # width of a group of bars, out of 1 per sub-task
    width = group / len(stages)
    for k, stage in enumerate(stages):
        rows = columns[stage]["subtasks"]
        xs = [i for i, name in enumerate(names) if name in rows]
        micro = columns[stage]["micro"]["accuracy"]
        shown = [rows[names[x]] for x in xs]
        ax.bar([x - group / 2 + (k + 0.5) * width for x in xs], [r["accuracy"] for r in shown],
               width=width, label=f"{stage} (micro {_pct(micro)})", yerr=_error_bars(shown), capsize=2,
               error_kw={"linewidth": 0.8})
    for i, name in enumerate(names):
        chance = next(columns[s]["subtasks"][name]["chance"] for s in stages if name in columns[s]["subtasks"])
        ax.hlines(chance, i - group / 2, i + group / 2, colors="black", linestyles="dashed", linewidth=1,
                  label="chance" if i == 0 else None)
    _finish(ax, names, "accuracy per sub-task by stage (bars: 95% Wilson intervals)")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def _plot_accuracy(table: dict, path: Path) -> None:
    """One bar per sub-task with its 95% interval as an error bar and its chance level as a dashed marker;
    micro/macro in the title."""
    names = list(table["subtasks"])
    fig, ax = _figure(len(names) * 0.6)
    rows = [table["subtasks"][n] for n in names]
    ax.bar(range(len(names)), [r["accuracy"] for r in rows], width=0.7, color="tab:blue", label="accuracy",
           yerr=_error_bars(rows), capsize=3, error_kw={"linewidth": 0.8})
    for i, r in enumerate(rows):
        ax.hlines(r["chance"], i - 0.35, i + 0.35, colors="black", linestyles="dashed", linewidth=1,
                  label="chance" if i == 0 else None)
    micro, macro = table["micro"], table["macro"]
    _finish(ax, names, f"micro {_cell(micro)} (chance {_pct(micro['chance'])}), "
                       f"macro {_cell(macro)} (chance {_pct(macro['chance'])}), n={micro['n']}; bars: 95% intervals")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def _figure(bars_width: float):
    # A bare Figure on an Agg canvas: no pyplot global state, no display needed, safe next to other plots.
    # matplotlib is heavy and only the plots need it, so it is imported here.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.5 + bars_width), 4.0))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(ax, names: list[str], title: str) -> None:
    ax.set_xticks(range(len(names)))
    # sub-task names are long ("object_relative_direction"): rotate rather than overlap
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    # headroom above 1.0 keeps the legend off the bars
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: str | os.PathLike) -> None:
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    image = io.BytesIO()  # rendered in memory, then written as one file (local or gs://)
    fig.savefig(image, format=path.suffix.lstrip(".") or "png", dpi=90)
    path.write_bytes(image.getvalue())


def _check_columns(columns: dict[str, dict]) -> list[str]:
    if not columns:
        raise InputError("No stage results to compare; pass at least one accuracy table keyed by stage name.")
    return list(columns)


def _subtask_names(columns: dict[str, dict]) -> list[str]:
    return sorted({name for table in columns.values() for name in table["subtasks"]})


def _group_names(columns: dict[str, dict]) -> list[str]:
    return sorted({name for table in columns.values() for name in table.get("groups", {})})


def _interval(row: dict) -> list[float] | None:
    """A row's 95% interval: its "ci", else the Wilson interval of its counts (tables written before
    intervals existed), else None (a macro row without one)."""
    if row.get("ci") is not None:
        return [float(row["ci"][0]), float(row["ci"][1])]
    if "correct" in row and "n" in row:
        return list(wilson_interval(int(row["correct"]), int(row["n"])))
    return None


def _error_bars(rows: Sequence[dict]) -> list[list[float]]:
    """matplotlib yerr [[below...], [above...]] of the rows' intervals around their accuracies."""
    spans = [_interval(r) or [r["accuracy"], r["accuracy"]] for r in rows]
    return [[max(0.0, r["accuracy"] - lo) for r, (lo, _) in zip(rows, spans, strict=True)],
            [max(0.0, hi - r["accuracy"]) for r, (_, hi) in zip(rows, spans, strict=True)]]


def _cell(row: dict | None) -> str:
    """"31.2% [27.1, 35.6]": an accuracy and its 95% interval in percent; "-" for a missing row."""
    if row is None:
        return "-"
    interval = _interval(row)
    if interval is None:
        return _pct(row["accuracy"])
    return f"{_pct(row['accuracy'])} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _join_counts(counts) -> str:
    # de-duplicate in stage order: equal counts show once, differing ones all
    return "/".join(str(n) for n in dict.fromkeys(counts))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"
