"""`fourd-jax bench forward [--family qwen3_vl]`: jitted JAX forward vs eager PyTorch (`transformers`).

Both frameworks run the same weights of one family (Qwen2.5-VL, or Qwen3-VL with DeepStack and
interleaved M-RoPE), written once by `transformers` and read by `fourd_jax.hf.load`, on the same
batch: two rows, each with text, an image and a video (for Qwen3-VL the video is laid out as its
processor does: one vision block per temporal patch, each after its timestamp text). The outputs
are checked to agree before anything is timed.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import jax
import numpy as np

from fourd_jax.bench import roofline
from fourd_jax.bench.report import record as record_row
from fourd_jax.convert import hf
from fourd_jax.data.processor import patchify
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig, TextConfig, VisionConfig
from fourd_jax.model.inputs import prepare_inputs, prepare_vision
from fourd_jax.model.positions import get_rope_index
from fourd_jax.model.qwen3vl_config import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig
from fourd_jax.train.observe import decoder_flops_per_token, vision_flops_per_patch

SIZES = {
    "small": dict(hidden=512, intermediate=1536, layers=4, heads=8, kv=2, vocab=8192,
                  vision_hidden=256, vision_intermediate=640, vision_depth=4, vision_heads=4,
                  image=224, frames=8, text=64),
    "tiny": dict(hidden=128, intermediate=256, layers=2, heads=4, kv=2, vocab=1024,
                 vision_hidden=64, vision_intermediate=128, vision_depth=2, vision_heads=2,
                 image=112, frames=4, text=16),
    # For an accelerator (issue 14, section 6): Qwen2.5-0.5B's decoder and Qwen2.5-VL's vision tower, 1.3B
    # parameters in all. Attention is dense: on a GPU, XLA's fused attention beats a loop over tiles.
    "1b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv=2, vocab=151936,
               vision_hidden=1280, vision_intermediate=3420, vision_depth=32, vision_heads=16,
               image=224, frames=8, text=64, attention_block=0),
}


FAMILIES = ("qwen2_5_vl", "qwen3_vl")
TIMESTAMP_TOKENS = 3  # the text "<t.t seconds>" before each Qwen3-VL video block, as random tokens
# On a CPU the benches' sequences (800-1000 tokens) attend in tiles of 128 x 128, as the recipe's 8K-token ones
# do in 512 x 512: the tiles their causal or packed masks empty are skipped. A size may set its own.
ATTENTION_BLOCK = 128


def bench_config(size: str, family: str = "qwen2_5_vl") -> ModelConfig | Qwen3VLConfig:
    """The bench model of a size in one family (random weights; same widths in both families)."""
    if family == "qwen3_vl":
        return qwen3_bench_config(size)
    s = SIZES[size]
    v = s["vocab"]
    half = s["hidden"] // s["heads"] // 2
    temporal = half // 4  # Qwen's split of the rotary half-dim: 1/4 time, 3/8 rows, 3/8 columns
    return ModelConfig(
        text=TextConfig(vocab_size=v, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                        num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv"],
                        mrope_section=(temporal, (half - temporal) // 2, (half - temporal) // 2)),
        vision=VisionConfig(depth=s["vision_depth"], hidden_size=s["vision_hidden"],
                            intermediate_size=s["vision_intermediate"], num_heads=s["vision_heads"],
                            out_hidden_size=s["hidden"], fullatt_block_indexes=(s["vision_depth"] - 1,)),
        tie_word_embeddings=False,
        vision_start_token_id=v - 8, vision_end_token_id=v - 7, image_token_id=v - 6,
        video_token_id=v - 5, bos_token_id=v - 4, eos_token_id=v - 3, pad_token_id=v - 4,
        attention_block=s.get("attention_block", ATTENTION_BLOCK),
    )


def latent_bench_config(size: str) -> ModelConfig:
    """The Qwen2.5-VL bench model with the 4DThinker latent tokens (start, pad, end) below the
    vision ids, as the DIFT and GRPO benches need them."""
    v = SIZES[size]["vocab"]
    return bench_config(size).replace(latent_start_token_id=v - 11, latent_pad_token_id=v - 10,
                                      latent_end_token_id=v - 9)


def qwen3_bench_config(size: str) -> Qwen3VLConfig:
    """The Qwen3-VL bench model: the widths of SIZES, head_dim = hidden / heads, Qwen3-VL's mrope
    split (24, 20, 20) of 64 scaled to the rotary half, and DeepStack after all but the last block."""
    s = SIZES[size]
    v = s["vocab"]
    half = s["hidden"] // s["heads"] // 2
    temporal = half * 3 // 8
    units = (s["image"] // 32) ** 2  # merge units of a bench image; the learned grid has 4 patches per unit
    return Qwen3VLConfig(
        text=Qwen3TextConfig(vocab_size=v, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                             num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv"],
                             head_dim=s["hidden"] // s["heads"], rope_theta=10000.0,
                             mrope_section=(temporal, (half - temporal) // 2, (half - temporal) // 2),
                             max_position_embeddings=8192),
        vision=Qwen3VisionConfig(depth=s["vision_depth"], hidden_size=s["vision_hidden"],
                                 intermediate_size=s["vision_intermediate"], num_heads=s["vision_heads"],
                                 out_hidden_size=s["hidden"], num_position_embeddings=4 * units,
                                 deepstack_visual_indexes=tuple(range(s["vision_depth"] - 1))),
        tie_word_embeddings=False,
        vision_start_token_id=v - 8, vision_end_token_id=v - 7, image_token_id=v - 6,
        video_token_id=v - 5, bos_token_id=v - 4, eos_token_id=v - 3, pad_token_id=v - 4,
        attention_block=s.get("attention_block", ATTENTION_BLOCK),
    )


def bench_batch(config: ModelConfig | Qwen3VLConfig, size: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows of text + image + text + video + text, as the family's processor outputs them."""
    s = SIZES[size]
    qwen3 = isinstance(config, Qwen3VLConfig)
    factor = config.vision.patch_size * config.vision.spatial_merge_size
    side = s["image"] // factor * factor  # frames resized to multiples of the family's factor
    rs = np.random.RandomState(seed)
    m2 = config.vision.spatial_merge_size**2
    ids, pix, pixv, grids, vgrids = [], [], [], [], []
    for _ in range(2):
        image = rs.randint(0, 256, (1, side, side, 3), dtype=np.uint8)
        video = rs.randint(0, 256, (s["frames"], side, side, 3), dtype=np.uint8)
        (p, g), (pv, gv) = patchify(image, config.vision), patchify(video, config.vision)
        pix.append(p)
        pixv.append(pv)
        grids.append(g)
        vgrids.append(gv)
        text = lambda n: rs.randint(0, config.vision_start_token_id, n).tolist()  # noqa: E731
        block = lambda token, n: [config.vision_start_token_id, *[token] * n, config.vision_end_token_id]  # noqa: E731
        if qwen3:  # one block per temporal patch, each after its timestamp text
            video_ids = sum((text(TIMESTAMP_TOKENS) + block(config.video_token_id, gv[1] * gv[2] // m2)
                             for _ in range(gv[0])), [])
        else:
            video_ids = block(config.video_token_id, int(np.prod(gv)) // m2)
        ids.append(text(s["text"]) + block(config.image_token_id, int(np.prod(g)) // m2) + text(8) + video_ids
                   + text(s["text"]))
    input_ids = np.array(ids)
    batch = dict(
        input_ids=input_ids, attention_mask=np.ones_like(input_ids),
        pixel_values=np.concatenate(pix), image_grid_thw=np.array(grids),
        pixel_values_videos=np.concatenate(pixv), video_grid_thw=np.array(vgrids),
        mm_token_type_ids=np.where(input_ids == config.image_token_id, 1,
                                   np.where(input_ids == config.video_token_id, 2, 0)),
    )
    if not qwen3:  # Qwen3-VL's video times are the timestamp text, not a position scale
        batch["second_per_grid_ts"] = np.full(2, 2.0, np.float32)
    return batch


def forward_flops(config: ModelConfig | Qwen3VLConfig, batch: dict[str, np.ndarray]) -> float:
    """FLOPs of one forward on a processor batch (images, videos, both or neither): the decoder on
    every token (logits included) and the vision tower on every patch (Qwen3-VL's patches attend
    over their whole frame, h * w)."""
    patches = sum(batch[key].shape[0] for key in ("pixel_values", "pixel_values_videos") if key in batch)
    grids = batch.get("image_grid_thw", batch.get("video_grid_thw"))
    span = None
    if isinstance(config, Qwen3VLConfig) and grids is not None:
        _, h, w = grids[0]  # the bench's images and video frames share one size
        span = int(h * w)
    return (batch["input_ids"].size * decoder_flops_per_token(config, batch["input_ids"].shape[1], trainable=False)
            + patches * vision_flops_per_patch(config, span))


def run(size: str = "small", repeats: int = 5, record: bool = True, family: str = "qwen2_5_vl") -> dict[str, Any]:
    """Time both forwards of a family's bench model; print and (optionally) record the ratio."""
    if family not in FAMILIES:
        raise InputError(f"--family {family!r} is not one of {', '.join(FAMILIES)}.")
    # The baseline; heavy, and only the torch side needs it.
    import torch
    import transformers

    hf_names = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}[family]
    hf_config, hf_model = (getattr(transformers, name) for name in hf_names)
    config = bench_config(size, family)
    torch.manual_seed(0)
    torch_model = hf_model(hf_config.from_dict(hf.config_to_hf(config))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = hf.load(tmp, attention_block=config.attention_block)
    batch = bench_batch(config, size)
    torch_batch = {k: torch.tensor(v) for k, v in batch.items()}

    if family == "qwen3_vl":  # the family's own layout and positions, from the processor outputs
        prepared = prepare_inputs(model.config, **batch)
        positions, vision = prepared.position_ids, prepared.vision
    else:  # transformers 5.x positions text after a video by its spatial extent; use the same positions.
        positions, _ = get_rope_index(
            config.replace(mrope_text_start="spatial_extent"), batch["input_ids"],
            batch["image_grid_thw"], batch["video_grid_thw"], batch["second_per_grid_ts"])
        vision = prepare_vision(config, batch["pixel_values"], batch["image_grid_thw"],
                                batch["pixel_values_videos"], batch["video_grid_thw"])

    @jax.jit
    def forward(params, input_ids, position_ids, vision):
        return model.apply({"params": params}, input_ids, position_ids=position_ids, vision=vision).logits

    start = time.perf_counter()
    ours = np.asarray(forward(params, batch["input_ids"], positions, vision))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = torch_model(**torch_batch).logits.numpy()
    max_diff = float(np.abs(ours - ref).max())
    if max_diff > 1e-3:
        raise RuntimeError(f"JAX and PyTorch forwards disagree (max |diff| {max_diff:.2e}); not timing.")

    jax_runs = roofline.time_runs(
        lambda: forward(params, batch["input_ids"], positions, vision).block_until_ready(), repeats)
    with torch.no_grad():
        torch_runs = roofline.time_runs(lambda: torch_model(**torch_batch), repeats)
    tokens = int(batch["input_ids"].size)
    roof, roof_line = roofline.compute_roof(forward_flops(config, batch), jax_runs, torch_runs,
                                            (tokens, config.text.hidden_size, config.text.intermediate_size),
                                            "forward")
    jax_s, torch_s = jax_runs.median, torch_runs.median
    result = {
        "family": family, "size": size, "tokens": tokens, "jax ms": round(jax_s * 1e3, 1),
        "jax spread ms": jax_runs.spread_ms(), "torch ms": round(torch_s * 1e3, 1),
        "torch spread ms": torch_runs.spread_ms(),
        "speed-up (torch / jax)": round(torch_s / jax_s, 2), **roof, "jax compile s": round(compile_s, 1),
        "max logit diff": f"{max_diff:.1e}", "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(f"forward ({family} {size}, {tokens} tokens, batch 2, fp32): jax {jax_runs.ms()}, torch eager "
          f"{torch_runs.ms()} -> jax is {result['speed-up (torch / jax)']}x the speed of torch (median (spread) of "
          f"{repeats}; logits agree to {max_diff:.1e})")
    print(roof_line)
    if record:
        path = record_row(
            "forward",
            "`fourd-jax bench forward`: one jitted JAX forward vs one eager `transformers` forward "
            "(`torch.no_grad`, default SDPA attention) on the same weights of one family and batch (2 rows "
            "of text, an image and a video; Qwen3-VL frames are cut to multiples of 32 px: "
            + "; ".join(f"{name}: {s['image']} px, {s['frames']} frames" for name, s in SIZES.items())
            + "), fp32, median wall time.",
            result,
        )
        print(f"recorded in {path}")
    return result
