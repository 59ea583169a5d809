"""`fourd-jax plot WORKDIR`: training curves from metrics.jsonl as PNG files."""

from __future__ import annotations

import io
import json
import os

from etils import epath

from fourd_jax.errors import InputError
from fourd_jax.files import as_path

PANELS = (("loss", "ce", "latent_loss", "val_loss", "val_ce", "val_latent_loss"),
          ("reward", "reward_accuracy", "reward_format"), ("kl", "logprob_drift"),
          ("grad_norm",), ("lr",), ("tokens_per_s",))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = as_path(workdir) / "metrics.jsonl"  # a local workdir or a URL (gs://...)
    if not path.exists():
        raise InputError(f"{path} does not exist (is {workdir} a training workdir?).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def panel_series(rows: list[dict]) -> list[list[tuple[str, list[tuple[int, float]], str | None]]]:
    """For each panel with data, its series: (metric, [(step, value)], marker). The latent loss leaves
    out batches without imagery (it is undefined there); validation runs only at checkpoints, so its
    points are marked and even a single one shows."""
    panels = []
    for keys in PANELS:
        series = []
        for key in keys:
            points = [(r["step"], r[key]) for r in rows
                      if r.get(key) is not None and not (key == "latent_loss" and r.get("latent_targets") == 0)]
            if points:
                series.append((key, points, "o" if key.startswith("val_") or len(points) == 1 else None))
        if series:
            panels.append(series)
    return panels


def plot_metrics(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[epath.Path]:
    """One PNG with a panel per metric group; returns the files written."""
    # matplotlib is heavy and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panel_series(read_metrics(workdir))
    if not panels:
        raise InputError(f"{as_path(workdir) / 'metrics.jsonl'} holds no metrics to plot.")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, series in zip(axes[:, 0], panels, strict=True):
        for key, points, marker in series:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker=marker, markersize=4)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = as_path(out or as_path(workdir) / "curves.png")
    image = io.BytesIO()  # rendered in memory, then written as one file (local or gs://)
    fig.savefig(image, format=path.suffix.lstrip(".") or "png", dpi=90)
    plt.close(fig)
    path.write_bytes(image.getvalue())
    return [path]
