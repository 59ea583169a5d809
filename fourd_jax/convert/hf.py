"""Hugging Face safetensors <-> JAX parameters for Qwen2.5-VL, both directions from one table.

`RULES` pairs each HF tensor name with a parameter path and a layout transform; `load` and
`save` both walk it. Files are read and written tensor by tensor, so conversion never holds two
full copies of the weights. Every problem with a checkpoint is reported as one sentence naming
the file and the tensor or field.

    from fourd_jax import hf
    model, params = hf.load("path/to/hf_dir", dtype="float32")
    hf.save(model, params, "out_dir", tokenizer=tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig, TextConfig, VisionConfig
from fourd_jax.model.vlm import Qwen25VL, abstract_params


class CheckpointError(InputError):
    """A checkpoint that does not match the model it claims to be."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor family <-> one parameter.

    hf: HF name; `{i}` stands for a layer/block index.
    path: parameter path joined by '/'; `{i}` in it means one parameter per block (vision),
      otherwise `stacked` parameters hold all layers on a leading axis (scanned decoder).
    kind: 'linear' (HF [out, in] <-> kernel [*in, *out] with `n_in` input axes), 'conv'
      (Conv3d weight <-> patch matmul kernel), 'flat' (HF 1-D <-> [heads, head_dim]-shaped
      biases) or 'same' (identical layout: norms, embeddings).
    """

    hf: str
    path: str
    kind: str = "same"
    n_in: int = 1
    stacked: bool = False


_DEC = "language_model/layers/"
_VIS = "visual/blocks_{i}/"
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "language_model/embed_tokens/embedding"),
    Rule("model.norm.weight", "language_model/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
    Rule("model.layers.{i}.input_layernorm.weight", _DEC + "input_layernorm/weight", stacked=True),
    Rule("model.layers.{i}.post_attention_layernorm.weight", _DEC + "post_attention_layernorm/weight",
         stacked=True),
    *(Rule(f"model.layers.{{i}}.self_attn.{p}_proj.weight", _DEC + f"{p}_proj/kernel", "linear",
           stacked=True) for p in "qkv"),
    *(Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", _DEC + f"{p}_proj/bias", "flat",
           stacked=True) for p in "qkv"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", _DEC + "o_proj/kernel", "linear", n_in=2,
         stacked=True),
    *(Rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", _DEC + f"mlp/{p}_proj/kernel", "linear",
           stacked=True) for p in ("gate", "up", "down")),
    Rule("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", "conv"),
    Rule("visual.blocks.{i}.norm1.weight", _VIS + "norm1/weight"),
    Rule("visual.blocks.{i}.norm2.weight", _VIS + "norm2/weight"),
    Rule("visual.blocks.{i}.attn.qkv.weight", _VIS + "attn/qkv/kernel", "linear"),
    Rule("visual.blocks.{i}.attn.qkv.bias", _VIS + "attn/qkv/bias", "flat"),
    Rule("visual.blocks.{i}.attn.proj.weight", _VIS + "attn/proj/kernel", "linear", n_in=2),
    Rule("visual.blocks.{i}.attn.proj.bias", _VIS + "attn/proj/bias"),
    *(Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.{w}", _VIS + f"mlp/{p}_proj/{k}",
           "linear" if w == "weight" else "same")
      for p in ("gate", "up", "down") for w, k in (("weight", "kernel"), ("bias", "bias"))),
    Rule("visual.merger.ln_q.weight", "visual/merger/ln_q/weight"),
    Rule("visual.merger.mlp.0.weight", "visual/merger/mlp_0/kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual/merger/mlp_0/bias"),
    Rule("visual.merger.mlp.2.weight", "visual/merger/mlp_2/kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual/merger/mlp_2/bias"),
)

# Names `transformers` >= 5 uses in memory (and some exports); normalised to the on-disk ones.
_ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


def canonical_name(name: str) -> str:
    """The on-disk HF name for any accepted spelling of a tensor name."""
    for pattern, repl in _ALIASES:
        name = pattern.sub(repl, name)
    return name


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives: parameter path, layer index (or None) and its transform."""

    path: str
    layer: int | None
    rule: Rule


def tensor_slots(config: ModelConfig) -> dict[str, Slot]:
    """Every HF tensor name this config has, mapped to its slot."""
    slots = {}
    for rule in RULES:
        if rule.hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "{i}" not in rule.hf:
            slots[rule.hf] = Slot(rule.path, None, rule)
            continue
        depth = config.text.num_layers if rule.stacked else config.vision.depth
        for i in range(depth):
            slots[rule.hf.format(i=i)] = Slot(
                rule.path if rule.stacked else rule.path.format(i=i), i if rule.stacked else None, rule
            )
    return slots


