"""LoRA adapters as parameter leaves beside the kernels they adapt, family-agnostic.

A targeted projection `<module>/kernel` [*lead, *in, *out] gains three leaves in the same module:
`lora_a` [*lead, *in, r], `lora_b` [*lead, r, *out] and `lora_scale` [*lead] (alpha / r, so a
checkpoint says how to apply itself). `lead` is the scanned decoder's layer axis, when there is one.
`layers.Dense` adds `scale · (dropout(x) @ A) @ B` to its output whenever its module holds the
leaves, so every forward (training, sampling, eval, RL scoring) applies them with no other change,
and `nn.scan` carries them like any stacked parameter.

Which kernels can be targeted comes from the family's HF name table (its 'linear' rules, where
`n_in` says how many kernel axes are inputs), so an adapter always has a PEFT / HF counterpart.
`targets` is a regex searched in each such kernel's '/'-joined path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import zlib
from collections.abc import Iterator
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fourd_jax import families
from fourd_jax.errors import InputError

A, B, SCALE = "lora_a", "lora_b", "lora_scale"
LEAVES = (A, B, SCALE)
TRAINED = (A, B)  # the scale is fixed: alpha / r
DROPOUT_RNG = "lora_dropout"  # the Flax rng stream of adapter dropout (given only while training)

# (rate, key) of adapter dropout while a training step is traced; None elsewhere (eval, sampling, export).
_dropout: contextvars.ContextVar[tuple[float, jax.Array] | None] = contextvars.ContextVar("lora_dropout", default=None)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r (0 = no adapters), alpha (the update is alpha / r · B A), input dropout of the adapter
    path while training, and the regex choosing the kernels to adapt."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A linear kernel that can carry an adapter: its leading (layer) axes and input axes."""

    lead: int
    n_in: int


# ----------------------------------------------------------------------------- which kernels


def linear_kernels(config: Any) -> dict[str, Kernel]:
    """Every kernel path of `config`'s family that is a linear layer in HF terms (a PEFT target)."""
    kernels = {}
    for slot in families.family_of(config).name_table().tensor_slots(config).values():
        if slot.rule.kind == "linear":
            kernels[slot.path] = Kernel(lead=1 if slot.layer is not None else 0, n_in=slot.rule.n_in)
    return kernels


def targeted(config: Any, targets: str, field: str = "lora.targets") -> dict[str, Kernel]:
    """The kernels whose path `targets` matches (re.search), or one sentence naming `field`."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise InputError(f"{field} {targets!r} is not a valid regex ({e}).") from None
    kernels = linear_kernels(config)
    chosen = {path: k for path, k in kernels.items() if pattern.search(path)}
    if not chosen:
        examples = ", ".join(sorted(kernels)[:4])
        raise InputError(f"{field} {targets!r} matches no linear kernel of the model (paths look like {examples}).")
    return chosen


def module_of(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0]


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined parameter path is an adapter leaf."""
    return path.rsplit("/", 1)[-1] in LEAVES


def trained_pattern() -> str:
    """A regex matching every parameter path that is not a trained adapter leaf (what LoRA freezes)."""
    return "".join(f"(?<!/{leaf})" for leaf in TRAINED) + "$"


# ----------------------------------------------------------------------------- making adapters


def _adapter_shapes(kernel_shape: tuple[int, ...], kernel: Kernel, rank: int) -> dict[str, tuple[int, ...]]:
    lead, inputs = kernel_shape[: kernel.lead], kernel_shape[kernel.lead: kernel.lead + kernel.n_in]
    outputs = kernel_shape[kernel.lead + kernel.n_in:]
    return {A: (*lead, *inputs, rank), B: (*lead, rank, *outputs), SCALE: tuple(lead)}


def add_adapters(params: Any, config: Any, spec: LoraSpec, key: jax.Array, dtype: Any = jnp.float32) -> Any:
    """params with fresh adapters on every targeted kernel: A uniform in ±1/sqrt(fan_in) (PEFT's
    default), B zero, so the model's outputs are unchanged until B trains. Traceable."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, kernel in sorted(targeted(config, spec.targets).items()):
        shapes = _adapter_shapes(flat[path].shape, kernel, spec.rank)
        fan_in = math.prod(shapes[A][kernel.lead:-1])
        bound = 1.0 / math.sqrt(fan_in)
        module = module_of(path)
        # One key per kernel, from its path: adapters do not depend on which other kernels are targeted.
        path_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        flat[f"{module}/{A}"] = jax.random.uniform(path_key, shapes[A], dtype, -bound, bound)
        flat[f"{module}/{B}"] = jnp.zeros(shapes[B], dtype)
        flat[f"{module}/{SCALE}"] = jnp.full(shapes[SCALE], spec.scale, jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def abstract_adapters(boxed: Any, config: Any, spec: LoraSpec, dtype: Any = jnp.float32) -> Any:
    """A boxed abstract parameter tree (`model.apply.abstract_params`) with the adapters `add_adapters`
    makes, carrying logical names so they shard like their kernel (the rank axis whole)."""
    flat = traverse_util.flatten_dict(boxed, sep="/")
    for path, kernel in targeted(config, spec.targets).items():
        box = flat[path]
        names = tuple(box.names)
        shapes = _adapter_shapes(box.value.shape, kernel, spec.rank)
        split = kernel.lead + kernel.n_in
        module = module_of(path)
        for leaf, leaf_names, leaf_dtype in ((A, names[:split] + (None,), dtype),
                                             (B, names[: kernel.lead] + (None,) + names[split:], dtype),
                                             (SCALE, names[: kernel.lead], jnp.float32)):
            flat[f"{module}/{leaf}"] = box.replace_boxed(jax.ShapeDtypeStruct(shapes[leaf], leaf_dtype)).replace(
                names=leaf_names)
    return traverse_util.unflatten_dict(flat, sep="/")


def cast_base(params: Any, dtype: Any) -> Any:
    """Every non-adapter leaf in `dtype` (the frozen base held in bf16 beside f32 adapters)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {p: v if is_adapter(p) else _astype(v, dtype) for p, v in flat.items()}, sep="/")


