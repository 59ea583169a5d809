"""Settings of `fourd-jax demo` (the end-to-end CPU job).

    fourd-jax demo --workdir W [--config configs/demo.py:tiny] [--config.max_new_tokens=32]
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """arg: the model preset the demo runs (only 'tiny' fits a CPU demo)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = arg
    config.num_scenes = 12  # procedural scenes to synthesise (80/10/10 train/val/test)
    config.frames = 8  # frames per scene and per sample
    config.image_size = 112  # rendered frame side, pixels
    config.max_pixels = 112 * 112  # per frame after smart_resize
    config.tokenizer_vocab_size = 600  # ordinary BPE tokens; special tokens come on top
    config.batch_size = 4
    config.latent_size = 4
    config.max_new_tokens = 16
    return config
