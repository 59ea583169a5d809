"""Hugging Face safetensors <-> JAX parameters, both directions from one name table per family.

A family's name table (`fourd_jax.families`; Qwen2.5-VL's is `fourd_jax.convert.qwen25vl.NAMES`)
pairs each HF tensor name with a parameter path and a layout transform; `load` and `save` both
walk it, and `load` picks the family by the checkpoint's `model_type`. Files are read and written
tensor by tensor, so conversion never holds two full copies of the weights. Every problem with a
checkpoint is reported as one sentence naming the file and the tensor or field.

    from fourd_jax import hf
    model, params = hf.load("path/to/hf_dir", dtype="float32")
    hf.save(model, params, "out_dir", tokenizer=tokenizer)
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from fourd_jax import families
from fourd_jax.convert.tables import CheckpointError, Slot, hf_shape, to_hf, to_jax
from fourd_jax.errors import InputError
from fourd_jax.model.apply import abstract_params
from fourd_jax.model.config import DTYPES

# The conversion API, with the table types and transforms it is built from.
__all__ = [
    "CheckpointError", "Slot", "canonical_name", "check_params", "config_from_hf", "config_to_hf", "family_for",
    "hf_shape", "load", "save", "tensor_slots", "to_hf", "to_jax",
]


# ----------------------------------------------------------------------------- families


def family_for(hf_config: dict[str, Any], source: str = "config.json") -> families.Family:
    """The model family a `transformers` config dict describes, or one clear error."""
    model_type = hf_config.get("model_type")
    family = families.for_hf_model_type(model_type)
    if family is None:
        known = " or ".join(repr(t) for t in families.hf_model_types())
        raise CheckpointError(
            f"{source} describes model_type {model_type!r} (architectures "
            f"{hf_config.get('architectures')}), but only {known} is supported."
        )
    return family


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json", **overrides) -> Any:
    """A model config from a `transformers` config dict, by its family's mapping."""
    return family_for(hf_config, source).hf_config_mapping().config_from_hf(hf_config, source, **overrides)


def config_to_hf(config: Any) -> dict[str, Any]:
    """The `transformers` config dict of a model config, by its family's mapping."""
    return families.family_of(config).hf_config_mapping().config_to_hf(config)


def tensor_slots(config: Any) -> dict[str, Slot]:
    """Every HF tensor name this config has, mapped to its slot (its family's name table)."""
    return families.family_of(config).name_table().tensor_slots(config)


def canonical_name(name: str, config: Any = None) -> str:
    """The on-disk HF name for any accepted spelling of a tensor name of `config`'s family
    (without a config, of the default family, Qwen2.5-VL)."""
    family = families.DEFAULT if config is None else families.family_of(config)
    return family.name_table().canonical_name(name)


# ----------------------------------------------------------------------------- loading


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}).") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} lists {f.name}, which does not exist.")
        return files
    if single.exists():
        return [single]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [path / found[0]]
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" (it has PyTorch pickles {bins}; re-save them with safe_serialization=True)" if bins else "")
    raise CheckpointError(f"{path} has no safetensors weights (model.safetensors or "
                          f"model.safetensors.index.json){hint}.")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    for f in files:
        try:
            handle = safe_open(str(f), framework="numpy")
        except Exception as e:  # noqa: BLE001 - safetensors raises several unrelated types
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}).") from None
        with handle:
            for key in handle.keys():
                yield f, key, handle


