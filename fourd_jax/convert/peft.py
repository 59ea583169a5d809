"""LoRA adapters <-> PEFT's on-disk layout (`adapter_config.json` + `adapter_model.safetensors`).

An adapter directory is also our adapter-only checkpoint: `save_adapter` writes the adapters of a
parameter tree (`fourd_jax.model.lora`) under the names PyTorch `peft` loads
(`base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]), and `load_adapter`
puts them back onto a base. Module names come from the family's HF name table (one layer of a
stacked kernel is one HF module), so any family with a table exports without code of its own.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from fourd_jax.convert import hf
from fourd_jax.convert.hf import _atomic
from fourd_jax.convert.tables import CheckpointError
from fourd_jax.errors import InputError
from fourd_jax.model import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's module names

# The module names `transformers` uses in memory, which PEFT's keys follow, where they differ from a
# family's on-disk tensor names (model_type -> (pattern, replacement) pairs). transformers 5 nests
# Qwen2.5-VL's decoder and tower under `model.`; its checkpoints keep the older names.
IN_MEMORY_NAMES: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "qwen2_5_vl": ((re.compile(r"^model\."), "model.language_model."), (re.compile(r"^visual\."), "model.visual.")),
}


def module_names(config: Any) -> dict[str, list[tuple[str, int | None]]]:
    """kernel path -> [(HF module name as PEFT spells it, layer index or None)] for every linear kernel."""
    model_type = hf.config_to_hf(config)["model_type"]
    renames = IN_MEMORY_NAMES.get(model_type, ())
    names: dict[str, list[tuple[str, int | None]]] = {}
    for name, slot in hf.tensor_slots(config).items():
        if slot.rule.kind != "linear":
            continue
        module = name.removesuffix(".weight")
        for pattern, repl in renames:
            if pattern.match(module):
                module = pattern.sub(repl, module, count=1)
                break
        names.setdefault(slot.path, []).append((module, slot.layer))
    return names


def _one_layer(leaf: np.ndarray, layer: int | None) -> np.ndarray:
    return leaf if layer is None else leaf[layer]


def save_adapter(model: Any, params: Any, out_dir: str | Path, base_model: str) -> Path:
    """Write the adapters in `params` as a PEFT LoRA directory; `base_model` is recorded as
    `base_model_name_or_path` (the HF directory or hub name of the base they adapt)."""
    spec = lora.spec_of(params)
    if spec.rank == 0:
        raise InputError("The checkpoint holds no LoRA adapters to export (it was not trained with lora.rank > 0).")
    _, adapters = lora.split(params)
    adapters = {path: np.asarray(jax.device_get(v), np.float32) for path, v in adapters.items()}
    names = module_names(model.config)
    tensors, targets = {}, []
    for module in lora.adapted_modules(params):
        a, b, scale = (adapters[f"{module}/{leaf}"] for leaf in lora.LEAVES)
        if not np.allclose(scale, spec.scale):
            raise InputError(f"LoRA adapter {module} has scale {np.ravel(scale)[0]}, the others {spec.scale}; PEFT "
                             "needs one alpha / rank for all of them.")
        for hf_module, layer in names[f"{module}/kernel"]:
            a1, b1 = _one_layer(a, layer), _one_layer(b, layer)
            tensors[f"{PREFIX}{hf_module}.lora_A.weight"] = np.ascontiguousarray(a1.reshape(-1, spec.rank).T)
            tensors[f"{PREFIX}{hf_module}.lora_B.weight"] = np.ascontiguousarray(b1.reshape(spec.rank, -1).T)
            targets.append(hf_module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(targets),  # full module names: exactly the adapted modules, no suffix matches
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    _atomic(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def load_adapter(model: Any, params: Any, adapter_dir: str | Path) -> Any:
    """`params` (a base without adapters) with the adapters of a PEFT LoRA directory added."""
    adapter_dir = Path(adapter_dir)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / f).is_file():
            raise InputError(f"{adapter_dir} has no {f} (a PEFT LoRA adapter directory holds {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE}).")
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("rank_pattern"):
        raise InputError(f"{adapter_dir / CONFIG_FILE} is not a plain LoRA adapter (peft_type LORA, one rank, no "
                         "rsLoRA).")
    rank, scale = int(config["r"]), float(config["lora_alpha"]) / int(config["r"])
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    base, _ = lora.split(params)
    flat = traverse_util.flatten_dict(base, sep="/")
    kernels = lora.linear_kernels(model.config)
    used = set()
    for path, modules in module_names(model.config).items():
        found = [f"{PREFIX}{m}.lora_A.weight" in tensors for m, _ in modules]
        if not any(found):
            continue
        if not all(found):
            raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE} adapts only some layers of {path}.")
        kernel, shape = kernels[path], flat[path].shape
        inputs = shape[kernel.lead: kernel.lead + kernel.n_in]
        outputs = shape[kernel.lead + kernel.n_in:]
        a_layers, b_layers = [], []
        for m, _ in modules:
            a_name, b_name = f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight"
            a, b = tensors[a_name], tensors[b_name]
            if a.shape != (rank, math.prod(inputs)) or b.shape != (math.prod(outputs), rank):
                want = ((rank, math.prod(inputs)), (math.prod(outputs), rank))
                raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: {a_name} / {b_name} have shapes {a.shape} / "
                                      f"{b.shape}, expected {want[0]} / {want[1]}.")
            a_layers.append(a.T.reshape(*inputs, rank))
            b_layers.append(b.T.reshape(rank, *outputs))
            used.update((a_name, b_name))
        module = lora.module_of(path)
        stack = (lambda xs: np.stack(xs)) if kernel.lead else (lambda xs: xs[0])
        flat[f"{module}/{lora.A}"] = stack(a_layers)
        flat[f"{module}/{lora.B}"] = stack(b_layers)
        flat[f"{module}/{lora.SCALE}"] = np.full(shape[: kernel.lead], scale, np.float32)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE} has tensor {unknown[0]}, which adapts no linear layer "
                              "of this model.")
    return traverse_util.unflatten_dict(flat, sep="/")
