"""The answer language of DSR Suite (SPEC 4): a distance or speed series, direction vectors or two
compared speed series, segmented into runs and rendered as numbered phrases.

- Magnitudes (eps 0.2): a constant run holds while values stay within +-20% of its first value;
  rising and falling runs go step by step. A falling run may step down to a value below the 0.1
  floor but not continue from one: SPEC's "each value >= 0.1" read as "each value a fall starts
  from". Without that, a drop such as [1, 0.05] would fit no rule. Band edges are inclusive
  ([0.8 v, 1.2 v] is constant, compared with a 1e-9 relative tolerance so decimal edges such as
  1.5 -> 1.8 stay in), so every step fits exactly one rule.
- Directions (eps 0.3) are codes such as "Front|Left" in agent axes (x forward, y left, z up).
  Every non-zero vector gets one: after normalising, its largest component is at least
  1/sqrt(3) > 0.3. A vector shorter than ZERO_LENGTH has no direction and is rejected.
- Speed comparisons label each step "former", "same" or "latter" (which is faster, ratio 1.2).

`DESCRIBERS` gives, per kind of key, its segmenter, its renderer and random data of the same
shape (for distractors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fourd_jax.errors import InputError

MAGNITUDE_EPS = 0.2
DIRECTION_EPS = 0.3
SPEED_RATIO = 1.2
FLOOR = 0.1
ZERO_LENGTH = 1e-6  # metres (or unit-vector length): shorter vectors have no direction
RANDOM_MAGNITUDE_MAX = 2.0
AXIS_WORDS = (("Front", "Behind"), ("Left", "Right"), ("Above", "Below"))

# Ratio edges are compared with this relative tolerance. 1.2 * 1.5 is 1.7999999999999998 in binary
# floating point, so a plain `1.8 <= 1.2 * 1.5` puts a value exactly on the +20% edge out of the
# band (and makes it "rising"), while upstream's values, rounded to 0.1, keep decimal edges such as
# 1.5 -> 1.8, 1.0 -> 1.2, 2.0 -> 2.4 and 1.0 -> 0.8 in the band. A value within EDGE_RTOL (relative
# to the bound) of `ratio * ref` counts as *on* the edge: inside the constant band, and neither
# rising (> 1.2x, strict) nor falling (< 0.8x, strict). 1e-9 is far above float64 rounding of one
# product (~1e-16) and far below any real difference the 0.1-rounded data can express.
EDGE_RTOL = 1e-9


def _above(x: float, bound: float) -> bool:
    """x > bound, by more than the edge tolerance (bound = ratio * a non-negative value)."""
    return x > bound + EDGE_RTOL * bound


def _below(x: float, bound: float) -> bool:
    """x < bound, by more than the edge tolerance (bound = ratio * a non-negative value)."""
    return x < bound - EDGE_RTOL * bound


def magnitude_segments(values: Sequence[float]) -> list[str]:
    """Phrases (without numbering) for a distance or speed series, SPEC 4 rules with eps 0.2.

    A constant run holds while values stay in [0.8, 1.2] x its first value (or both are < 0.1);
    a rising run continues while each value is > 1.2 x the previous and ends at its peak; a
    falling run continues while each value is < 0.8 x the previous and the previous is >= 0.1.
    Values on an edge (within `EDGE_RTOL` of it, e.g. 1.5 -> 1.8) are in the band, neither rising
    nor falling.
    """
    v = [float(x) for x in values]
    if len(v) < 2 or not all(np.isfinite(x) and x >= 0 for x in v):
        raise InputError(f"a magnitude series needs at least 2 finite non-negative values, got {v}.")
    lo, hi = 1.0 - MAGNITUDE_EPS, 1.0 + MAGNITUDE_EPS
    last = len(v) - 1

    def in_band(x: float, start: float) -> bool:
        return not (_above(x, hi * start) or _below(x, lo * start)) or (x < FLOOR and start < FLOOR)

    phrases: list[str] = []
    i = 0
    while i < last:
        start = v[i]
        j = i + 1
        while j <= last and in_band(v[j], start):
            j += 1
        if j > i + 1:
            if j > last:
                phrases.append("Keep nearly constant.")
            else:
                phrases.append(f"Keep nearly constant and then become {'larger' if v[j] > start else 'smaller'}.")
            i = j  # the next run starts at the first value out of the band
        elif _above(v[i + 1], hi * start):
            j = i + 1
            while j < last and _above(v[j + 1], hi * v[j]):
                j += 1
            phrases.append("Become larger.")
            i = j  # the next run starts at the peak
        else:
            # Out of the band and not rising means v[i+1] < lo * start with start >= FLOOR.
            j = i + 1
            while j < last and v[j] >= FLOOR and _below(v[j + 1], lo * v[j]):
                j += 1
            phrases.append("Become smaller.")
            i = j
    return phrases


def direction_codes(vectors: np.ndarray) -> list[str]:
    """Direction codes ("Front|Left", ...) of vectors [K, 3] in agent axes, equal neighbours merged.

    Each vector is normalised; a component > 0.3 or < -0.3 names Front/Behind (x), Left/Right
    (y), Above/Below (z), joined by "|" in that order. Raises InputError for a vector shorter
    than ZERO_LENGTH (it has no direction); any longer vector has a code.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != 3 or len(vectors) == 0:
        raise InputError(f"direction vectors must be [K, 3] with K >= 1, got shape {vectors.shape}.")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(norms >= ZERO_LENGTH):
        raise InputError(f"direction vector {int(np.argmin(norms))} is (nearly) zero and has no direction.")
    codes: list[str] = []
    for unit in vectors / norms[:, None]:
        words = [pos if c > 0 else neg
                 for c, (pos, neg) in zip(unit, AXIS_WORDS, strict=True) if abs(c) > DIRECTION_EPS]
        code = "|".join(words)
        if not codes or codes[-1] != code:
            codes.append(code)
    return codes


