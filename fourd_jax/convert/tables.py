"""HF tensor names <-> parameter paths: the rule type a family's name table is written in.

A family's `NameTable` (e.g. `fourd_jax.convert.qwen25vl.NAMES`) pairs each HF tensor name with a
parameter path and a layout transform; `fourd_jax.convert.hf` walks it in both directions.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from fourd_jax.errors import InputError


class CheckpointError(InputError):
    """A checkpoint that does not match the model it claims to be."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor family <-> one parameter.

    hf: HF name; `{i}` stands for a layer/block index.
    path: parameter path joined by '/'; `{i}` in it means one parameter per block (vision),
      otherwise `stacked` parameters hold all layers on a leading axis (scanned decoder).
      Stacked rules cover config.text.num_layers; the others the blocks `count` names.
    kind: 'linear' (HF [out, in] <-> kernel [*in, *out] with `n_in` input axes), 'conv'
      (Conv3d weight <-> patch matmul kernel), 'flat' (HF 1-D <-> [heads, head_dim]-shaped
      biases) or 'same' (identical layout: norms, embeddings).
    """

    hf: str
    path: str
    kind: str = "same"
    n_in: int = 1
    stacked: bool = False
    # For unstacked `{i}` rules: the config attribute (dotted) that counts the blocks.
    count: str = "vision.depth"


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives: parameter path, layer index (or None) and its transform."""

    path: str
    layer: int | None
    rule: Rule


@dataclasses.dataclass(frozen=True)
class NameTable:
    """Every HF tensor of a family, and the other spellings of their names it accepts.

    rules: one per tensor family; `{i}` rules cover config.text.num_layers (stacked) or
      the blocks their `count` names (config.vision.depth by default).
    aliases: (pattern, replacement) pairs that turn an accepted spelling into the on-disk name.
    tied_head: the HF name of the LM head, absent from tied checkpoints (tie_word_embeddings).
    embedding: the parameter path of the token embedding a tied head must equal.
    """

    rules: tuple[Rule, ...]
    aliases: tuple[tuple[re.Pattern, str], ...] = ()
    tied_head: str = "lm_head.weight"
    embedding: str = "language_model/embed_tokens/embedding"

    def canonical_name(self, name: str) -> str:
        """The on-disk HF name for any accepted spelling of a tensor name."""
        for pattern, repl in self.aliases:
            name = pattern.sub(repl, name)
        return name

    def tensor_slots(self, config: Any) -> dict[str, Slot]:
        """Every HF tensor name this config has, mapped to its slot."""
        slots = {}
        for rule in self.rules:
            if rule.hf == self.tied_head and config.tie_word_embeddings:
                continue
            if "{i}" not in rule.hf:
                slots[rule.hf] = Slot(rule.path, None, rule)
                continue
            depth = config.text.num_layers if rule.stacked else _attribute(config, rule.count)
            for i in range(depth):
                slots[rule.hf.format(i=i)] = Slot(
                    rule.path if rule.stacked else rule.path.format(i=i), i if rule.stacked else None, rule
                )
        return slots


def _attribute(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def hf_shape(rule: Rule, param_shape: tuple[int, ...], config: Any) -> tuple[int, ...]:
    """The HF tensor shape for one layer of a parameter of `param_shape` (layer axis removed)."""
    if rule.kind == "linear":
        return (math.prod(param_shape[rule.n_in:]), math.prod(param_shape[:rule.n_in]))
    if rule.kind == "conv":
        v = config.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if rule.kind == "flat":
        return (math.prod(param_shape),)
    return tuple(param_shape)


def to_jax(rule: Rule, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> parameter layout (one layer)."""
    if rule.kind == "conv":
        tensor = tensor.reshape(tensor.shape[0], -1)
    if rule.kind in ("linear", "conv"):
        tensor = tensor.T
    return tensor.reshape(param_shape)


def to_hf(rule: Rule, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Parameter layout (one layer) -> HF tensor of `shape`."""
    if rule.kind == "linear":
        return np.ascontiguousarray(array.reshape(shape[1], shape[0]).T)
    if rule.kind == "conv":
        return np.ascontiguousarray(array.reshape(-1, shape[0]).T.reshape(shape))
    return np.ascontiguousarray(array.reshape(shape))
