"""Jitted KV-cache decoding: one prefill, then one token per step inside `lax.while_loop`.

The cache is preallocated to prompt + max_new_tokens slots, so every step has the same shapes
and the whole generation is a single compiled program with no host round-trip per token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model import rope
from fourd_jax.model.text import init_kv_cache
from fourd_jax.model.vlm import PreparedInputs, Qwen25VL, prepare_inputs


def prepare_prompt(model: Qwen25VL, *processor_outputs: Any, **processor_kwargs: Any) -> PreparedInputs:
    """Host-side preparation of processor outputs for generation (see `prepare_inputs`).

    Prompts must be left-padded: generation appends at the right edge of every row.
    """
    prompt = prepare_inputs(model.config, *processor_outputs, **processor_kwargs)
    if np.any(np.asarray(prompt.attention_mask)[:, -1] == 0):
        raise InputError("Prompts must be left-padded: attention_mask is 0 in the last column.")
    return prompt


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy_generate(
    params: Any,
    prompt: PreparedInputs,
    *,
    model: Qwen25VL,
    max_new_tokens: int,
    eos_token_id: int = -1,
    pad_token_id: int = 0,
) -> jax.Array:
    """Greedy continuation [B, max_new_tokens]; after EOS a row is filled with `pad_token_id`."""
    batch, prompt_len = prompt.input_ids.shape
    variables = {"params": params}
    cache = init_kv_cache(model.config, batch, prompt_len + max_new_tokens)
    mask = jnp.concatenate(
        [prompt.attention_mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1
    )
    out = model.apply(variables, prompt.input_ids, attention_mask=mask,
                      position_ids=prompt.position_ids, vision=prompt.vision, kv_cache=cache,
                      cache_index=0, compute_logits=False)
    first = jnp.argmax(model.apply(variables, out.hidden_states[:, -1], method=Qwen25VL.logits), -1)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, mask, done, tokens = state
        token = jnp.where(done, pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        done = done | (token == eos_token_id)
        slot = prompt_len + step
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((batch, 1), jnp.int32), (0, slot))
        positions = rope.text_position_ids(jnp.full((batch, 1), slot), prompt.rope_deltas)
        out = model.apply(variables, token[:, None], attention_mask=mask, position_ids=positions,
                          kv_cache=cache, cache_index=slot)
        return step + 1, jnp.argmax(out.logits[:, -1], -1), out.kv_cache, mask, done, tokens

    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
    state = (0, first.astype(jnp.int32), out.kv_cache, mask, jnp.zeros(batch, bool), tokens)
    return jax.lax.while_loop(cond, body, state)[-1]
