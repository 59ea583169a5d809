"""Per-sub-task accuracy from extracted answers, and the files an evaluation run leaves behind.

This is the pure end of evaluation: it never sees a model. Generation and answer extraction produce
`Prediction`s; here they become an accuracy table (per sub-task, micro, macro, each next to its chance
level), written as JSON, CSV, JSONL and a bar chart, and several stages' tables (e.g. after DIFT and
after 4DRL) are set side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fourd_jax.errors import InputError

__all__ = ["Prediction", "accuracy_table", "compare_table", "merge_stage_results", "plot_stages", "write_results"]

# keys of merge_stage_results rows that are not stage names
_RESERVED = ("n", "chance", "n_by_stage")


@dataclass(frozen=True)
class Prediction:
    """One multiple-choice question after generation: the key letter and the letter extracted, if any."""

    sample_id: str
    family: str  # benchmark family: "dsr", "fourdthinker", "mllm4d", "vlm4d", ...
    subtask: str
    answer: str  # key letter
    predicted: str | None  # extracted letter, None when no answer could be extracted
    num_options: int = 4
    completion: str = ""

    def __post_init__(self) -> None:
        # chance is 1 / num_options, so it must be a positive count
        if self.num_options < 1:
            raise InputError(f"Prediction {self.sample_id!r} has num_options={self.num_options}; it must be >= 1.")

    @property
    def correct(self) -> bool:
        """True when the extracted letter is the key; an unanswered question (None) is wrong."""
        if self.predicted is None:
            return False
        # extraction may keep case or stray spaces ("b", " B"); the letter is what counts
        return self.predicted.strip().upper() == self.answer.strip().upper()


def accuracy_table(predictions: Sequence[Prediction]) -> dict:
    """Accuracy and chance per sub-task (names sorted), over all samples (micro) and per sub-task mean (macro).

    Chance of a sub-task is the mean of 1 / num_options over its samples, so sub-tasks mixing 4- and 5-way
    questions get the exact expected accuracy of uniform guessing.
    """
    if not predictions:
        raise InputError("accuracy_table got no predictions; there is nothing to score (was the eval set empty?).")
    groups: dict[str, list[Prediction]] = {}
    for p in predictions:
        groups.setdefault(p.subtask, []).append(p)

    subtasks = {}
    for name in sorted(groups):
        rows = groups[name]
        correct = sum(p.correct for p in rows)
        subtasks[name] = {
            "n": len(rows),
            "correct": correct,
            "accuracy": correct / len(rows),
            "chance": sum(1.0 / p.num_options for p in rows) / len(rows),
        }
    n = len(predictions)
    correct = sum(row["correct"] for row in subtasks.values())
    micro = {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "chance": sum(1.0 / p.num_options for p in predictions) / n,
    }
    # macro weighs every sub-task equally, so small sub-tasks are not drowned by large ones
    macro = {
        "accuracy": sum(row["accuracy"] for row in subtasks.values()) / len(subtasks),
        "chance": sum(row["chance"] for row in subtasks.values()) / len(subtasks),
        "subtasks": len(subtasks),
    }
    return {"subtasks": subtasks, "micro": micro, "macro": macro}


def write_results(out_dir: str | Path, predictions: Sequence[Prediction], extra: dict | None = None) -> dict:
    """Score `predictions` and write results.json, results.csv, predictions.jsonl and accuracy.png to `out_dir`.

    `extra` (e.g. the checkpoint path) is merged into results.json at the top level; it may not reuse the
    table's keys. Returns the accuracy table (without `extra`).
    """
    table = accuracy_table(predictions)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(table))
    if clash:
        raise InputError(f"write_results extra keys {clash} would overwrite the accuracy table's keys.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    (out / "results.json").write_text(json.dumps({**table, **extra}, indent=2) + "\n")

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subtask", "n", "correct", "accuracy", "chance"])
        for name, row in table["subtasks"].items():
            writer.writerow([name, row["n"], row["correct"], row["accuracy"], row["chance"]])
        micro, macro = table["micro"], table["macro"]
        writer.writerow(["micro", micro["n"], micro["correct"], micro["accuracy"], micro["chance"]])
        # macro is a mean of ratios: it has no sample or correct count of its own
        writer.writerow(["macro", "", "", macro["accuracy"], macro["chance"]])

    with open(out / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps({**dataclasses.asdict(p), "correct": p.correct}) + "\n")

    _plot_accuracy(table, out / "accuracy.png")
    return table


def compare_table(columns: dict[str, dict], chance: bool = True) -> str:
    """Plain-text table of several stages' accuracy tables (keyed by stage name), in percent.

    One row per sub-task (union over stages, sorted), then micro and macro rows; columns are subtask, n,
    chance (unless `chance=False`) and one accuracy column per stage, in the order of `columns`. A stage
    without a sub-task shows "-"; when stages scored different sample counts, n shows them all ("10/12").
    """
    stages = _check_columns(columns)
    header = ["subtask", "n"] + (["chance"] if chance else []) + stages
    body: list[list[str]] = []
    for name in _subtask_names(columns):
        rows = {s: columns[s]["subtasks"].get(name) for s in stages}
        present = [r for r in rows.values() if r is not None]
        line = [name, _join_counts(r["n"] for r in present)]
        if chance:
            line.append(_pct(present[0]["chance"]))
        line += [_pct(rows[s]["accuracy"]) if rows[s] is not None else "-" for s in stages]
        body.append(line)
    micro = [columns[s]["micro"] for s in stages]
    body.append(["micro", _join_counts(m["n"] for m in micro)] + ([_pct(micro[0]["chance"])] if chance else [])
                + [_pct(m["accuracy"]) for m in micro])
    macro = [columns[s]["macro"] for s in stages]
    body.append(["macro", ""] + ([_pct(macro[0]["chance"])] if chance else []) + [_pct(m["accuracy"]) for m in macro])

    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        # sub-task names read left to right; numbers line up on the right
        cells = zip(line, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule, *(fmt(line) for line in body[:-2]), rule, fmt(body[-2]), fmt(body[-1])]
    return "\n".join(lines)


def merge_stage_results(columns: dict[str, dict]) -> dict:
    """Several stages' accuracy tables as one results.json: per sub-task n, chance and each stage's accuracy.

    A sub-task missing from a stage gets None for that stage. n and chance come from the first stage that
    has the sub-task; if the stages scored different sample counts, the row also gets "n_by_stage".
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
        if with_n and len({r["n"] for r in present.values()}) > 1:
            out["n_by_stage"] = {s: r["n"] for s, r in present.items()}
        return out

    return {
        "subtasks": {name: merged({s: columns[s]["subtasks"].get(name) for s in stages})
                     for name in _subtask_names(columns)},
        "micro": merged({s: columns[s]["micro"] for s in stages}),
        "macro": merged({s: columns[s]["macro"] for s in stages}, with_n=False),
    }