def _astype(leaf: Any, dtype: Any) -> Any:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.replace_boxed(jax.ShapeDtypeStruct(leaf.value.shape, dtype))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)


# ----------------------------------------------------------------------------- reading adapters back


def split(params: Any) -> tuple[Any, dict[str, Any]]:
    """(the base without adapters, {'/'-joined adapter path: leaf})."""
    flat = traverse_util.flatten_dict(params, sep="/")
    adapters = {p: v for p, v in flat.items() if is_adapter(p)}
    base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adapter(p)}, sep="/")
    return base, adapters


def join(base: Any, adapters: Any) -> Any:
    """The parameter tree `base` with the leaves of the tree `adapters` added (the inverse of `split`)."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base, sep="/"),
                                         **traverse_util.flatten_dict(adapters, sep="/")}, sep="/")


def adapters_of(params: Any) -> Any:
    """The adapter leaves of `params`, as a tree of the same nesting (what a LoRA run checkpoints)."""
    return traverse_util.unflatten_dict(split(params)[1], sep="/")


def adapted_modules(params: Any) -> Iterator[str]:
    """The module paths that hold an adapter, sorted."""
    _, adapters = split(params)
    yield from sorted({module_of(p) for p in adapters if p.endswith("/" + A)})


def spec_of(params: Any) -> LoraSpec:
    """The rank and alpha the adapters in `params` were made with (rank 0 when there are none)."""
    _, adapters = split(params)
    modules = list(adapted_modules(params))
    if not modules:
        return LoraSpec()
    rank = int(adapters[f"{modules[0]}/{A}"].shape[-1])
    scale = float(np.ravel(jax.device_get(adapters[f"{modules[0]}/{SCALE}"]))[0])
    return LoraSpec(rank=rank, alpha=scale * rank, targets="|".join(re.escape(m) for m in modules))


def merge(params: Any) -> Any:
    """The base with every adapter folded in: kernel + scale · A @ B, in the kernel's dtype (the
    forward of the result equals the adapted forward)."""
    base, adapters = split(params)
    flat = traverse_util.flatten_dict(base, sep="/")
    for module in adapted_modules(params):
        a, b, scale = (adapters[f"{module}/{leaf}"] for leaf in LEAVES)
        kernel = flat[f"{module}/kernel"]
        lead = scale.ndim
        chex.assert_equal(a.shape[:lead], kernel.shape[:lead])
        a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, a.shape[-1])
        b2 = b.astype(jnp.float32).reshape(*b.shape[:lead], b.shape[lead], -1)
        delta = jnp.einsum("...ir,...ro->...io", a2, b2) * scale.astype(jnp.float32)[..., None, None]
        flat[f"{module}/kernel"] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- applying (layers.Dense)


@contextlib.contextmanager
def dropout(rate: float, key: jax.Array) -> Iterator[None]:
    """Adapter input dropout at `rate` for the forwards traced inside (a training step) that pass
    `rngs()` to `model.apply`; `key` seeds it. A rate of 0 changes nothing."""
    token = _dropout.set((float(rate), key) if rate > 0 else None)
    try:
        yield
    finally:
        _dropout.reset(token)


def rngs() -> dict[str, jax.Array]:
    """The `rngs` argument of `model.apply` inside `dropout(...)`: the dropout stream, or nothing."""
    active = _dropout.get()
    return {} if active is None else {DROPOUT_RNG: active[1]}


def adapter_output(module: nn.Module, rows: jax.Array, dtype: Any) -> jax.Array | None:
    """scale · (dropout(rows) @ A) @ B for the Dense `module` applied to `rows` [N, prod(in)], or None
    when it holds no adapter. Called from `layers.Dense`."""
    if not module.has_variable("params", A):
        return None
    a, b = module.get_variable("params", A), module.get_variable("params", B)
    scale = module.get_variable("params", SCALE)
    chex.assert_rank(scale, 0)  # one layer's scale (nn.scan slices the layer axis off)
    rank = a.shape[-1]
    active = _dropout.get()
    if active is not None and module.has_rng(DROPOUT_RNG):
        rate = active[0]
        keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, rows.shape)
        rows = jnp.where(keep, rows / (1.0 - rate), 0).astype(rows.dtype)
    low = rows @ a.astype(dtype).reshape(-1, rank)
    return (low @ b.astype(dtype).reshape(rank, -1)) * scale.astype(dtype)
