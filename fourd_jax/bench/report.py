"""Recording benchmark results: one markdown table per benchmark in docs/PERFORMANCE.md.

Each run appends a row, so results can be compared over time and across machines.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import jax

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "PERFORMANCE.md"


def machine() -> str:
    """A short description of where a benchmark ran."""
    kinds = sorted({d.device_kind for d in jax.devices()})
    return f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {'/'.join(kinds)}"


def record(section: str, description: str, row: dict[str, object], path: Path | None = None) -> Path:
    """Append `row` to the table under `## section`, creating the file or section if needed."""
    path = Path(path or os.environ.get("FOURD_JAX_PERF_FILE", DEFAULT_PATH))
    row = {"date": datetime.date.today().isoformat(), "machine": machine(), **row}
    header = "| " + " | ".join(row) + " |"
    line = "| " + " | ".join(str(v) for v in row.values()) + " |"
    intro = "# Performance\n\nEach benchmark prints a ratio against a baseline measured in the same run.\n"
    text = path.read_text() if path.exists() else intro
    title = f"## {section}"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{description}\n\n{header}\n|{'---|' * len(row)}\n{line}\n"
    else:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        end = len(text) if end < 0 else end + 1
        before, block, after = text[:start], text[start:end].rstrip("\n"), text[end:]
        if header not in block:  # columns changed: start a new table under the same heading
            block += f"\n\n{header}\n|{'---|' * len(row)}"
        text = before + block + "\n" + line + "\n" + ("\n" + after if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
