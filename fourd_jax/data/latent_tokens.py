"""4DThinker's latent imagery tokens in text (SPEC 3.1): their names, and a tokenizer that has them.

A `<output_image>` marker in a reasoning trace becomes `<|latent_start|>`, `latent_size` x
`<|latent_pad|>`, `<|latent_end|>`. The model side (`fourd_jax.model.imagery`) grows the
embedding for these tokens and computes the targets of the pads; here is only text, so the host
data code uses it without JAX.
"""

from __future__ import annotations

from typing import Any

from fourd_jax.errors import InputError

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)
OUTPUT_IMAGE = "<output_image>"
DEFAULT_LATENT_SIZE = 4


def latent_block(latent_size: int = DEFAULT_LATENT_SIZE) -> str:
    """The token string one `<output_image>` becomes."""
    return LATENT_START + LATENT_PAD * latent_size + LATENT_END


def expand_output_images(text: str, latent_size: int = DEFAULT_LATENT_SIZE) -> str:
    """Replace every `<output_image>` marker with a latent block."""
    return text.replace(OUTPUT_IMAGE, latent_block(latent_size))


def add_latent_tokens(tokenizer: Any) -> tuple[int, int, int]:
    """Add the three latent tokens (as special tokens) to a HF tokenizer; return their ids.

    Tokens already present keep their ids, so calling this twice is harmless.
    """
    missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return latent_token_ids(tokenizer)


def latent_token_ids(tokenizer: Any) -> tuple[int, int, int]:
    """Ids of the latent tokens; one clear error when the tokenizer lacks any of them."""
    vocab = tokenizer.get_vocab()
    absent = [t for t in LATENT_TOKENS if t not in vocab]
    if absent:
        raise InputError(
            f"The tokenizer has no {', '.join(absent)} token(s); add them with "
            "fourd_jax.model.imagery.add_latent_tokens(tokenizer) before training or decoding."
        )
    return tuple(vocab[t] for t in LATENT_TOKENS)  # type: ignore[return-value]
