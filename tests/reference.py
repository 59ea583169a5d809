"""Tiny random `transformers` Qwen2.5-VL references and processor-shaped batches for tests.

Nothing is downloaded: each reference model is built from a config here with random weights
(large enough that logits and greedy choices depend on the input), then saved with
`save_pretrained` so our loader reads exactly what transformers writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from fourd_jax.convert.hf import config_to_hf
from fourd_jax.model.config import ModelConfig, TextConfig, VisionConfig, tiny


def config_a() -> ModelConfig:
    """Tied embeddings, mrope (2, 3, 3), 56 px windows (2x2 units), full attention at 1 and 3."""
    return tiny()


def config_b() -> ModelConfig:
    """Untied, mrope (4, 2, 2), 112 px windows (4x4 units), full attention at 0, GQA 4/1."""
    v = 384
    return ModelConfig(
        text=TextConfig(vocab_size=v, hidden_size=64, intermediate_size=96, num_layers=3,
                        num_heads=4, num_kv_heads=1, rope_theta=50000.0, mrope_section=(4, 2, 2),
                        rms_norm_eps=1e-5, max_position_embeddings=2048),
        vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                            out_hidden_size=64, fullatt_block_indexes=(0,), window_size=112,
                            tokens_per_second=4),
        tie_word_embeddings=False,
        vision_start_token_id=v - 8, vision_end_token_id=v - 7, image_token_id=v - 6,
        video_token_id=v - 5, bos_token_id=v - 4, eos_token_id=v - 3, pad_token_id=v - 4,
    )


CONFIGS = {"a": config_a, "b": config_b}


def build_hf_model(config: ModelConfig, seed: int = 0, scale: float = 0.08):
    """A `transformers` model with random weights: N(0, scale) everywhere, norms around 1."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config_to_hf(config)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def save_hf_model(config: ModelConfig, directory: Path, seed: int = 0):
    model = build_hf_model(config, seed)
    model.save_pretrained(directory)
    return model


@dataclasses.dataclass
class Row:
    """One sample: a list of ('text', n) / ('image', (t, h, w)) / ('video', (t, h, w), seconds)."""

    parts: list


def make_batch(config: ModelConfig, rows: list[Row], seed: int = 0, pad_left: bool = True) -> dict:
    """Processor-shaped numpy inputs (left-padded by default), like Qwen2_5_VLProcessor returns."""
    rs = np.random.RandomState(seed)
    m2 = config.vision.spatial_merge_size**2
    text_vocab = config.vision_start_token_id  # ordinary tokens lie below the special ones
    seqs, images, videos, seconds = [], [], [], []
    for row in rows:
        ids = []
        for part in row.parts:
            if part[0] == "text":
                ids += rs.randint(0, text_vocab, part[1]).tolist()
                continue
            grid = tuple(part[1])
            tok = config.image_token_id if part[0] == "image" else config.video_token_id
            ids += [config.vision_start_token_id] + [tok] * (int(np.prod(grid)) // m2)
            ids += [config.vision_end_token_id]
            (images if part[0] == "image" else videos).append(grid)
            if part[0] == "video":
                seconds.append(part[2])
        seqs.append(ids)
    batch = assemble_batch(config, seqs, images, videos, rs, pad_left)
    if videos:
        batch["second_per_grid_ts"] = np.array(seconds, np.float32)
    return batch


def assemble_batch(config, seqs: list[list[int]], images: list, videos: list, rs: np.random.RandomState,
                   pad_left: bool) -> dict:
    """Padded input_ids / attention_mask of token rows, random pixel rows for the image and video
    grids, and mm_token_type_ids, as a processor returns them."""
    length = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), length), config.pad_token_id, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if pad_left else slice(0, len(s))
        input_ids[i, sl] = s
        mask[i, sl] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask)
    pd = config.vision.patch_dim
    if images:
        batch["image_grid_thw"] = np.array(images, np.int64)
        batch["pixel_values"] = rs.randn(sum(int(np.prod(g)) for g in images), pd).astype(np.float32)
    if videos:
        batch["video_grid_thw"] = np.array(videos, np.int64)
        batch["pixel_values_videos"] = rs.randn(sum(int(np.prod(g)) for g in videos), pd).astype(np.float32)
    batch["mm_token_type_ids"] = np.where(
        input_ids == config.image_token_id, 1, np.where(input_ids == config.video_token_id, 2, 0))
    return batch


def torch_inputs(batch: dict) -> dict:
    return {k: torch.tensor(v) for k, v in batch.items()}


def hf_logits(model, batch: dict, position_ids: np.ndarray | None = None) -> np.ndarray:
    inputs = torch_inputs(batch)
    if position_ids is not None:
        inputs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Largest |a - b| over positions that are real tokens (padding rows are not compared)."""
    keep = np.asarray(mask, bool)
    return float(np.abs(np.asarray(a, np.float32)[keep] - np.asarray(b, np.float32)[keep]).max())
