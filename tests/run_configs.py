"""The repository's run configs (configs/*.py) for tests, with dotted-key overrides."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).parents[1]


def load_config(name: str, preset: str = "tiny", **overrides):
    """configs/NAME.py:get_config(preset) with overrides such as {"optim.lr": 1e-3}."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config
