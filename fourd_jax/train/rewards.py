"""Rule-based rewards for GRPO (4DRL).

Everything here is plain Python (numpy for one norm) and works on the *decoded* completion with
special tokens kept, so latent tokens and tags are visible to the rules.

4DThinker (reward = accuracy_weight * accuracy + format_weight * format, weights 1.0 / 0.2):
  - `fourdthinker_accuracy`: 1.0 iff the option letter read from the completion equals the first
    character of the solution ("D" or "D. Pan Right" -> "D").
  - `fourdthinker_format`: 1.0 iff `<think>...</think>` followed (after whitespace) by
    `<answer>...</answer>` occurs anywhere.
  - `fourdthinker_reward`: both components and the weighted total.
  The letter is read by `fourd_jax.answers.read_letter`, the rule evaluation's `extract_choice` uses
  too (without its extra try on the text with the latent tokens removed).

MLLM-4D ST-reward (reward = 0.2 format + 0.6 accuracy + 0.1 camera + 0.1 object, maximum 1.0):
  - `st_format`: 0.5 for `<thinking>` and `<answer>` spans, 0.4 for object and camera centres,
    0.1 for a thinking span longer than 20 characters (tags included).
  - `st_accuracy`: exact string match of the answer span against the answer.
  - `parse_centers` / `center_score`: the `Camera Center: [...]` / `Object Center: [...]` lists of
    the completion and exp(-mean distance) to the true centres (unknown `null` centres dropped on
    both sides before pairing).
  - `st_reward`: all components and the weighted total.

`FourDThinkerWeights` and `STRewardWeights` hold the default weights; every reward returns a dict
of its components plus the total under "reward".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fourd_jax.answers import read_letter, solution_key

FOURDTHINKER_LETTERS = "ABCDEF"
_FOURDTHINKER_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

_ST_THINKING = re.compile(r"<thinking>.*?</thinking>", re.DOTALL)
_ST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ST_CENTER = {label: re.compile(label + r":\s*\[.*?\]", re.DOTALL) for label in ("Object Center", "Camera Center")}
# A thinking span (tags included) must be longer than this for the last 0.1 of the ST format score.
ST_MIN_THINKING_CHARS = 20


@dataclass(frozen=True)
class FourDThinkerWeights:
    """Weights of the 4DThinker reward (config defaults: accuracy 1.0, format 0.2)."""

    accuracy: float = 1.0
    format: float = 0.2


@dataclass(frozen=True)
class STRewardWeights:
    """Weights of the MLLM-4D ST-reward; the defaults sum to 1.0, the maximum reward."""

    format: float = 0.2
    accuracy: float = 0.6
    camera: float = 0.1
    object: float = 0.1


_FOURDTHINKER_DEFAULTS = FourDThinkerWeights()
_ST_DEFAULTS = STRewardWeights()


# ---------------------------------------------------------------------------------------------
# 4DThinker


def fourdthinker_accuracy(completion: str, solution: str) -> float:
    """1.0 iff the letter read from the completion (A-F) equals the solution's key letter, else 0.0."""
    key = solution_key(solution)
    predicted = read_letter(completion, FOURDTHINKER_LETTERS, strip_latents=False)
    return 1.0 if key and predicted == key else 0.0


def fourdthinker_format(completion: str) -> float:
    """1.0 iff `<think>...</think>` then (after optional whitespace) `<answer>...</answer>` occurs anywhere."""
    return 1.0 if _FOURDTHINKER_FORMAT.search(completion) else 0.0


def fourdthinker_reward(
    completion: str,
    solution: str,
    accuracy_weight: float = _FOURDTHINKER_DEFAULTS.accuracy,
    format_weight: float = _FOURDTHINKER_DEFAULTS.format,
) -> dict[str, float]:
    """The 4DThinker reward: {"accuracy", "format", "reward"} with reward the weighted sum."""
    accuracy = fourdthinker_accuracy(completion, solution)
    form = fourdthinker_format(completion)
    return {"accuracy": accuracy, "format": form, "reward": accuracy_weight * accuracy + format_weight * form}


# ---------------------------------------------------------------------------------------------
# MLLM-4D ST-reward


