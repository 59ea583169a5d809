"""LoRA in a training run: adapters added to the run's parameters, already sharded, with the frozen
base optionally held in a narrower dtype. The adapter math lives in `fourd_jax.model.lora` (eval and
export apply adapters without importing training code)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from fourd_jax import checkpoint, sharding
from fourd_jax.errors import InputError
from fourd_jax.files import write_text_atomic
from fourd_jax.model import lora
from fourd_jax.model.apply import abstract_params

ADAPTER_SEED_SALT = 0x10A  # adapters draw from the run seed folded with this, apart from the model init
BASE_DIR = "lora_base"  # in the workdir, beside checkpoints/: the frozen base, written once
DIGEST_FILE = "base_digest.json"  # in BASE_DIR: the digest of the base as held


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



def base_digest(params: Any) -> str:
    """A digest of the frozen base (the non-adapter leaves of `params`) that does not depend on how
    they are sharded: each leaf's bits summed as wrapping uint32 (integer addition is exact in any
    order), hashed with its path, shape and dtype."""
    base, _ = lora.split(params)
    flat = traverse_util.flatten_dict(base, sep="/")

    def bit_sum(x: jax.Array) -> jax.Array:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width)  # 8-byte leaves become [..., 2] words
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    sums = jax.device_get(jax.jit(lambda leaves: [bit_sum(x) for x in leaves])(list(flat.values())))
    h = hashlib.sha256()
    for (path, leaf), total in zip(flat.items(), sums, strict=True):
        h.update(f"{path}|{tuple(leaf.shape)}|{leaf.dtype}|{int(total)}\n".encode())
    return h.hexdigest()


def keep_base(workdir: epath.Path, model: Any, params: Any, source: str) -> Any:
    """The frozen base of a LoRA run's `params`, written once to `workdir/lora_base` (its checkpoints
    then hold the adapters only). A run resuming there must start from the same base: one sentence
    naming `source` (where this run's base came from) when it does not."""
    base, _ = lora.split(params)
    digest = base_digest(params)
    directory = workdir / BASE_DIR
    if (directory / DIGEST_FILE).exists():
        recorded = json.loads((directory / DIGEST_FILE).read_text())["digest"]
        if recorded != digest:
            raise InputError(f"{source} holds other weights than the frozen base {workdir} was trained on "
                             f"({directory}); resume with the same base, or use a new --workdir.")
        return base
    if directory.exists():  # a base whose writing was cut off: written anew
        if jax.process_index() == 0:
            directory.rmtree()
        multihost_utils.sync_global_devices("lora_base_cleared")
    checkpoint.save_params(directory, model, base)
    if jax.process_index() == 0:  # written after the base is complete: its presence marks the base done
        write_text_atomic(directory / DIGEST_FILE, json.dumps({"digest": digest}))
    return base
