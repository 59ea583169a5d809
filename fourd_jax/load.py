"""One loader for every place that takes a model: a Hugging Face directory, an Orbax checkpoint
directory, or a training workdir (its `checkpoints/`, with its `tokenizer/`).

`fourd-jax eval`, `convert`, `data targets`, and the training stages (`model.init_from`, `rl --init`)
all load through `load_model`, so a path means the same everywhere and fails with the same sentences.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fourd_jax import checkpoint
from fourd_jax.convert import hf, peft
from fourd_jax.data.latent_tokens import LATENT_TOKENS
from fourd_jax.errors import InputError
from fourd_jax.files import as_path, local_copy


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model path's weights and tokenizer are."""

    kind: str  # "hf" or "orbax"
    weights: str  # the HF directory, or the Orbax checkpoint directory (a CheckpointManager root)
    tokenizer: str  # the tokenizer directory found with them; "" when there is none
    adapter: str = ""  # a PEFT LoRA directory applied on top of the weights (`convert jax-to-hf --adapter`)


def find_model(path: str | Path | None, what: str = "--checkpoint") -> ModelSource:
    """What `path` holds: a training workdir (its checkpoints/ and tokenizer/), a Hugging Face
    directory (config.json; its own tokenizer when it has one), or an Orbax checkpoint directory
    (the tokenizer beside it, as WORKDIR/checkpoints has WORKDIR/tokenizer)."""
    if not str(path or "") or not as_path(path).exists():
        raise InputError(f"{what} {str(path or '') or '(empty)'} does not exist.")
    source = as_path(path)  # a local directory or a URL (gs://...)
    if (source / peft.CONFIG_FILE).exists():  # a LoRA adapter: its base, with the adapter on top
        base = json.loads((source / peft.CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""
        if not base or not as_path(base).exists():
            raise InputError(f"{what} {path} is a LoRA adapter whose base_model_name_or_path {base!r} is no local "
                             "model directory; load the base and `fourd_jax.convert.peft.load_adapter` it.")
        return dataclasses.replace(find_model(base, f"{what} {path}'s base"), adapter=str(source))
    if (source / "checkpoints").is_dir():
        tokenizer = source / "tokenizer"
        return ModelSource("orbax", str(source / "checkpoints"), str(tokenizer) if tokenizer.is_dir() else "")
    if (source / "config.json").exists():
        return ModelSource("hf", str(source), str(source) if (source / "tokenizer_config.json").exists() else "")
    beside = source.parent / "tokenizer"
    return ModelSource("orbax", str(source), str(beside) if beside.is_dir() else "")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: Any  # the Linen module, its config as loaded (with any overrides)
    params: Any
    source: ModelSource


def load_model(path: str | Path | ModelSource | None, *, what: str = "--checkpoint", step: int | None = None,
               param_dtype: str | None = None, dtype: str | None = None, **overrides: Any) -> LoadedModel:
    """The model and params at `path` (see `find_model`; or a ModelSource it gave). `step`: an Orbax
    step (default: the latest). `param_dtype`: the dtype the params are restored in (HF default
    float32, Orbax default as saved); `dtype`: the compute dtype; `overrides`: other ModelConfig
    fields (remat_policy, attention_block, ...)."""
    source = path if isinstance(path, ModelSource) else find_model(path, what)
    if source.kind == "hf":
        if step is not None:
            raise InputError(f"{what} {path} is a Hugging Face directory, which has no steps; drop the step.")
        # safetensors are read from local files: a remote HF directory is staged first
        model, params = hf.load(local_copy(source.weights), dtype=param_dtype or "float32", compute_dtype=dtype,
                                **overrides)
    else:
        numerics = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
        model, params = checkpoint.restore_params(source.weights, step=step, **numerics, **overrides)
    if source.adapter:
        params = peft.load_adapter(model, params, local_copy(source.adapter))
    return LoadedModel(model, params, source)


def load_tokenizer(directory: str | Path, what: str = "--tokenizer") -> Any:
    """A saved tokenizer (`AutoTokenizer.from_pretrained`), or one sentence naming the directory. A
    remote directory is read from its staged copy (`from_pretrained` reads local files)."""
    # transformers is heavy to import; only loading a tokenizer needs it.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(local_copy(directory)))
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {directory} could not be loaded ({str(e).splitlines()[0]}).") from None


def check_latent_ids(tokenizer: Any, model_config: Any, tokenizer_dir: str | Path) -> None:
    """One sentence unless the tokenizer maps the latent tokens to the ids the model was trained with."""
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    if model_config.latent_token_ids is not None and ids != tuple(model_config.latent_token_ids):
        raise InputError(f"tokenizer {tokenizer_dir} maps the latent tokens to {ids}, but the model expects "
                         f"{tuple(model_config.latent_token_ids)}; pass the tokenizer the model was trained with.")