def load(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    shardings: Any = None,
    **config_overrides,
) -> tuple[Any, Any]:
    """Read a `transformers` directory of a known family (Qwen2.5-VL, Qwen3-VL) into (model, params).

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: parameter dtype ('float32' or 'bfloat16'); also the compute dtype unless
        `compute_dtype` is given.
      shardings: optional pytree of `jax.sharding.Sharding` matching params; each parameter is
        placed directly with it.
      config_overrides: ModelConfig fields to change (e.g. remat_policy).
    Raises:
      CheckpointError naming the file and tensor for missing, unexpected or mis-shaped tensors,
      another architecture, or a directory without weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json.")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}).") from None
    family = family_for(hf_config, str(config_file))
    config = family.hf_config_mapping().config_from_hf(hf_config, str(config_file), param_dtype=dtype,
                                                      dtype=compute_dtype or dtype, **config_overrides)
    model = family.module_type()(config)
    names = family.name_table()
    files = _weight_files(path)

    shapes = {"/".join(k): v.shape
              for k, v in traverse_util.flatten_dict(nn.meta.unbox(abstract_params(model))).items()}
    slots = names.tensor_slots(config)
    np_dtype = DTYPES[config.param_dtype]
    arrays = {p: np.empty(s, np_dtype) for p, s in shapes.items()}
    seen: set[str] = set()
    tied_head = None
    for file, key, handle in _iter_tensors(files):
        name = names.canonical_name(key)
        if name == names.tied_head and config.tie_word_embeddings:
            tied_head = (file, handle.get_tensor(key))
            continue
        slot = slots.get(name)
        if slot is None:
            raise CheckpointError(f"{file} has unexpected tensor '{key}', which is not part of a "
                                  f"{family.title} with this config.")
        if name in seen:
            raise CheckpointError(f"{file} repeats tensor '{key}', already read from another file.")
        shape = shapes[slot.path] if slot.layer is None else shapes[slot.path][1:]
        want = hf_shape(slot.rule, shape, config)
        got = tuple(handle.get_slice(key).get_shape())
        if got != want:
            raise CheckpointError(f"{file}: tensor '{key}' has shape {got}, but config.json implies {want}.")
        value = to_jax(slot.rule, handle.get_tensor(key), shape).astype(np_dtype)
        if slot.layer is None:
            arrays[slot.path][...] = value
        else:
            arrays[slot.path][slot.layer] = value
        seen.add(name)
    missing = [n for n in slots if n not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path} is missing tensor '{missing[0]}'{more}.")
    if tied_head is not None:
        file, head = tied_head
        embed = arrays[names.embedding]
        if head.shape != embed.shape or not np.array_equal(head.astype(np_dtype), embed):
            raise CheckpointError(f"{file} has '{names.tied_head}' that differs from the embedding, but "
                                  "config.json sets tie_word_embeddings = true.")
    return model, _to_device(arrays, shardings)


def _to_device(arrays: dict[str, np.ndarray], shardings: Any) -> Any:
    """Move flat numpy params to devices one at a time, releasing each host copy as it goes."""
    flat_shardings = (None if shardings is None else
                      {"/".join(k): v for k, v in traverse_util.flatten_dict(shardings).items()})
    out = {}
    for key in list(arrays):
        host = arrays.pop(key)
        target = None if flat_shardings is None else flat_shardings[key]
        out[tuple(key.split("/"))] = jax.device_put(host, target)
        del host
    return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise InputError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'.")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def check_params(config: Any, params: Any, what: str = "params") -> None:
    """Raise one clear error when params lack, add or mis-shape a parameter of this config."""
    model = families.family_of(config).module_type()(config)
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(abstract_params(model))).items()}
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
    for key in want:
        if key not in got:
            raise CheckpointError(f"{what} is missing parameter '{key}'.")
    for key in got:
        if key not in want:
            raise CheckpointError(f"{what} has unexpected parameter '{key}'.")
        if got[key] != want[key]:
            raise CheckpointError(f"{what}: parameter '{key}' has shape {got[key]}, expected {want[key]}.")


def save(
    model: Any,
    params: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write params as a `transformers` directory of the model's family (Qwen2.5-VL, Qwen3-VL).

    Writes config.json, model.safetensors (or shards plus model.safetensors.index.json when the
    total exceeds `max_shard_size`) and, when given, the tokenizer files. Each file is written
    under a temporary name and renamed, so a reader never sees half a file.
    """
    config = model.config
    check_params(config, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
    slots = tensor_slots(config)
    limit = _parse_size(max_shard_size)

    # Plan shards from shapes alone, then materialise one shard at a time.
    plan: list[list[str]] = [[]]
    sizes, shard_bytes = {}, 0
    for name, slot in slots.items():
        leaf = flat[slot.path]
        shape = leaf.shape if slot.layer is None else leaf.shape[1:]
        sizes[name] = math.prod(shape) * np.dtype(leaf.dtype).itemsize
        if plan[-1] and shard_bytes + sizes[name] > limit:
            plan.append([])
            shard_bytes = 0
        plan[-1].append(name)
        shard_bytes += sizes[name]
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    weight_map = {}
    for file_name, members in zip(names, plan, strict=True):
        tensors = {}
        for name in members:
            slot = slots[name]
            leaf = flat[slot.path]
            value = np.asarray(leaf if slot.layer is None else leaf[slot.layer])
            shape = value.shape
            tensors[name] = to_hf(slot.rule, value, hf_shape(slot.rule, shape, config))
            weight_map[name] = file_name
        _atomic(out / file_name, lambda p, t=tensors: save_file(t, p, metadata={"format": "pt"}))
        del tensors
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _atomic(out / "model.safetensors.index.json",
                lambda p: Path(p).write_text(json.dumps(index, indent=2, sort_keys=True)))
    for stale in [p for p in out.glob("model*.safetensors") if p.name not in names]:
        stale.unlink()
    if len(plan) == 1 and (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()
    hf_config = config_to_hf(config)
    _atomic(out / "config.json",
            lambda p: Path(p).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _atomic(target: Path, write) -> None:
    """`write(path)` to a temporary file beside `target`, then rename it into place with the
    permissions an ordinary new file gets (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """This process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
