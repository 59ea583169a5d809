"""`fourd-jax demo`: the most complete end-to-end job the project can run so far, on CPU.

Today: build the offline tokenizer (with the latent tokens), initialise a tiny Qwen2.5-VL, turn
a rendered clip into patches and a chat prompt, compute imagery targets for an imagery image and
feed them as latent inputs, decode greedily with the KV cache (checked against the full
forward), and round-trip the weights through Hugging Face safetensors and an Orbax checkpoint
(checked bit for bit). Later stages (synthetic 4D data, DIFT, 4DRL, evaluation) extend it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fourd_jax import checkpoint
from fourd_jax.convert import hf
from fourd_jax.data.processor import expand_placeholders, patchify
from fourd_jax.data.sim.render import overlay_mask
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.model import Qwen25VL, forward, init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.imagery import expand_output_images, imagery_targets
from fourd_jax.sample import greedy_generate, prepare_prompt

QUESTION = "How does the red square move?\n\nA. Moving Left\nB. Moving Right\nC. Moving Up\nD. Moving Down"
TRACE = "<think>The red square starts on the left. <output_image> It ends on the right.</think><answer>B</answer>"
CORPUS = [QUESTION, TRACE, "The camera pans right while the blue sphere stays still.",
          "Dolly In, Pan Left and Tilt Up. Moving Toward Camera. Speeding Up."] * 8


def render_clip(frames: int = 4, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """A red square crossing a textured floor left to right: (frames [T,H,W,3], masks [T,H,W])."""
    yy, xx = np.mgrid[:size, :size]
    floor = (96 + 48 * (((yy // 14) + (xx // 14)) % 2)).astype(np.uint8)
    video = np.repeat(floor[None, :, :, None], frames, 0).repeat(3, -1)
    masks = np.zeros((frames, size, size), bool)
    for t in range(frames):
        x0 = 8 + t * (size - 40) // max(frames - 1, 1)
        masks[t, 40:72, x0:x0 + 32] = True
        video[t][masks[t]] = (220, 30, 30)
    return video, masks


def run(workdir: str | Path, config: Any) -> dict:
    """Run the demo with the settings of `configs/demo.py`; write `workdir/demo.json`."""
    if config.model not in PRESETS:
        raise InputError(f"config.model {config.model!r} is not one of {sorted(PRESETS)}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    start = time.perf_counter()

    tokenizer = build_tokenizer(CORPUS, vocab_size=config.tokenizer_vocab_size)
    tokenizer.save_pretrained(workdir / "tokenizer")
    rows.append(("tokenizer (byte BPE + Qwen + latent tokens)", f"{len(tokenizer)} tokens -> {workdir / 'tokenizer'}"))

    model = Qwen25VL(config_for_tokenizer(tokenizer, PRESETS[config.model]()))
    params = init_params(model, jax.random.key(config.seed))
    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    rows.append(("tiny Qwen2.5-VL initialised", f"{n_params:,} parameters"))

    video, masks = render_clip(config.frames, config.image_size)
    video_patches, video_grid = patchify(video, model.config.vision)
    image_patches, image_grid = patchify(overlay_mask(video[0], masks[0])[None], model.config.vision)
    rows.append(("clip -> patches", f"video grid {video_grid}, imagery image grid {image_grid}"))

    trace = expand_output_images(TRACE, latent_size=config.latent_size)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_text = expand_placeholders(prompt_text, video_grids=[video_grid])
    full_ids = np.array([tokenizer(prompt_text + trace)["input_ids"]])
    targets = imagery_targets(model, params, image_patches, np.array([image_grid]), latent_size=config.latent_size)
    out = forward(model, params, full_ids, pixel_values_videos=video_patches, video_grid_thw=np.array([video_grid]),
                  second_per_grid_ts=np.array([2.0]), latent_embeds=targets[0])
    rows.append((f"forward with {config.latent_size} latent imagery inputs",
                 f"{full_ids.shape[1]} tokens, logits {tuple(out.logits.shape)}"))

    prompt_ids = np.array([tokenizer(prompt_text)["input_ids"]])
    prompt = prepare_prompt(model, prompt_ids, pixel_values_videos=video_patches,
                            video_grid_thw=np.array([video_grid]), second_per_grid_ts=np.array([2.0]))
    tokens = np.asarray(greedy_generate(params, prompt, model=model, max_new_tokens=config.max_new_tokens))
    # The cached decode must equal the full forward run over the finished sequence.
    seq = np.concatenate([prompt_ids, tokens], axis=1)
    logits = forward(model, params, seq, pixel_values_videos=video_patches, video_grid_thw=np.array([video_grid]),
                     second_per_grid_ts=np.array([2.0])).logits
    chosen = np.argmax(np.asarray(logits[0, prompt_ids.shape[1] - 1:-1]), axis=-1)
    if not np.array_equal(chosen, tokens[0]):
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
