"""Tiny random `transformers` Qwen3-VL references and Qwen3-VL-processor-shaped batches for tests.

Nothing is downloaded: each reference model is built from a config here with random weights and
saved with `save_pretrained`, so our loader reads exactly what transformers writes. Videos are laid
out as the Qwen3-VL processor does: one vision block per temporal patch, timestamp text between.
"""

from __future__ import annotations

import numpy as np
import torch
from reference import Row, assemble_batch
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration

from fourd_jax.convert.hf import config_to_hf
from fourd_jax.model.qwen3vl_config import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig, tiny


def config_a() -> Qwen3VLConfig:
    """Tied; head_dim 24 != 64 / 4; mrope (4, 4, 4); DeepStack after blocks 0 and 2; 6x6 positions."""
    return tiny()


def config_b() -> Qwen3VLConfig:
    """Untied; head_dim 32; mrope (6, 5, 5); GQA 4/1; one DeepStack feature (block 1); 4x4 positions."""
    v = 384
    return Qwen3VLConfig(
        text=Qwen3TextConfig(vocab_size=v, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                             num_kv_heads=1, head_dim=32, rope_theta=50000.0, mrope_section=(6, 5, 5),
                             rms_norm_eps=1e-5, max_position_embeddings=2048),
        vision=Qwen3VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=48,
                                 num_position_embeddings=16, deepstack_visual_indexes=(1,)),
        tie_word_embeddings=False,
        vision_start_token_id=v - 8, vision_end_token_id=v - 7, image_token_id=v - 6, video_token_id=v - 5,
        bos_token_id=v - 4, eos_token_id=v - 3, pad_token_id=v - 4,
    )


CONFIGS = {"a": config_a, "b": config_b}


def build_hf_model(config: Qwen3VLConfig, seed: int = 0, scale: float = 0.08) -> Qwen3VLForConditionalGeneration:
    """A `transformers` Qwen3-VL with random weights: N(0, scale) everywhere, norm weights around 1."""
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(HFQwen3VLConfig.from_dict(config_to_hf(config)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "pos_embed" in name:
                p.copy_(0.5 * torch.randn_like(p))  # large enough that a wrong resampling shows
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def make_batch(config: Qwen3VLConfig, rows: list[Row], seed: int = 0, pad_left: bool = True) -> dict:
    """Processor-shaped numpy inputs like Qwen3VLProcessor returns: ('video', (t, h, w), _) becomes t
    blocks `<|vision_start|>` + h*w/4 video pads + `<|vision_end|>`, each after 3 timestamp tokens."""
    rs = np.random.RandomState(seed)
    m2 = config.vision.spatial_merge_size**2
    text_vocab = config.vision_start_token_id  # ordinary tokens lie below the special ones
    s, e = config.vision_start_token_id, config.vision_end_token_id
    seqs, images, videos = [], [], []
    for row in rows:
        ids = []
        for part in row.parts:
            if part[0] == "text":
                ids += rs.randint(0, text_vocab, part[1]).tolist()
            elif part[0] == "image":
                ids += [s] + [config.image_token_id] * (int(np.prod(part[1])) // m2) + [e]
                images.append(tuple(part[1]))
            else:
                t, h, w = part[1]
                for _ in range(t):
                    ids += rs.randint(0, text_vocab, 3).tolist()  # "<t.t seconds>"
                    ids += [s] + [config.video_token_id] * (h * w // m2) + [e]
                videos.append(tuple(part[1]))
        seqs.append(ids)
    return assemble_batch(config, seqs, images, videos, rs, pad_left)

