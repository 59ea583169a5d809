"""Settings of `fourd-jax demo` (the end-to-end CPU job).

    fourd-jax demo --workdir W [--config configs/demo.py:tiny] [--config.max_new_tokens=32]
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """arg: the model preset the demo trains from scratch (only 'tiny' fits a CPU demo)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = arg
    config.tokenizer_vocab_size = 400  # ordinary BPE tokens; special tokens come on top
    config.frames = 4
    config.image_size = 112
    config.latent_size = 4
    config.max_new_tokens = 16
    return config