def plot_stages(columns: dict[str, dict], path: str | Path) -> None:
    """Grouped bar chart: one group per sub-task, one bar per stage, a dashed chance line across each group."""
    stages = _check_columns(columns)
    names = _subtask_names(columns)
    fig, ax = _figure(len(names) * max(1, len(stages)) * 0.35)
    group = 0.8  # width of a group of bars, out of 1 per sub-task
    width = group / len(stages)
    for k, stage in enumerate(stages):
        rows = columns[stage]["subtasks"]
        xs = [i for i, name in enumerate(names) if name in rows]
        micro = columns[stage]["micro"]["accuracy"]
        ax.bar([x - group / 2 + (k + 0.5) * width for x in xs], [rows[names[x]]["accuracy"] for x in xs],
               width=width, label=f"{stage} (micro {_pct(micro)})")
    for i, name in enumerate(names):
        chance = next(columns[s]["subtasks"][name]["chance"] for s in stages if name in columns[s]["subtasks"])
        ax.hlines(chance, i - group / 2, i + group / 2, colors="black", linestyles="dashed", linewidth=1,
                  label="chance" if i == 0 else None)
    _finish(ax, names, "accuracy per sub-task by stage")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def _plot_accuracy(table: dict, path: Path) -> None:
    """One bar per sub-task with its chance level as a dashed marker; micro/macro in the title."""
    names = list(table["subtasks"])
    fig, ax = _figure(len(names) * 0.6)
    rows = [table["subtasks"][n] for n in names]
    ax.bar(range(len(names)), [r["accuracy"] for r in rows], width=0.7, color="tab:blue", label="accuracy")
    for i, r in enumerate(rows):
        ax.hlines(r["chance"], i - 0.35, i + 0.35, colors="black", linestyles="dashed", linewidth=1,
                  label="chance" if i == 0 else None)
    micro, macro = table["micro"], table["macro"]
    _finish(ax, names, f"micro {_pct(micro['accuracy'])} (chance {_pct(micro['chance'])}), "
                       f"macro {_pct(macro['accuracy'])} (chance {_pct(macro['chance'])}), n={micro['n']}")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def _figure(bars_width: float):
    # a bare Figure on an Agg canvas: no pyplot global state, no display needed, safe next to other plots
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


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _check_columns(columns: dict[str, dict]) -> list[str]:
    if not columns:
        raise InputError("No stage results to compare; pass at least one accuracy table keyed by stage name.")
    return list(columns)


def _subtask_names(columns: dict[str, dict]) -> list[str]:
    return sorted({name for table in columns.values() for name in table["subtasks"]})


def _join_counts(counts) -> str:
    # de-duplicate in stage order: equal counts show once, differing ones all
    return "/".join(str(n) for n in dict.fromkeys(counts))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"
