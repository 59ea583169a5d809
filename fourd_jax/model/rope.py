"""M-RoPE on the device: positions [3, B, L] (t, h, w streams) -> rotary angles for the decoder.

The positions of a prompt come from the host (`fourd_jax.model.positions.get_rope_index`, which
depends on data values); this is the on-device half, and the positions of decoded text tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax.model.config import TextConfig


def text_position_ids(slots: jax.Array, rope_deltas: jax.Array) -> jax.Array:
    """Positions [3, B, L] of text tokens written at cache slots [B, L] (decode after a prefill)."""
    pos = slots + rope_deltas[:, None]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] in float32 for M-RoPE positions [3, B, L].

    The rotary half-dimension is split by `mrope_section`; section i rotates with stream i % 3.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, hd/2]
    bounds = np.cumsum((0,) + tuple(config.mrope_section))
    freqs = jnp.concatenate(
        [freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(config.mrope_section))],
        axis=-1,
    )
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)
