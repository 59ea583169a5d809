"""MLLM-4D's supervised stage (SPEC 5): `fourd-jax dift --config sft:PRESET[,MESH]`.

ST-CoT SFT is DIFT without imagery: the same trainer and step, with the assistant turn the plain
trace (`data.assistant = "text_trace"`, so no latent blocks enter the sequence), the latent loss
weighted 0 and the cross-entropy weighted 1, and LoRA adapters on the decoder's projections.

Presets:
    tiny                the stage on the tiny Qwen2.5-VL test model (CPU tests and demos), LoRA r 8;
                        --config.model.preset=qwen3vl_tiny runs it on the tiny Qwen3-VL
    mllm4d_qwen3vl_8b   the MLLM-4D recipe: Qwen3-VL-8B, LoRA r 128, lr 2e-5, up to 32 frames

The records are MLLM-4D ones: `fourd-jax synth DIR --families mllm4d` or
`fourd-jax data import FILE --format mllm4d` (the conversations layout). Any field can be
overridden with --config.FIELD=VALUE.
"""

import ml_collections

from fourd_jax.configs import dift
from fourd_jax.errors import InputError

PRESETS = ("tiny", "mllm4d_qwen3vl_8b")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset, _, mesh = arg.partition(",")
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose {' or '.join(PRESETS)}.")
    c = dift.get_config("tiny")
    # The supervision is the ST-CoT text alone: no latent blocks, no latent term in the loss.
    c.data.assistant = "text_trace"
    c.loss.latent_weight = 0.0
    c.loss.ce_weight = 1.0
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.freeze = ()  # LoRA freezes the whole base; nothing else to freeze

    if preset == "mllm4d_qwen3vl_8b":
        c.model.preset = "qwen3vl_8b"
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "nothing_saveable"
        c.model.attention_block = 512
        c.data.path = "data/mllm4d_sft"
        c.data.batch_size = 8
        # 32 frames in 16 temporal patches at 256 merged tokens each are 4096 video tokens (factor 32 frames).
        c.data.max_frames = 32
        c.data.video_max_pixels = 256 * 32 * 32
        c.data.imagery_max_pixels = 256 * 32 * 32
        c.data.seq_buckets = (2048, 4096, 8192)
        c.data.num_workers = 8
        c.lora.rank = 128
        # SPEC 5 gives the rank only; alpha = 2 x rank (an update scale of 2) is our choice.
        c.lora.alpha = 256.0
        c.lora.base_dtype = "bfloat16"  # the frozen 8B base held in bf16; adapters and optimizer stay fp32
        c.optim.lr = 2e-5
        c.optim.min_lr_ratio = 0.0
        c.optim.warmup_steps = 10
        c.optim.total_steps = 2000
        c.train.checkpoint_every = 250
        c.mesh.shape = dift.MESHES["v5p-8"]
    if mesh:
        dift.for_slice(c, mesh)
    return c
