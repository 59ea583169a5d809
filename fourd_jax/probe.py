"""`fourd-jax probe`: can the camera's motion be read from the video at all? (rung (i) of docs/LEARNING.md)

Each scene's camera moves become six three-way labels, one per camera parameter (yaw, pitch,
roll, forward, right, up: decreasing / unchanged / increasing). Three readers are fitted on the
training scenes and scored on the held-out camera-motion questions, by choosing the option whose
moves have the highest summed log-probability:
  - pixel differences: a linear classifier on grey frame differences at 1/4 resolution (the floor);
  - the frozen random tower: a linear classifier on the merged tokens of the model's vision tower
    at its random initialisation;
  - a trained tower: the same tower and a linear head trained together on the labels.
The answers owe nothing to the language model, so a reader far above chance says the signal is in
the pixels and a tower of this size can extract it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fourd_jax.data import records
from fourd_jax.data.batching import media_arrays
from fourd_jax.data.processor import process
from fourd_jax.data.qa.fourdthinker import split_moves
from fourd_jax.data.taxonomy import MOVE_EFFECT
from fourd_jax.errors import InputError
from fourd_jax.eval.report import wilson_interval
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.inputs import vision_inputs
from fourd_jax.model.vision import VisionTower
from fourd_jax.model.vlm import Qwen25VL

CAMERA_PARAMS = ("yaw", "pitch", "roll", "forward", "right", "up")
BATCH = 16


def move_labels(moves: list[str]) -> np.ndarray:
    """[6] labels: 0 = the parameter decreases, 1 = unchanged, 2 = increases."""
    labels = np.ones(len(CAMERA_PARAMS), np.int32)
    for move in moves:
        param, sign = MOVE_EFFECT[move]
        labels[CAMERA_PARAMS.index(param)] = 2 if sign > 0 else 0
    return labels


@dataclasses.dataclass
class Scenes:
    """One entry per scene of a split: frames, labels, and its camera question (options, key) if any."""

    frames: list[np.ndarray]
    labels: np.ndarray
    questions: list[tuple[list[np.ndarray], int] | None]


def load_scenes(split_dir: Path) -> Scenes:
    seen: dict[int, int] = {}
    frames, labels, questions = [], [], []
    for r in records.read(split_dir):
        if r["scene_seed"] not in seen:
            seen[r["scene_seed"]] = len(frames)
            frames.append(np.asarray(r["frames"]))
            labels.append(move_labels([m for m, _ in r["camera_moves"]]))
            questions.append(None)
        if r["subtask"] == "camera_motion":
            options = [move_labels(split_moves(o)) for o in r["options"]]
            questions[seen[r["scene_seed"]]] = (options, "ABCD".index(r["answer"]))
    if not frames:
        raise InputError(f"{split_dir} holds no records to probe.")
    return Scenes(frames, np.stack(labels), questions)


def choice_accuracy(logp: np.ndarray, scenes: Scenes) -> dict[str, Any]:
    """Multiple-choice accuracy on the scenes' camera questions (the option with the best summed log-prob)."""
    correct = n = 0
    for lp, question in zip(logp, scenes.questions, strict=True):
        if question is None:
            continue
        options, key = question
        scores = [sum(lp[i, o[i]] for i in range(len(CAMERA_PARAMS))) for o in options]
        correct += int(np.argmax(scores) == key)
        n += 1
    return {"n": n, "accuracy": correct / max(n, 1), "ci": list(wilson_interval(correct, n)),
            "per_parameter": np.mean(logp.argmax(-1) == scenes.labels, axis=0).round(3).tolist()}


def new_head(features: int) -> dict[str, jax.Array]:
    """A zero-initialised linear head: features -> six three-way logits."""
    return {"w": jnp.zeros((features, len(CAMERA_PARAMS), 3)), "b": jnp.zeros((len(CAMERA_PARAMS), 3))}