def st_format(completion: str) -> float:
    """0.5 (thinking and answer spans) + 0.4 (object and camera centres) + 0.1 (thinking > 20 chars)."""
    score = 0.0
    thinking = _ST_THINKING.search(completion)
    if thinking and _ST_ANSWER.search(completion):
        score += 0.5
    if all(pattern.search(completion) for pattern in _ST_CENTER.values()):
        score += 0.4
    # Tags included, as upstream measures it: an empty `<thinking></thinking>` is already 21 chars.
    if thinking and len(thinking.group(0)) > ST_MIN_THINKING_CHARS:
        score += 0.1
    return score


def st_accuracy(completion: str, answer: str) -> float:
    """1.0 iff the stripped first `<answer>` span (else the stripped completion) equals `answer` exactly."""
    match = _ST_ANSWER.search(completion)
    predicted = match.group(1).strip() if match else completion.strip()
    return 1.0 if predicted == answer else 0.0


def parse_centers(completion: str, label: str) -> list[list[float]]:
    """Every `<label>: [x, y, z]` list in the completion, in order; `null` entries are skipped.

    Any list that does not parse as finite numbers empties the result (one bad entry voids all,
    so a malformed trace cannot score on the entries that happened to parse).
    """
    centers = []
    for match in re.finditer(re.escape(label) + r":\s*(\[.*?\]|null)", completion, re.DOTALL):
        text = match.group(1)
        if text == "null":
            continue
        try:
            values = json.loads(text)
        except ValueError:
            return []
        # Booleans are ints to Python and NaN/inf would make the reward non-finite: both are errors.
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return []
        centers.append([float(v) for v in values])
    return centers


def known_centers(truth: Sequence[Sequence[float] | None] | None) -> list[Sequence[float]]:
    """The true centres without their unknown (`None`, JSON `null`) entries, in order.

    MLLM-4D's data writes `null` for an unknown initial or final centre; upstream drops those entries
    before pairing, exactly as `parse_centers` drops `null` predictions. `None` for the whole list
    means nothing is known.
    """
    return [] if truth is None else [g for g in truth if g is not None]


def center_score(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float] | None] | None) -> float:
    """exp(-mean_i ||p_i - g_i||) over paired centres; 1.0 / 0.0 for empty truth; 0.0 on any mismatch.

    Unknown true centres (`None` entries) are dropped first (`known_centers`), so truth
    `[[1, 2, 3], None]` pairs with a single predicted centre. Truth with nothing known scores 1.0
    iff nothing was predicted. A different count, or a predicted vector of another length than its
    true one, scores 0.0.
    """
    truth = known_centers(truth)
    if len(truth) == 0:
        return 1.0 if len(predicted) == 0 else 0.0
    if len(predicted) != len(truth):
        return 0.0
    if any(len(p) != len(g) for p, g in zip(predicted, truth, strict=True)):
        return 0.0
    pairs = zip(predicted, truth, strict=True)
    distances = [float(np.linalg.norm(np.subtract(p, g, dtype=np.float64))) for p, g in pairs]
    return math.exp(-sum(distances) / len(distances))


def st_reward(
    completion: str,
    answer: str,
    camera_centers: Sequence[Sequence[float] | None] | None,
    object_centers: Sequence[Sequence[float] | None] | None,
    format_weight: float = _ST_DEFAULTS.format,
    accuracy_weight: float = _ST_DEFAULTS.accuracy,
    camera_weight: float = _ST_DEFAULTS.camera,
    object_weight: float = _ST_DEFAULTS.object,
) -> dict[str, float]:
    """The MLLM-4D ST-reward: {"format", "accuracy", "camera", "object", "reward"}.

    `camera_centers` / `object_centers` are the true (initial, final) centres as 3-vectors; an
    unknown centre is `None` (MLLM-4D's `null`) and is dropped before pairing, and an empty list (or
    `None`) means neither is known. The reward is the weighted sum of the components (1.0 at most by
    default).
    """
    parts = {
        "format": st_format(completion),
        "accuracy": st_accuracy(completion, answer),
        "camera": center_score(parse_centers(completion, "Camera Center"), camera_centers),
        "object": center_score(parse_centers(completion, "Object Center"), object_centers),
    }
    weights = {"format": format_weight, "accuracy": accuracy_weight, "camera": camera_weight, "object": object_weight}
    parts["reward"] = sum(weights[name] * value for name, value in parts.items())
    return parts
