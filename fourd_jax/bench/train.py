"""`fourd-jax bench train`: one DIFT step in JAX vs the same step in PyTorch, same machine.

Both sides run the same Qwen2.5-VL weights (a size of `bench forward`: `small` on a CPU, `1b` on
an accelerator), the same batch (2 or more examples: text, an 8-frame video, a trace with two
latent blocks fed by two imagery images) and the same optimizer (AdamW, weight decay on matrices,
clipping, vision tower and merger frozen): imagery targets from the frozen tower, input
embeddings replaced at the latent pads, 0.1 * CE + 1.0 * latent cosine loss, backward, update.
JAX: one jitted step with donated state; PyTorch: `transformers` eager + `torch.optim.AdamW`, on
the GPU when torch sees one. Weights and optimizer are float32; `--dtype bfloat16` computes in
bf16 (torch: autocast). The first step's losses are checked to agree.
"""

from __future__ import annotations

import functools
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax import sharding
from fourd_jax.batch import device_batch
from fourd_jax.bench import roofline
from fourd_jax.bench.forward import latent_bench_config
from fourd_jax.bench.report import record as record_row
from fourd_jax.convert import hf
from fourd_jax.data.batching import collate
from fourd_jax.data.processor import process
from fourd_jax.errors import InputError
from fourd_jax.model.positions import get_rope_index
from fourd_jax.train.dift import StaticSizes, flops_fn, train_step
from fourd_jax.train.optim import make_optimizer, trainable_mask
from fourd_jax.train.settings import DiftLossConfig, OptimSettings
from fourd_jax.train.state import new_state

LATENT = 4