def head_logp(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    """Log-probabilities [N, 6, 3] of a linear head on features [N, D]."""
    return jax.nn.log_softmax(jnp.einsum("nd,dpc->npc", features, head["w"]) + head["b"])


def label_nll(logp: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of labels [N, 6] under log-probabilities [N, 6, 3]."""
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))


def fit_linear(train: np.ndarray, labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, steps: int = 1500,
               lr: float = 1e-2, weight_decay: float = 1e-3):
    """A six-head linear classifier on standardised features (AdamW, full batch), kept at its best
    validation loss; returns predict(features) -> log-probs [N, 6, 3]."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    norm = lambda f: jnp.asarray((f - mu) / sd)  # noqa: E731
    params = new_head(train.shape[1])
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def loss(p, f, y):
        return label_nll(head_logp(p, f), y)

    @jax.jit
    def step(p, state, f, y):
        g = jax.grad(loss)(p, f, y)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    f_train, f_val, y_train, y_val = norm(train), norm(val), jnp.asarray(labels), jnp.asarray(val_labels)
    state, best, best_params = opt.init(params), np.inf, params
    for i in range(steps):
        params, state = step(params, state, f_train, y_train)
        if i % 50 == 49:
            value = float(loss(params, f_val, y_val))
            if value < best:
                best, best_params = value, params
    return lambda f: np.asarray(head_logp(best_params, norm(f)))


def pixel_differences(frames: list[np.ndarray]) -> np.ndarray:
    x = np.stack(frames).astype(np.float32).mean(-1)  # [N, T, H, W] grey
    n, t, h, w = x.shape
    x = x[:, :, : h // 4 * 4, : w // 4 * 4].reshape(n, t, h // 4, 4, w // 4, 4).mean((3, 5))
    return np.diff(x, axis=1).reshape(n, -1)


def run(data: str | Path, preset: str = "tiny", steps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All three readers on DATA/{train,val,test}; returns their held-out choice accuracies."""
    data = Path(data)
    for split in ("train", "val", "test"):
        if not (data / split).is_dir():
            raise InputError(f"{data} has no {split}/ split (write one with fourd-jax synth).")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}.")
    if preset not in PRESETS:
        raise InputError(f"--preset {preset!r} is not one of {sorted(PRESETS)}.")
    scenes = {split: load_scenes(data / split) for split in ("train", "val", "test")}
    results: dict[str, Any] = {"scenes": {k: len(v.frames) for k, v in scenes.items()}}

    diffs = {k: pixel_differences(v.frames) for k, v in scenes.items()}
    predict = fit_linear(diffs["train"], scenes["train"].labels, diffs["val"], scenes["val"].labels)
    results["pixel_differences"] = choice_accuracy(predict(diffs["test"]), scenes["test"])

    config = PRESETS[preset]()
    vc = config.vision
    tower = VisionTower(config)
    params = init_params(Qwen25VL(config), jax.random.key(seed))["visual"]
    patches = {k: [process(f, vc, 4 * 28 * 28, f.shape[1] * f.shape[2]) for f in v.frames]
               for k, v in scenes.items()}

    def batch(split: str, rows: np.ndarray):
        items = [patches[split][i] for i in rows]
        arrays = media_arrays([p for p, _ in items], [g for _, g in items], len(rows), config, "video")
        return vision_inputs(arrays, "video")

    encode = jax.jit(lambda p, v: tower.apply({"params": p}, v.patches, v.layout).reshape(v.patches.shape[0], -1))

    def features(p, split: str) -> np.ndarray:
        n = len(scenes[split].frames)
        out = []
        for start in range(0, n, BATCH):
            rows = np.minimum(np.arange(start, start + BATCH), n - 1)  # a full last batch: one compile
            out.append(np.asarray(encode(p, batch(split, rows)))[: n - start])
        return np.concatenate(out)

    frozen = {k: features(params, k) for k in scenes}
    predict = fit_linear(frozen["train"], scenes["train"].labels, frozen["val"], scenes["val"].labels)
    results["random_tower"] = choice_accuracy(predict(frozen["test"]), scenes["test"])

    # The tower and a linear head trained together on the labels.
    theta = {"tower": params, "head": new_head(frozen["train"].shape[1])}
    warmup = min(50, steps // 2)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, max(steps, warmup + 1)), weight_decay=0.01)

    def logp(theta, v):
        f = tower.apply({"params": theta["tower"]}, v.patches, v.layout).reshape(v.patches.shape[0], -1)
        return head_logp(theta["head"], f)

    @jax.jit
    def step(theta, state, v, y):
        g = jax.grad(lambda t: label_nll(logp(t, v), y))(theta)
        updates, state = opt.update(g, state, theta)
        return optax.apply_updates(theta, updates), state

    rng = np.random.default_rng(seed)
    state = opt.init(theta)
    n_train = len(scenes["train"].frames)
    for _ in range(steps):
        rows = rng.choice(n_train, BATCH, replace=n_train < BATCH)
        theta, state = step(theta, state, batch("train", rows), jnp.asarray(scenes["train"].labels[rows]))
    test_logp = jax.jit(logp)
    n = len(scenes["test"].frames)
    out = [np.asarray(test_logp(theta, batch("test", np.minimum(np.arange(s, s + BATCH), n - 1))))[: n - s]
           for s in range(0, n, BATCH)]
    results["trained_tower"] = {**choice_accuracy(np.concatenate(out), scenes["test"]), "steps": steps}
    return results