def speed_comparison_runs(former: Sequence[float], latter: Sequence[float]) -> list[str]:
    """Per-step labels "former" / "same" / "latter" (which is faster), equal neighbours merged.

    Both < 0.1 is "same"; otherwise former > 1.2 x latter is "former", latter > 1.2 x former is
    "latter" (ratio < 1/1.2 without dividing by a zero speed), anything else "same".
    """
    a = np.asarray(former, dtype=np.float64)
    b = np.asarray(latter, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise InputError(f"speed series must be 1-D of equal non-zero length, got {a.shape} and {b.shape}.")
    runs: list[str] = []
    for x, y in zip(a, b, strict=True):
        if x < FLOOR and y < FLOOR:
            label = "same"
        elif x > SPEED_RATIO * y:
            label = "former"
        elif y > SPEED_RATIO * x:
            label = "latter"
        else:
            label = "same"
        if not runs or runs[-1] != label:
            runs.append(label)
    return runs


def _numbered(phrases: Sequence[str]) -> str:
    return " ".join(f"({k}) {p}" for k, p in enumerate(phrases, start=1))


def _render_directions(codes: Sequence[str]) -> str:
    return _numbered([f"{code}." for code in codes])


# Upstream writes the single-run latter case as "The latter is always faster." without "(1)";
# we number it like the other single-run phrases so no option gives itself away by its form.
_SINGLE_RUN = {
    "former": "The former is always faster.", "same": "Their speed is nearly the same.",
    "latter": "The latter is always faster.",
}
_MULTI_RUN = {"former": "The former is faster.", "same": "Nearly the same.", "latter": "The latter is faster."}


def _render_comparison(runs: Sequence[str]) -> str:
    table = _SINGLE_RUN if len(runs) == 1 else _MULTI_RUN
    return _numbered([table[r] for r in runs])


def describe_magnitudes(values: Sequence[float]) -> str:
    """SPEC 4 text for a distance or speed series, e.g. "(1) Become larger. (2) Keep nearly constant."."""
    return _numbered(magnitude_segments(values))


def describe_directions(vectors: np.ndarray) -> str:
    """SPEC 4 text for direction vectors [K, 3] in agent axes, e.g. "(1) Front|Left. (2) Right|Above."."""
    return _render_directions(direction_codes(vectors))


def describe_speed_comparison(former: Sequence[float], latter: Sequence[float]) -> str:
    """SPEC 4 text comparing two speed series step by step, e.g. "(1) The former is always faster."."""
    return _render_comparison(speed_comparison_runs(former, latter))


@dataclasses.dataclass(frozen=True)
class _Describer:
    """How one kind of key is segmented, rendered and imitated with random data."""

    segments: Callable[[Any], list[str]]
    render: Callable[[Sequence[str]], str]
    random_like: Callable[[np.random.Generator, Any], Any]


DESCRIBERS = {
    "magnitude": _Describer(
        magnitude_segments, _numbered, lambda rng, v: rng.uniform(0.0, RANDOM_MAGNITUDE_MAX, size=len(v))),
    "direction": _Describer(
        direction_codes, _render_directions, lambda rng, v: rng.uniform(-1.0, 1.0, size=np.shape(v))),
    "comparison": _Describer(
        lambda pair: speed_comparison_runs(*pair), _render_comparison,
        lambda rng, pair: tuple(rng.uniform(0.0, RANDOM_MAGNITUDE_MAX, size=len(pair[0])) for _ in range(2))),
}