def dift_batch(config: Any, seed: int = 0, packed: bool = False, examples: int = 2) -> dict[str, Any]:
    """Features of `examples` (an even number of) examples, collated as the pipeline does: one row
    each, padded to a multiple of 128 tokens, or (packed) two to a row padded to a multiple of 64."""
    if examples < 2 or examples % 2:
        raise InputError(f"--examples must be a positive even number, not {examples}.")
    rs = np.random.RandomState(seed)
    vc = config.vision
    features = []
    start, pad, end = config.latent_token_ids
    for _ in range(examples):
        video, grid = process(rs.randint(0, 256, (8, 224, 224, 3), dtype=np.uint8), vc, 4 * 784, 256 * 784)
        imagery = [process(rs.randint(0, 256, (1, 224, 224, 3), dtype=np.uint8), vc, 4 * 784, 256 * 784)
                   for _ in range(2)]
        text = lambda n: rs.randint(0, config.vision_start_token_id - 16, n).tolist()  # noqa: E731
        prompt = (text(48) + [config.vision_start_token_id] + [config.video_token_id] * (int(np.prod(grid)) // 4)
                  + [config.vision_end_token_id] + text(32))
        answer = text(16) + [start] + [pad] * LATENT + [end] + text(16) + [start] + [pad] * LATENT + [end] + text(8)
        ids = np.array(prompt + answer, np.int32)
        loss_mask = np.zeros(len(ids), np.float32)
        loss_mask[len(prompt) - 1:-1] = 1
        loss_mask[:-1][ids[1:] == pad] = 0
        positions, _ = get_rope_index(config, ids[None], video_grid_thw=np.array([grid]),
                                      second_per_grid_ts=np.array([1.0]))
        features.append({
            "input_ids": ids, "targets": np.append(ids[1:], 0).astype(np.int32), "loss_mask": loss_mask,
            "latent_mask": ids == pad, "position_ids": positions[:, 0].astype(np.int32),
            "prompt_length": len(prompt), "video_patches": video, "video_grid": np.array(grid),
            "second_per_grid": 1.0, "imagery_patches": np.concatenate([p for p, _ in imagery]),
            "imagery_grids": np.array([g for _, g in imagery]), "answer": "A", "sample_id": "bench", "family": "x",
            "subtask": "x",
        })
    if packed:
        longest = sorted(len(e["input_ids"]) for e in features)[-2:]  # any row of two fits the longest two
        length = -(-sum(longest) // 64) * 64
        return collate(features, examples, (length,), config, LATENT, packed_rows=examples // 2)
    length = -(-max(len(e["input_ids"]) for e in features) // 128) * 128
    return collate(features, examples, (length,), config, LATENT)


def torch_step_fn(config: Any, batch: dict[str, Any], hf_dir: str, lr: float, device: Any = None,
                  dtype: str = "float32"):
    """A PyTorch DIFT step on the same batch and weights, on `device` (default: the CPU): float32
    weights and AdamW, the forward and backward under bf16 autocast when `dtype` is bfloat16.
    Returns the step callable (its loss, once the device is done)."""
    # The baseline; heavy, and only the torch side needs it.
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    model.train()
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    merge = config.vision.spatial_merge_size**2
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        video_rows = int(batch["video_tokens"][b]) * merge
        imagery_grids = [(1, 16, 16), (1, 16, 16)]
        rows.append({k: v.to(device) for k, v in dict(
            ids=torch.tensor(batch["input_ids"][b:b + 1, :n], dtype=torch.long),
            positions=torch.tensor(batch["position_ids"][:, b:b + 1, :n], dtype=torch.long),
            video=torch.tensor(batch["video_patches"][b, :video_rows]),
            video_grid=torch.tensor([[4, 16, 16]]),
            imagery=torch.tensor(batch["imagery_patches"][b, :512]), imagery_grid=torch.tensor(imagery_grids),
            targets=torch.tensor(batch["targets"][b, :n], dtype=torch.long),
            loss_mask=torch.tensor(batch["loss_mask"][b, :n]),
            latent=torch.tensor(batch["latent_mask"][b, :n])).items()})
    ce_count = float(batch["loss_mask"].sum())
    lat_count = float(batch["latent_mask"].sum())
    pad_id = config.latent_pad_token_id

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for r in rows:
            with autocast:
                with torch.no_grad():
                    tokens = model.model.visual(r["imagery"], grid_thw=r["imagery_grid"]).pooler_output
                    chunks = tokens.reshape(2, LATENT, -1, tokens.shape[-1]).mean(2).reshape(-1, tokens.shape[-1])
                embeds = model.get_input_embeddings()(r["ids"])
                embeds = embeds.masked_scatter((r["ids"] == pad_id)[..., None], chunks[None].to(embeds.dtype))
                out = model.model(inputs_embeds=embeds, pixel_values_videos=r["video"],
                                  video_grid_thw=r["video_grid"], position_ids=r["positions"])
                hidden = out.last_hidden_state[0]
                logits = model.lm_head(hidden)
                ce = torch.nn.functional.cross_entropy(logits.float(), r["targets"], reduction="none")
                predicts = torch.zeros_like(r["latent"])
                predicts[:-1] = r["latent"][1:]
                cos = torch.nn.functional.cosine_similarity(hidden[predicts].float(), chunks.float(), dim=-1)
                loss = 0.1 * (ce * r["loss_mask"]).sum() / ce_count + (1 - cos).sum() / lat_count
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        return float(total)  # waits for the device: the step is done

    return step


def run(size: str = "small", repeats: int = 5, record: bool = True, dtype: str = "float32",
        examples: int = 2) -> dict[str, Any]:
    """Time both DIFT steps on `examples` examples of the `size` bench model, computing in `dtype`
    (float32 weights and optimizer either way); print and (optionally) record the ratio, the
    fraction of the measured matmul peak and, on an accelerator, the MFU."""
    # The baseline; heavy, and only the torch side needs it.
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    roofline.checked_dtype(dtype)
    config = latent_bench_config(size)
    batch = dift_batch(config, examples=examples)
    lr = 1e-4
    device = roofline.torch_device()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hf.config_to_hf(config))).save_pretrained(tmp)
        model, params = hf.load(tmp, compute_dtype=dtype, attention_block=config.attention_block)
        torch_step = torch_step_fn(config, batch, tmp, lr, device, dtype)

    optim = OptimSettings(lr=lr, total_steps=10)
    tx = make_optimizer(optim, params)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, trainable=trainable_mask(params, optim.freeze),
                                     loss_config=DiftLossConfig()), static_argnames=("sizes",), donate_argnums=0)
    packed = dift_batch(config, packed=True, examples=examples)

    def jax_step(batch: dict[str, Any]) -> tuple[Any, Any, float]:
        """(time one step on `batch`, its compile + first run in s, the first loss); each layout
        starts from the same initial weights."""
        # Placed on the mesh as the step returns it, or the second call would compile the step again.
        state = jax.device_put(new_state(jax.tree_util.tree_map(jnp.copy, params), tx, 0),
                               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        dev, sizes = device_batch(batch, mesh, sharding.DEFAULT_RULES), StaticSizes.of(batch)
        start = time.perf_counter()
        state, metrics = step(state, dev, sizes=sizes)
        first, compile_s = float(metrics["loss"]), time.perf_counter() - start

        def once():
            nonlocal state
            state, m = step(state, dev, sizes=sizes)
            jax.block_until_ready(m["loss"])
        return once, compile_s, first

    jax_once, compile_s, jax_first = jax_step(packed)
    unpacked_once, _, unpacked_first = jax_step(batch)
    torch_first = torch_step()
    tolerance = 1e-3 if dtype == "float32" else 3e-2  # bf16 rounds differently in each framework
    for name, first in (("packed", jax_first), ("unpacked", unpacked_first)):
        if abs(first - torch_first) > tolerance * max(1.0, abs(torch_first)):
            raise RuntimeError(f"first-step losses disagree: JAX ({name}) {first:.6f} vs PyTorch {torch_first:.6f}")

    jax_runs, unpacked_runs = roofline.time_runs(jax_once, repeats), roofline.time_runs(unpacked_once, repeats)
    torch_runs = roofline.time_runs(torch_step, repeats)
    jax_s, torch_s = jax_runs.median, torch_runs.median
    tokens = int(batch["attention_mask"].sum())
    flops = flops_fn(config)(packed)  # the real tokens and patches: the same count in either layout
    roof, roof_line = roofline.compute_roof(
        flops, jax_runs, torch_runs, (packed["input_ids"].size, config.text.hidden_size,
                                      config.text.intermediate_size),
        "step (decoder forward + backward on the real tokens, frozen vision forward)", dtype)
    result = {"size": size, "dtype": dtype, "examples": examples, "torch device": device.type, "tokens": tokens,
              "slots packed": int(packed["input_ids"].size),
              "slots unpacked": int(batch["input_ids"].size), "jax ms": round(jax_s * 1e3, 1),
              "jax spread ms": jax_runs.spread_ms(),
              "jax unpacked ms": round(unpacked_runs.median * 1e3, 1), "torch ms": round(torch_s * 1e3, 1),
              "torch spread ms": torch_runs.spread_ms(),
              "speed-up (torch / jax)": round(torch_s / jax_s, 2), **roof,
              "jax compile s": round(compile_s, 1), "first loss jax": round(jax_first, 5),
              "first loss torch": round(torch_first, 5), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    rows = packed["input_ids"].shape[0]
    print(f"DIFT step ({size} model, {tokens} tokens, {examples} examples, {dtype}, torch on {device.type}): jax "
          f"{jax_runs.ms()} packed in {rows} row{'s' * (rows > 1)} of {packed['input_ids'].shape[1]} (unpacked, "
          f"{examples} rows of {batch['input_ids'].shape[1]}: {unpacked_runs.ms()}), torch {torch_runs.ms()} -> jax is "
          f"{result['speed-up (torch / jax)']}x the speed of torch (median (spread) of "
          f"{repeats}; first losses {jax_first:.5f} packed, {unpacked_first:.5f} unpacked, {torch_first:.5f} torch)")
    print(roof_line)
    if record:
        path = record_row(
            "train",
            "`fourd-jax bench train`: one DIFT step (imagery targets from the frozen tower, CE + latent cosine "
            "loss, backward, clipped AdamW update with the vision tower frozen) in jitted JAX vs eager "
            "`transformers` + `torch.optim.AdamW`, same weights, batch (`examples` rows, 8-frame 224 px video, two "
            "latent blocks each; JAX packs two to a row) and machine, float32 weights and optimizer, computing in "
            "`dtype` (torch: autocast), median wall time.",
            result,
        )
        print(f"recorded in {path}")
    return result
