"""What the training tests share: the packaged run configs (fourd_jax/configs/*.py) with dotted-key
overrides, and a small synthetic record set with its tokenizer."""

import importlib
from pathlib import Path


def load_config(name: str, preset: str = "tiny", **overrides):
    """fourd_jax/configs/NAME.py:get_config(preset) with overrides such as {"optim.lr": 1e-3}."""
    config = importlib.import_module(f"fourd_jax.configs.{name}").get_config(preset)
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def tiny_records(out: Path, seed: int):
    """8 synthetic scenes (8 frames, 112 px) under `out` and a 600-token tokenizer trained on them,
    saved to out/tokenizer; returns (out, tokenizer)."""
    from fourd_jax.data.sim.scene import SceneConfig
    from fourd_jax.data.synth import SynthConfig, synthesize
    from fourd_jax.data.tokenizer import build_tokenizer, record_texts

    synthesize(out, 8, seed=seed, config=SynthConfig(scene=SceneConfig(num_frames=8, image_size=(112, 112))),
               progress=False)
    tokenizer = build_tokenizer(record_texts(out / "train"), vocab_size=600)
    tokenizer.save_pretrained(out / "tokenizer")
    return out, tokenizer


def run_script(args: list[str], cwd=None, env: dict[str, str] | None = None):
    """The installed `fourd-jax` entry point (beside this python) run on `args`, as a user runs it
    (`env`: variables set for it alone)."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("fourd-jax")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
