"""Settings of `fourd-jax demo` (the end-to-end CPU job: synthesize -> DIFT -> 4DRL -> eval).

    fourd-jax demo --workdir W [--config configs/demo.py:tiny] [--config.dift.optim.total_steps=120]
"""

import importlib.util
from pathlib import Path

import ml_collections


def stage_config(name: str, preset: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"{name}_config", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """arg: the model preset the demo trains from scratch (only 'tiny' fits a CPU demo)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = arg
    config.num_scenes = 300  # procedural scenes to synthesise (80/10/10 train/val/test)
    # 4DThinker's questions (camera motion, object direction / speed / distance) with imagery traces.
    config.families = ("4dthinker",)
    config.frames = 8  # frames per scene and per sample
    config.image_size = 112  # rendered frame side, pixels
    config.tokenizer_vocab_size = 800  # ordinary BPE tokens; special tokens come on top
    config.eval_max_new_tokens = 320  # room for a trace with imagery blocks and the answer
    config.eval_batch_size = 8

    config.dift = stage_config("dift", arg)  # data and tokenizer are the demo's
    config.dift.optim.total_steps = 800
    config.dift.train.checkpoint_every = 200

    config.rl = stage_config("rl", arg)  # starts from the DIFT checkpoint
    config.rl.optim.total_steps = 10
    config.rl.train.checkpoint_every = 10
    config.rl.sample.max_new_tokens = 320
    return config
