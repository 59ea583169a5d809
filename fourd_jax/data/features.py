"""One record -> model-ready numpy features (SPEC 3.3): patches, chat tokens, labels and masks.

The conversation follows 4DThinker's SFT layout: the user turn holds the video then the
question with its options and an instruction to reason with mental imagery; the assistant turn
is the reasoning trace with every `<output_image>` expanded to a latent block
(`<|latent_start|>` + latent_size x `<|latent_pad|>` + `<|latent_end|>`), or, for records
without a trace, just the answer. Imagery images are not placed in the token sequence: they
are processed separately and become the DIFT targets of the latent pads, in order.

Labels: position t predicts token t + 1 (`targets`); `loss_mask` selects assistant tokens
(through `<|im_end|>`) except `<|latent_pad|>` ones; `latent_mask` marks the pad positions
whose input embeddings are replaced by imagery targets.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any

import numpy as np

from fourd_jax import families
from fourd_jax.data import video_layout
from fourd_jax.data.latent_tokens import OUTPUT_IMAGE, expand_output_images, latent_token_ids
from fourd_jax.data.processor import expand_placeholders, process
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig

ASSISTANT_TURNS = ("imagery_trace", "text_trace", "answer", "conclusion", "option_lookup")
INSTRUCTION = ("Think about the question with mental imagery inside <think> </think> tags, and give only the "
               "final answer inside <answer> </answer> tags.")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    latent_size: int = 4
    max_frames: int = 16  # evenly spaced frames kept from the shown frames (Qwen3-VL: caps its 2 fps sampling)
    # Per frame; for a family whose limits bound the whole clip (Qwen3-VL) they are multiplied by the
    # frame count (what qwen-vl-utils' per-frame cap amounts to).
    video_min_pixels: int = 4 * 28 * 28
    video_max_pixels: int = 256 * 28 * 28  # 4DThinker SFT
    video_max_side: int = 0  # longest frame side after resizing (4DThinker RL: 448); 0 = no cap
    imagery_min_pixels: int = 4 * 28 * 28
    imagery_max_pixels: int = 256 * 28 * 28
    max_length: int = 4096  # longer samples are dropped (and counted), never cut
    supervised: bool = True  # False: the prompt only (generation, RL rollouts, evaluation)
    # "pixels": imagery images become patches (targets computed in the training step);
    # "precomputed": the record's `imagery_targets` are used directly.
    imagery_source: str = "pixels"
    instruction: str = INSTRUCTION
    # What the supervised assistant turn holds (the ablations of `fourd-jax study`):
    #   "imagery_trace": the trace with a latent block per <output_image> (DIFT, SPEC 3.3);
    #   "text_trace": the same trace with the <output_image> markers removed (text SFT);
    #   "answer": only "<answer>X. text</answer>" (no reasoning);
    #   "conclusion": only the sentence every synthetic trace ends with, then the answer:
    #     "<think>So the answer is: text.</think><answer>X. text</answer>" (the demo's reading warm-up:
    #     it teaches the readout and the text -> letter step exactly as the traces end, docs/LEARNING.md);
    #   "option_lookup": a reading warm-up that carries no answer: the trace names the letter of every
    #     option, in an order drawn at random (seeded by the sample id), then states one option drawn the
    #     same way and answers with its letter, as every trace ends:
    #     "<think>T3 is C. T1 is A. T4 is D. T2 is B. So the answer is: T1.</think><answer>A. T1</answer>".
    #     Five lookups per sequence instead of one, for more signal per step (docs/LEARNING.md: not yet
    #     enough for the binding to form in 400 steps of 32).
    assistant: str = "imagery_trace"
    # False: the blind control; the user turn has the question and options but no video.
    video: bool = True

    def __post_init__(self) -> None:
        if self.assistant not in ASSISTANT_TURNS:
            raise InputError(f"data.assistant must be one of {ASSISTANT_TURNS}, not {self.assistant!r}.")


def question_text(sample: dict[str, Any]) -> str:
    """The question, a blank line, then "A. ..." to "D. ..." lines (4DThinker's text_input)."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", sample["options"], strict=True))
    return f"{sample['question']}\n\n{options}"


def assistant_text(sample: dict[str, Any], latent_size: int, assistant: str = "imagery_trace") -> str:
    """The supervised assistant turn (see FeatureConfig.assistant): the trace with latent blocks,
    the trace without them, its concluding sentence, or the bare answer (also for records without a
    trace in the trace modes)."""
    if sample["trace"] and assistant == "imagery_trace":
        return expand_output_images(sample["trace"], latent_size)
    if sample["trace"] and assistant == "text_trace":
        return re.sub(r" ?" + re.escape(OUTPUT_IMAGE), "", sample["trace"])
    if assistant == "option_lookup":
        options = sample["options"]
        rng = np.random.default_rng(zlib.crc32(str(sample["sample_id"]).encode()))
        drill = " ".join(f"{options[i]} is {'ABCDEF'[i]}." for i in rng.permutation(len(options)))
        pick = int(rng.integers(len(options)))
        return (f"<think>{drill} So the answer is: {options[pick]}.</think>"
                f"<answer>{'ABCDEF'[pick]}. {options[pick]}</answer>")
    key = sample["options"]["ABCD".index(sample["answer"])]
    if assistant == "conclusion":
        return f"<think>So the answer is: {key}.</think><answer>{sample['answer']}. {key}</answer>"
    return f"<answer>{sample['answer']}. {key}</answer>"


def select_frames(sample: dict[str, Any], max_frames: int, rules: video_layout.VideoRules | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Frames shown to the model, their times (seconds) and the mean seconds per frame step.

    The shown frames are evenly thinned to max_frames, or, for a timestamped family (Qwen3-VL),
    sampled as its video processor does (`rules.fps` per second at the record's fps, at most
    max_frames).
    """
    shown = np.asarray(sample["shown_frames"])
    if shown.size == 0:
        raise InputError("the record shows no frames")
    if rules is not None and rules.timestamps:
        picks = video_layout.sample_frame_indices(shown.size, float(sample["fps"]), rules.fps, rules.min_frames,
                                                  min(rules.max_frames, max_frames))
    else:
        picks = np.linspace(0, shown.size - 1, min(max_frames, shown.size)).round().astype(int)
    keep = shown[picks]
    times = np.asarray(sample["timestamps"], np.float64)[keep]
    step = float(np.mean(np.diff(times))) if keep.size > 1 else 1.0 / float(sample["fps"])
    return np.asarray(sample["frames"])[keep], times, step


def imagery_patches(images: list[np.ndarray], vision_config, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """Imagery images as patch rows and grids (one image each)."""
    parts = [process(np.asarray(img)[None], vision_config, config.imagery_min_pixels, config.imagery_max_pixels)
             for img in images]
    return np.concatenate([p for p, _ in parts]), np.array([g for _, g in parts], np.int64)


def featurize(sample: dict[str, Any], tokenizer: Any, model_config: ModelConfig, config: FeatureConfig
              ) -> dict[str, Any]:
    """Features of one decoded record. Raises InputError when the record cannot be used."""
    vc = model_config.vision
    rules = video_layout.video_rules(vc)
    text = {"type": "text", "text": f"{question_text(sample)}\n{config.instruction}"}
    video_times = [] if rules.timestamps else None  # per video, its temporal patches' times (Qwen3-VL)
    if config.video:
        frames, times, step = select_frames(sample, config.max_frames, rules)
        n = len(frames) if rules.clip_budget else 1  # a clip budget: the per-frame limits times the frames
        video, grid = process(frames, vc, config.video_min_pixels * n, config.video_max_pixels * n,
                              config.video_max_side, clip_budget=rules.clip_budget)
        user, video_grids = [{"type": "video"}, text], np.array([grid], np.int64)
        if rules.timestamps:
            video_times.append(video_layout.temporal_patch_times(times, vc.temporal_patch_size))
    else:  # blind: the question and options alone
        video, step = np.zeros((0, vc.patch_dim), np.float32), 1.0
        user, video_grids = [text], np.zeros((0, 3), np.int64)
    seconds_per_grid = vc.temporal_patch_size * step
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    prompt = expand_placeholders(prompt, video_grids=list(video_grids), merge=vc.spatial_merge_size,
                                 video_timestamps=video_times)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids)
    imagery, imagery_grids = np.zeros((0, vc.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    latent_targets = None
    with_imagery = bool(sample["imagery"]) and bool(sample["trace"]) and config.assistant == "imagery_trace"
    if config.supervised:
        answer = assistant_text(sample, config.latent_size, config.assistant) + "<|im_end|>"
        ids += tokenizer(answer, add_special_tokens=False)["input_ids"]
        if with_imagery and config.imagery_source == "precomputed":
            if "imagery_targets" not in sample:
                raise InputError("the record has no imagery_targets (write them with fourd-jax data targets)")
            targets = np.asarray(sample["imagery_targets"], np.float32)
            if targets.shape[1:] != (config.latent_size, model_config.text.hidden_size):
                raise InputError(f"imagery_targets have shape {targets.shape[1:]} per image, but the model needs "
                                 f"({config.latent_size}, {model_config.text.hidden_size})")
            latent_targets = targets.reshape(-1, targets.shape[-1])
            imagery_grids = np.zeros((len(targets), 3), np.int64)  # counted, never encoded
        elif with_imagery:
            imagery, imagery_grids = imagery_patches(sample["imagery"], vc, config)
    ids = np.asarray(ids, np.int32)
    if ids.size > config.max_length:
        raise InputError(f"the sample has {ids.size} tokens, more than max_length {config.max_length}")

    _, pad, _ = latent_token_ids(tokenizer)
    latent_mask = ids == pad
    if config.imagery_source not in ("pixels", "precomputed"):
        raise InputError(f"imagery_source must be 'pixels' or 'precomputed', not {config.imagery_source!r}")
    n_images = len(imagery_grids)
    if config.supervised and latent_mask.sum() != config.latent_size * n_images:
        raise InputError(f"the trace has {int(latent_mask.sum())} latent pads for {n_images} imagery "
                         f"images of latent_size {config.latent_size}")
    targets = np.append(ids[1:], 0).astype(np.int32)
    loss_mask = np.zeros(ids.size, np.float32)
    if config.supervised:
        loss_mask[len(prompt_ids) - 1:-1] = 1.0
        loss_mask[:-1][latent_mask[1:]] = 0.0  # the pads are predicted by the latent loss instead
    get_rope_index = families.resolve(families.family_of(vc).rope_index)  # the family's M-RoPE placement
    positions, _ = get_rope_index(model_config, ids[None], video_grid_thw=video_grids,
                                  second_per_grid_ts=np.full(len(video_grids), seconds_per_grid))
    return {
        "input_ids": ids, "targets": targets, "loss_mask": loss_mask, "latent_mask": latent_mask,
        "position_ids": positions[:, 0].astype(np.int32), "prompt_length": len(prompt_ids),
        "video_patches": video.astype(np.float32), "video_grid": video_grids.reshape(-1),
        "second_per_grid": seconds_per_grid,
        "imagery_patches": imagery.astype(np.float32),
        "imagery_grids": imagery_grids if latent_targets is None else np.zeros((0, 3), np.int64),
        **({} if latent_targets is None else {"latent_targets": latent_targets}),
        "answer": sample["answer"], "sample_id": sample["sample_id"], "family": sample["family"],
        "subtask": sample["subtask"], "num_options": len(sample["options"]), "trace": sample.get("trace", ""),
    }
