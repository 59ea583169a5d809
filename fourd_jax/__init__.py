"""fourd_jax: a JAX/Flax, TPU-native 4DThinker (VLMs that think with 4D imagery).

`from fourd_jax import hf` gives the Hugging Face conversion API. It is imported lazily, so
the data tools (simulator, records) do not pay for importing JAX.
"""

import importlib

__all__ = ["hf"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "hf":
        return importlib.import_module("fourd_jax.convert.hf")
    raise AttributeError(f"module 'fourd_jax' has no attribute {name!r}")
