"""Jitted entry points of the model: forward on processor outputs, the vision tower, parameter init.

Each compiled program is cached per model (a Linen module is hashable), so repeated calls with the
same shapes do not re-trace; the host-side preparation (`fourd_jax.model.inputs`) runs in numpy
before them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from fourd_jax import sharding
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.inputs import PreparedInputs, VisionInputs, prepare_inputs, prepare_vision, rope_index
from fourd_jax.model.vlm import ModelOutput, Qwen25VL


def forward(
    model: Qwen25VL,
    params: Any,
    *processor_outputs: Any,
    latent_embeds: Any = None,
    compute_logits: bool = True,
    **processor_kwargs: Any,
) -> ModelOutput:
    """`model.apply` on processor outputs, with the device work jitted (cached per model).

    Takes the arguments of `prepare_inputs` (input_ids, attention_mask, pixel_values, ...). The
    host-side work runs in numpy; the rest is one compiled program, so repeated calls with the
    same shapes do not re-trace. Eager `model.apply` compiles every primitive separately, which
    is slow for more than a few calls.
    """
    batch = prepare_inputs(model.config, *processor_outputs, **processor_kwargs)
    return _jitted_apply(model, compute_logits)(params, batch, latent_embeds)


@functools.lru_cache(maxsize=16)
def _jitted_apply(model: Qwen25VL, compute_logits: bool):
    def apply(params, batch: PreparedInputs, latent_embeds):
        return model.apply({"params": params}, batch.input_ids, batch.attention_mask,
                           position_ids=batch.position_ids, vision=batch.vision, latent_embeds=latent_embeds,
                           compute_logits=compute_logits)

    return jax.jit(apply)


def encode_vision(model: Qwen25VL, params: Any, vision: VisionInputs) -> jax.Array:
    """Merged visual tokens for `vision` through a jitted tower (cached per model)."""
    return _jitted_encode(model)(params, vision)


@functools.lru_cache(maxsize=16)
def _jitted_encode(model: Qwen25VL):
    return jax.jit(lambda params, vision: model.apply({"params": params}, vision, method=Qwen25VL.encode_vision))


def dummy_inputs(config: ModelConfig) -> dict[str, Any]:
    """The smallest inputs that touch every parameter (one image of a single merged unit)."""
    m = config.vision.spatial_merge_size
    grid = np.array([[1, m, m]])
    ids = np.array([[config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]])
    return dict(
        input_ids=ids,
        position_ids=rope_index(config, ids, grid)[0],
        vision=prepare_vision(config, np.zeros((m * m, config.vision.patch_dim), np.float32), grid),
    )


def init_params(model: Qwen25VL, rng: jax.Array, *, mesh=None, rules=None):
    """Randomly initialised parameters, from a jitted init (compiled once per model and mesh).

    With a `mesh`, every parameter is created already sharded by the logical rules (default
    `fourd_jax.sharding.DEFAULT_RULES`); no device ever holds the whole tree.
    """
    if mesh is None:
        return _jitted_init(model, None, None)(rng)
    rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
    init = _jitted_init(model, mesh, rules)  # shardings are worked out outside the mesh context
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng)


@functools.lru_cache(maxsize=8)
def _jitted_init(model: Qwen25VL, mesh, rules):
    inputs = dummy_inputs(model.config)

    def init(key):
        return nn.meta.unbox(model.init(key, **inputs)["params"])

    if mesh is None:
        return jax.jit(init)
    return jax.jit(init, out_shardings=sharding.param_shardings(abstract_params(model), mesh, rules))


def abstract_params(model: Qwen25VL):
    """Shapes, dtypes and logical axis names of every parameter, without allocating any."""
    inputs = dummy_inputs(model.config)
    return jax.eval_shape(lambda key: model.init(key, **inputs), jax.random.key(0))["params"]