def hf_shape(rule: Rule, param_shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    """The HF tensor shape for one layer of a parameter of `param_shape` (layer axis removed)."""
    if rule.kind == "linear":
        return (math.prod(param_shape[rule.n_in:]), math.prod(param_shape[:rule.n_in]))
    if rule.kind == "conv":
        v = config.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if rule.kind == "flat":
        return (math.prod(param_shape),)
    return tuple(param_shape)


def to_jax(rule: Rule, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> parameter layout (one layer)."""
    if rule.kind == "conv":
        tensor = tensor.reshape(tensor.shape[0], -1)
    if rule.kind in ("linear", "conv"):
        tensor = tensor.T
    return tensor.reshape(param_shape)


def to_hf(rule: Rule, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Parameter layout (one layer) -> HF tensor of `shape`."""
    if rule.kind == "linear":
        return np.ascontiguousarray(array.reshape(shape[1], shape[0]).T)
    if rule.kind == "conv":
        return np.ascontiguousarray(array.reshape(-1, shape[0]).T.reshape(shape))
    return np.ascontiguousarray(array.reshape(shape))


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a `transformers` Qwen2.5-VL config dict (flat or nested layout)."""
    from transformers import Qwen2_5_VLConfig

    model_type = hf_config.get("model_type")
    if model_type != "qwen2_5_vl":
        raise CheckpointError(
            f"{source} describes model_type {model_type!r} (architectures "
            f"{hf_config.get('architectures')}), but only 'qwen2_5_vl' is supported."
        )
    cfg = Qwen2_5_VLConfig.from_dict(dict(hf_config))
    t, v = cfg.text_config, cfg.vision_config
    rope = dict(t.rope_parameters or {})
    unsupported = [
        (f"text_config.hidden_act = {t.hidden_act!r}", t.hidden_act != "silu"),
        (f"vision_config.hidden_act = {v.hidden_act!r}", v.hidden_act != "silu"),
        ("text_config.use_sliding_window = true", bool(getattr(t, "use_sliding_window", False))),
        (f"rope_type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("no mrope_section", "mrope_section" not in rope),
    ]
    for what, bad in unsupported:
        if bad:
            raise CheckpointError(f"{source}: {what} is not supported by fourd_jax's Qwen2.5-VL.")
    vision_rope = dict(v.rope_parameters or {})
    latent = {k: hf_config.get(k) for k in
              ("latent_start_token_id", "latent_pad_token_id", "latent_end_token_id")}
    if "mrope_text_start" in hf_config:  # written by `save` for a non-default mode
        latent["mrope_text_start"] = hf_config["mrope_text_start"]
    fields = dict(
        text=TextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads, rope_theta=float(rope["rope_theta"]),
            mrope_section=tuple(int(s) for s in rope["mrope_section"]), rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
        ),
        vision=VisionConfig(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size, fullatt_block_indexes=tuple(v.fullatt_block_indexes),
            in_channels=v.in_channels, tokens_per_second=v.tokens_per_second,
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        ),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        bos_token_id=t.bos_token_id, eos_token_id=_first(t.eos_token_id), pad_token_id=t.pad_token_id,
        initializer_range=t.initializer_range,
        **latent,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except InputError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `transformers` config dict (nested layout, as transformers 5 writes it)."""
    from transformers import Qwen2_5_VLConfig

    t, v = config.text, config.vision
    extra = {k: getattr(config, k) for k in
             ("latent_start_token_id", "latent_pad_token_id", "latent_end_token_id")
             if getattr(config, k) is not None}
    if config.mrope_text_start != ModelConfig.mrope_text_start:  # keep a non-default mode on reload
        extra["mrope_text_start"] = config.mrope_text_start
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(t.mrope_section)},
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, initializer_range=config.initializer_range,
        ),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
            in_channels=v.in_channels, tokens_per_second=v.tokens_per_second, hidden_act="silu",
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        ),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        **extra,
    )
    out = cfg.to_dict()
    out["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    out["dtype"] = config.param_dtype
    return out


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


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def load(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    shardings: Any = None,
    **config_overrides,
) -> tuple[Qwen25VL, Any]:
    """Read a `transformers` Qwen2.5-VL directory into (model, params).

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
    config = config_from_hf(hf_config, str(config_file), param_dtype=dtype,
                            dtype=compute_dtype or dtype, **config_overrides)
    model = Qwen25VL(config)
    files = _weight_files(path)

    shapes = {"/".join(k): v.shape
              for k, v in traverse_util.flatten_dict(_unbox(abstract_params(model))).items()}
    slots = tensor_slots(config)
    np_dtype = _np_dtype(dtype)
    arrays = {p: np.empty(s, np_dtype) for p, s in shapes.items()}
    seen: set[str] = set()
    tied_head = None
    for file, key, handle in _iter_tensors(files):
        name = canonical_name(key)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = (file, handle.get_tensor(key))
            continue
        slot = slots.get(name)
        if slot is None:
            raise CheckpointError(f"{file} has unexpected tensor '{key}', which is not part of a "
                                  f"Qwen2.5-VL with this config.")
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
        embed = arrays["language_model/embed_tokens/embedding"]
        if head.shape != embed.shape or not np.array_equal(head.astype(np_dtype), embed):
            raise CheckpointError(f"{file} has 'lm_head.weight' that differs from the embedding, but "
                                  "config.json sets tie_word_embeddings = true.")
    return model, _to_device(arrays, shardings)


def _unbox(tree):
    from flax import linen as nn

    return nn.meta.unbox(tree)


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


def check_params(config: ModelConfig, params: Any, what: str = "params") -> None:
    """Raise one clear error when params lack, add or mis-shape a parameter of this config."""
    want = {"/".join(k): v.shape for k, v in
            traverse_util.flatten_dict(_unbox(abstract_params(Qwen25VL(config)))).items()}
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(_unbox(params)).items()}
    for key in want:
        if key not in got:
            raise CheckpointError(f"{what} is missing parameter '{key}'.")
    for key in got:
        if key not in want:
            raise CheckpointError(f"{what} has unexpected parameter '{key}'.")
        if got[key] != want[key]:
            raise CheckpointError(f"{what}: parameter '{key}' has shape {got[key]}, expected {want[key]}.")


def save(
    model: Qwen25VL,
    params: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write params as a `transformers` Qwen2.5-VL directory.

    Writes config.json, model.safetensors (or shards plus model.safetensors.index.json when the
    total exceeds `max_shard_size`) and, when given, the tokenizer files. Each file is written
    under a temporary name and renamed, so a reader never sees half a file.
    """
    config = model.config
    check_params(config, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(_unbox(params)).items()}
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
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
