"""`fourd-jax data inspect DIR`: what a record directory holds, and a picture of one sample.

Counts records per family/sub-task and the balance of key letters, checks every record against
the schema (reporting bad ones by file and index), and draws one sample as a PNG contact sheet:
its frames, its imagery images, the question with options, and the trace.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fourd_jax.data import records
from fourd_jax.data.taxonomy import LETTERS
from fourd_jax.errors import InputError


def summarize(path: str | Path) -> dict[str, Any]:
    """Counts per family/sub-task and answer letter, and the records that fail to decode."""
    per_task: Counter = Counter()
    letters: Counter = Counter()
    bad: list[str] = []
    for file, index, data in records.read_raw(path):
        try:
            sample = records.decode(data, decode_images=False)
        except records.RecordError as e:
            bad.append(f"{file} record {index}: {e}")
            continue
        per_task[f"{sample['family']}/{sample['subtask']}"] += 1
        letters[sample["answer"]] += 1
    total = sum(letters.values())
    return {
        "records": total,
        "bad_records": bad,
        "per_subtask": dict(sorted(per_task.items())),
        "answer_letters": {k: letters[k] for k in LETTERS},
        "answer_letter_share": {k: round(letters[k] / total, 3) if total else 0.0 for k in LETTERS},
    }


def first_sample(path: str | Path, with_imagery: bool = True) -> dict[str, Any]:
    """The first decodable record (preferring one with imagery images)."""
    fallback = None
    for _, _, data in records.read_raw(path):
        try:
            sample = records.decode(data)
        except records.RecordError:
            continue
        if not with_imagery or sample["imagery"]:
            return sample
        fallback = fallback or sample
    if fallback is None:
        raise records.RecordError(f"{path} holds no decodable record.")
    return fallback


def contact_sheet(sample: dict[str, Any], out_path: str | Path, max_frames: int = 8) -> Path:
    """Draw frames, imagery, question and trace of one sample into a PNG (its directory is made if
    missing)."""
    out_path = Path(out_path)
    if any(parent.exists() and not parent.is_dir() for parent in out_path.parents):
        raise InputError(f"--sheet {out_path} cannot be written: a parent of it is a file.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib  # local: heavy, and only the contact sheet draws

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    frames = [sample["frames"][i] for i in sample["shown_frames"]]
    picks = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    images = [(f"frame {int(i)} ({sample['timestamps'][i]:.1f}s)", frames[int(i)]) for i in picks]
    images += [(f"imagery {k + 1}", img) for k, img in enumerate(sample["imagery"])]
    cols = 4
    rows = -(-len(images) // cols)
    text_height = 2.6  # inches under the images for question, options and trace
    fig = plt.figure(figsize=(3 * cols, 3 * rows + text_height))
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=text_height / (3 * rows + text_height) + 0.01)
    for k, (title, img) in enumerate(images):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, sample["options"], strict=True))
    text = (f"[{sample['family']} / {sample['subtask']}]  answer {sample['answer']}\n"
            + "\n".join(textwrap.wrap(sample["question"], 110)) + "\n" + options + "\n\n"
            + "\n".join(textwrap.wrap(sample["trace"], 130)[:12]))
    fig.text(0.02, 0.01, text, fontsize=8, family="monospace", va="bottom")
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path
