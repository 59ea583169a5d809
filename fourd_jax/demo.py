"""`fourd-jax demo`: the most complete end-to-end job the project can run so far, on CPU.

Today: synthesise a small set of procedural 4D scenes with their questions, train the offline
tokenizer on them (with the latent tokens), initialise a tiny Qwen2.5-VL, read training batches
through the Grain pipeline and run the model on one with the imagery targets fed as latent
inputs, decode a test prompt greedily with the KV cache (checked against the full forward), and
round-trip the weights through Hugging Face safetensors and an Orbax checkpoint (checked bit
for bit). Later stages (DIFT, 4DRL, evaluation) extend it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax import checkpoint
from fourd_jax.convert import hf
from fourd_jax.data import records
from fourd_jax.data.batching import vision_inputs
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.errors import InputError
from fourd_jax.model import Qwen25VL, encode_vision, forward, init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.imagery import segment_means
from fourd_jax.sample import greedy_generate, prepare_prompt


def feature_config(config: Any, supervised: bool = True) -> FeatureConfig:
    pixels = config.max_pixels
    return FeatureConfig(latent_size=config.latent_size, max_frames=config.frames, video_max_pixels=pixels,
                         imagery_max_pixels=pixels, supervised=supervised)


def batch_forward(model: Qwen25VL, params: Any, batch: dict[str, Any]):
    """The model on a pipeline batch, with the imagery targets fed at the latent pads (as in DIFT)."""
    imagery = vision_inputs(batch, "imagery")
    tokens = jax.lax.stop_gradient(encode_vision(model, params, imagery))
    targets = segment_means(tokens, jnp.asarray(batch["imagery_segment"]), tokens.shape[1])
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      position_ids=batch["position_ids"], vision=vision_inputs(batch, "video"),
                      latent_embeds=targets)
    return out, targets


def run(workdir: str | Path, config: Any) -> dict:
    """Run the demo with the settings of `configs/demo.py`; write `workdir/demo.json`."""
    if config.model not in PRESETS:
        raise InputError(f"config.model {config.model!r} is not one of {sorted(PRESETS)}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    start = time.perf_counter()

    data = workdir / "data"
    scene = SceneConfig(num_frames=config.frames, image_size=(config.image_size, config.image_size))
    manifest = synthesize(data, config.num_scenes, seed=config.seed, config=SynthConfig(scene=scene), progress=False)
    split_records = {k: v["records"] for k, v in manifest["splits"].items()}
    rows.append(("synthesised 4D scenes -> records", f"{config.num_scenes} scenes, records {split_records}"))

    tokenizer = build_tokenizer(record_texts(data / "train"), vocab_size=config.tokenizer_vocab_size)
    tokenizer.save_pretrained(workdir / "tokenizer")
    rows.append(("tokenizer (byte BPE + Qwen + latent tokens)", f"{len(tokenizer)} tokens -> {workdir / 'tokenizer'}"))

    model = Qwen25VL(config_for_tokenizer(tokenizer, PRESETS[config.model]()))
    params = init_params(model, jax.random.key(config.seed))
    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    rows.append((f"{config.model} Qwen2.5-VL initialised", f"{n_params:,} parameters"))

    pipeline = PipelineConfig(batch_size=config.batch_size, seed=config.seed, features=feature_config(config))
    batches = iter(build_dataset(data / "train", tokenizer, model.config, pipeline))
    batch = next(b for b in batches if b["latent_mask"].any())  # one that exercises the imagery inputs
    out, _ = batch_forward(model, params, batch)
    rows.append(("pipeline batch -> forward with imagery latents",
                 f"{int(batch['example_mask'].sum())} samples, {int(batch['latent_mask'].sum())} latent inputs, "
                 f"logits {tuple(out.logits.shape)}"))

    sample = next(records.read(data / "test"))
    prompt = featurize(sample, tokenizer, model.config, feature_config(config, supervised=False))
    video = {"pixel_values_videos": prompt["video_patches"], "video_grid_thw": prompt["video_grid"][None],
             "second_per_grid_ts": np.array([prompt["second_per_grid"]])}
    ids = prompt["input_ids"][None]
    tokens = np.asarray(greedy_generate(params, prepare_prompt(model, ids, **video), model=model,
                                        max_new_tokens=config.max_new_tokens))
    full = forward(model, params, np.concatenate([ids, tokens], axis=1), **video).logits
    if not np.array_equal(np.argmax(np.asarray(full[0, ids.shape[1] - 1:-1]), -1), tokens[0]):
        raise RuntimeError("KV-cache decoding diverged from the full forward.")
    rows.append((f"greedy decode, {config.max_new_tokens} tokens, KV cache",
                 "equals the full forward at every step (untrained text)"))

    hf.save(model, params, workdir / "hf", tokenizer=tokenizer)
    _, params_hf = hf.load(workdir / "hf")
    checkpoint.save_params(workdir / "checkpoint", model, params_hf)
    _, params_ckpt = checkpoint.restore_params(workdir / "checkpoint")
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(params_ckpt), strict=True))
    if not same:
        raise RuntimeError("The HF/Orbax round trip changed the parameters.")
    rows.append(("JAX -> HF safetensors -> JAX -> Orbax -> JAX", "parameters identical bit for bit"))

    elapsed = time.perf_counter() - start
    width = max(len(name) for name, _ in rows)
    print(f"\nfourd-jax demo ({elapsed:.0f} s on {jax.devices()[0].device_kind})")
    for name, result in rows:
        print(f"  {name:<{width}}  {result}")
    summary = {"steps": dict(rows), "seconds": round(elapsed, 1), "workdir": str(workdir),
               "config": config.to_dict()}
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
