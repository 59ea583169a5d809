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


def mrope_stream(config: TextConfig) -> np.ndarray:
    """Which position stream (0 = t, 1 = h, 2 = w) drives each of the head_dim / 2 frequencies.

    Contiguous (Qwen2.5-VL): `mrope_section` splits the frequencies into runs, run i taking
    stream i % 3. Interleaved (Qwen3-VL, `mrope_interleaved`): frequency j takes stream j % 3 while
    that stream's section lasts (j < 3 * section), stream t after.
    """
    sections = tuple(config.mrope_section)
    if not config.mrope_interleaved:
        return np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)]).astype(np.int32)
    j = np.arange(sum(sections))
    stream = np.zeros_like(j)
    for s in (1, 2):
        stream[(j % 3 == s) & (j < 3 * sections[s])] = s
    return stream.astype(np.int32)


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] in float32 for M-RoPE positions [3, B, L].

    Each rotary frequency rotates with one of the three position streams (`mrope_stream`).
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, hd/2]
    stream = mrope_stream(config)
    freqs = jnp.where(stream == 0, freqs[0], jnp.where(stream == 1, freqs[1], freqs[2]))  # a pure selection
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)
