"""Settings of `fourd-jax study` (the ablations; see fourd_jax/study.py for the arms).

    fourd-jax study --preset cpu|accelerator --workdir W [--seeds N] [--config.KEY=VALUE ...]

Every arm gets the same data, model and budget: the supervised arms train config.dift (changed
in one field each) from the same reading warm-up (config.warmup; the blind arm from its twin
without video), the RL arms train config.rl from the dift arm's checkpoint. The cpu preset is
the demo's recipe (`demo`) and runs in <= 90 min on 2 cores with one seed; the
accelerator preset is sized for one GPU or TPU host.
"""

import ml_collections

from fourd_jax.configs import demo
from fourd_jax.errors import InputError


def demo_config() -> ml_collections.ConfigDict:
    return demo.get_config()


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    """arg: "cpu" (the demo's recipe) or "accelerator" (more scenes, steps and a wider batch)."""
    config = demo_config()
    if arg == "accelerator":
        config.num_scenes *= 4
        config.synth_workers = 8
        config.eval_batch_size = 64
        config.dift.data.batch_size = 64
        config.dift.optim.total_steps *= 2
        config.dift.data.num_workers = 4
        config.warmup.data.batch_size = 64
        config.warmup.data.num_workers = 4
        config.rl.data.batch_size = 16
        config.rl.optim.total_steps *= 4
    elif arg != "cpu":
        raise InputError(f"unknown study preset {arg!r}; choose cpu or accelerator.")
    return config
