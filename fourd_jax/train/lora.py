"""LoRA in a training run: adapters added to the run's parameters, already sharded, with the frozen
base optionally held in a narrower dtype. The adapter math lives in `fourd_jax.model.lora` (eval and
export apply adapters without importing training code)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fourd_jax import sharding
from fourd_jax.errors import InputError
from fourd_jax.model import lora
from fourd_jax.model.apply import abstract_params

ADAPTER_SEED_SALT = 0x10A  # adapters draw from the run seed folded with this, apart from the model init


def base_dtype(settings: Any, model: Any) -> Any:
    """The dtype the frozen base is held in."""
    return jnp.dtype(settings.base_dtype) if settings.base_dtype else model.config.jnp_param_dtype


def boxed_params(model: Any, settings: Any | None) -> Any:
    """The boxed abstract parameters of a run: the model's, plus adapters when `settings` (a
    `LoraSettings`) enables them, with the base in its held dtype."""
    boxed = abstract_params(model)
    if settings is None or not settings.enabled:
        return boxed
    boxed = lora.cast_base(boxed, base_dtype(settings, model))
    return lora.abstract_adapters(boxed, model.config, settings.spec, model.config.jnp_param_dtype)


def check_not_frozen(config: Any, spec: lora.LoraSpec, freeze: Sequence[str]) -> None:
    """Refuse adapters that `optim.freeze` would keep frozen (they would never train)."""
    user = [re.compile(p) for p in freeze if p != lora.trained_pattern()]
    for path in sorted(lora.targeted(config, spec.targets)):
        adapter = f"{lora.module_of(path)}/{lora.A}"
        hit = next((p.pattern for p in user if p.search(adapter)), None)
        if hit is not None:
            raise InputError(f"lora.targets adapts {lora.module_of(path)}, which optim.freeze {hit!r} freezes; "
                             "narrow lora.targets or optim.freeze.")


def with_adapters(params: Any, model: Any, settings: Any, freeze: Sequence[str], seed: int, mesh: Any,
                  rules: Any) -> Any:
    """The run's parameters with fresh adapters (B = 0: the model's outputs are unchanged), created
    sharded by `rules`, the base cast to its held dtype."""
    check_not_frozen(model.config, settings.spec, freeze)
    key = jax.random.fold_in(jax.random.key(seed), ADAPTER_SEED_SALT)
    shardings = sharding.param_shardings(boxed_params(model, settings), mesh, rules)
    dtype = base_dtype(settings, model)

    def build(p):
        return lora.add_adapters(lora.cast_base(p, dtype), model.config, settings.spec, key,
                                 model.config.jnp_param_dtype)

    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(params)

