"""The Qwen3-VL processor: images against the PIL Qwen2-VL image processor with Qwen3-VL's settings;
videos (frame sampling, clip-budget resize sizes, patch order, timestamped prompt) against
transformers' Qwen3VLVideoProcessor / Qwen3VLProcessor. Their resize and normalisation need
torchvision, which is not installed: those run with do_resize / do_normalize off (the sizes are
checked through the reference smart_resize, the normalisation through the image processor)."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as reference_clip_resize
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata

from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.processor import (
    capped_clip_budget,
    clip_smart_resize,
    expand_placeholders,
    patchify,
    process,
    smart_resize,
    timestamped_video_blocks,
)
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.data.video_layout import sample_frame_indices, temporal_patch_times, video_rules
from fourd_jax.errors import InputError
from fourd_jax.families import FAMILIES

QWEN3 = FAMILIES["qwen3_vl"].processor


def image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


@pytest.mark.parametrize("size,limits", [((64, 96), (64 * 64, 1280 * 32 * 32)), ((50, 61), (64 * 64, 64 * 32 * 32)),
                                         ((333, 200), (64 * 64, 40 * 32 * 32)), ((20, 700), (64 * 64, 1280 * 32 * 32)),
                                         ((120, 90), (QWEN3.image_min_pixels, QWEN3.image_max_pixels))])
def test_image_patches_equal_transformers(size, limits):
    image = np.random.RandomState(size[0]).randint(0, 256, (*size, 3)).astype(np.uint8)
    ref = image_processor(*limits)(images=[image], return_tensors="np")
    ours, grid = process(image[None], QWEN3, *limits)
    np.testing.assert_array_equal(np.array([grid]), ref["image_grid_thw"])
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6)


def test_smart_resize_with_factor_32_equals_transformers():
    rs = np.random.RandomState(1)
    for _ in range(500):
        h, w = (int(v) for v in rs.randint(10, 3000, 2))
        lo = int(rs.choice([64 * 64, QWEN3.image_min_pixels]))
        hi = int(rs.choice([256 * 1024, 1280 * 1024, QWEN3.image_max_pixels]))
        assert smart_resize(h, w, 32, lo, hi) == reference_smart_resize(h, w, 32, lo, hi)


def test_clip_resize_and_per_frame_cap_equal_transformers():
    """The clip budget (frames x h x w) and its per-frame-capped form, over tiny to large frames
    and odd frame counts (rounded with Python's round, as the reference)."""
    rs = np.random.RandomState(2)
    video = Qwen3VLVideoProcessor()
    lo, hi = QWEN3.video_min_pixels, QWEN3.video_max_pixels
    for _ in range(400):
        t = int(rs.randint(2, 80))
        h, w = (int(v) for v in rs.randint(5, 2000, 2))
        if max(h, w) / min(h, w) > 150:
            continue
        mn, mx = int(rs.choice([4096, lo])), int(rs.choice([hi, 24576 * 1024]))
        assert clip_smart_resize(t, h, w, 32, 2, mn, mx) == reference_clip_resize(t, h, w, 2, 32, mn, mx)
        capped = capped_clip_budget(t, lo, hi, 32)
        gh, gw = (side // 16 for side in clip_smart_resize(t, h, w, 32, 2, lo, capped))
        assert -(-t // 2) * gh * gw == video.get_num_of_video_patches(t, h, w, {"cap_pixels_per_frame": True})
    with pytest.raises(InputError, match="at least temporal_patch_size = 2 frames"):
        clip_smart_resize(1, 64, 64, 32, 2, lo, hi)


@pytest.mark.parametrize("total,video_fps", [(30, 10.0), (7, 3.0), (3, 24.0), (250, 29.97), (2000, 1.0)])
def test_frame_sampling_equals_transformers(total, video_fps):
    for fps, lo, hi in ((2.0, 4, 768), (1.0, 4, 16), (0.5, 2, 8)):
        reference = Qwen3VLVideoProcessor(fps=fps, min_frames=lo, max_frames=hi)
        expected = reference.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps))
        np.testing.assert_array_equal(sample_frame_indices(total, video_fps, fps, lo, hi), expected)
    np.testing.assert_array_equal(sample_frame_indices(total, video_fps, num_frames=5),
                                  reference.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps),
                                                          num_frames=5, fps=None))


@pytest.fixture(scope="module")
def processor():
    """transformers' Qwen3VLProcessor over an offline tokenizer. Its constructor checks the video
    processor against `BaseVideoProcessor`, which transformers exports only with torchvision, so
    that one class check is bypassed; the processing itself runs unchanged."""
    tokenizer = build_tokenizer(["what happens in the video", "seconds"], vocab_size=300)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
    try:
        yield Qwen3VLProcessor(image_processor=image_processor(64 * 64, 64 * 32 * 32), tokenizer=tokenizer,
                               video_processor=Qwen3VLVideoProcessor())
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def test_prompt_and_video_patches_equal_the_qwen3vl_processor(processor):
    """An image and three videos (odd sampled counts, fewer frames than min_frames) in one prompt:
    the same token ids, grids and patch rows. The videos are already at their resized size, since
    the reference resizes and normalises videos with torchvision (off here; rows are [0, 1])."""
    rs = np.random.RandomState(3)
    videos = [(30, 10.0, (64, 96)), (9, 2.5, (32, 64)), (3, 24.0, (64, 32))]  # frames, fps, size
    clips = [rs.randint(0, 256, (n, *size, 3)).astype(np.uint8) for n, _, size in videos]
    metadata = [VideoMetadata(total_num_frames=n, fps=fps) for n, fps, _ in videos]
    image = rs.randint(0, 256, (70, 50, 3)).astype(np.uint8)
    content = [{"type": "video"}, {"type": "text", "text": "what happens"}, {"type": "image"}, {"type": "video"},
               {"type": "video"}, {"type": "text", "text": "in the video"}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
    ref = processor(text=[text], images=[image], videos=clips, return_tensors="np",
                    videos_kwargs={"video_metadata": metadata, "do_resize": False, "do_normalize": False,
                                   "do_convert_rgb": False, "cap_pixels_per_frame": False})

    rows, grids, times = [], [], []
    for clip, (n, fps, _) in zip(clips, videos, strict=True):
        picks = sample_frame_indices(n, fps)
        video_rows, grid = patchify(clip[picks], QWEN3)
        rows.append(video_rows * 0.5 + 0.5)  # undo mean/std 0.5: the reference only rescaled to [0, 1]
        grids.append(grid)
        times.append(temporal_patch_times(picks / fps, QWEN3.temporal_patch_size))
    image_rows, image_grid = process(image[None], QWEN3, 64 * 64, 64 * 32 * 32)
    expanded = expand_placeholders(text, image_grids=[image_grid], video_grids=grids, video_timestamps=times)
    ids = processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    np.testing.assert_array_equal(ref["video_grid_thw"], np.array(grids))
    np.testing.assert_allclose(np.concatenate(rows), ref["pixel_values_videos"], atol=1e-6)
    np.testing.assert_allclose(image_rows, ref["pixel_values"], atol=1e-6)
    np.testing.assert_array_equal(np.array(ids), ref["input_ids"][0])
    assert "<0.3 seconds><|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|><1.4 seconds>" in expanded
    assert expanded.count("<|vision_start|>") == 1 + sum(g[0] for g in grids)


def test_timestamped_layout_fails_clearly():
    assert timestamped_video_blocks([0.25, 1.0], (2, 4, 2)) == (
        "<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
        "<1.0 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>")
    with pytest.raises(InputError, match=r"grid \(3, 4, 2\) needs 3 timestamps"):
        timestamped_video_blocks([0.5], (3, 4, 2))
    with pytest.raises(InputError, match="more <\\|video_pad\\|> placeholders than video_timestamps"):
        expand_placeholders("<|video_pad|>", video_grids=[(1, 2, 2)], video_timestamps=[])
    with pytest.raises(InputError, match="More video_timestamps than"):
        expand_placeholders("x", video_timestamps=[[0.5]])
    assert temporal_patch_times([0.0, 0.5, 1.0]) == [0.25, 1.0]  # the last frame repeats


def test_featurize_lays_out_a_qwen3vl_sample():
    """A record through the data pipeline's featurize with a tiny Qwen3-VL: frames sampled at 2 fps,
    the clip budget, one timestamped block per temporal patch, positions from the Qwen3-VL rules."""
    from fourd_jax.model.qwen3vl_config import tiny

    rs = np.random.RandomState(4)
    n = 12
    sample = {
        "frames": rs.randint(0, 256, (n, 48, 80, 3)).astype(np.uint8), "fps": 4.0,
        "timestamps": np.arange(n, dtype=np.float32) / 4, "shown_frames": list(range(n - 2)),
        "question": "Which way does the cube move?", "options": ["left", "right", "up", "down"], "answer": "B",
        "trace": "", "imagery": [], "sample_id": "s0", "family": "4dthinker", "subtask": "object_direction",
    }
    tokenizer = build_tokenizer([sample["question"], *sample["options"], "seconds"], vocab_size=400)
    config = config_for_tokenizer(tokenizer, tiny())
    assert video_rules(config.vision).timestamps
    features = FeatureConfig(video_min_pixels=2 * 32 * 32, video_max_pixels=6 * 32 * 32, max_frames=16)
    f = featurize(sample, tokenizer, config, features)

    picks = sample_frame_indices(n - 2, 4.0)  # 10 shown frames at 4 fps: 5 frames at 2 fps
    np.testing.assert_array_equal(picks, [0, 2, 4, 7, 9])
    expected_size = clip_smart_resize(5, 48, 80, 32, 2, 5 * 2 * 32 * 32, 5 * 6 * 32 * 32)
    rows, grid = process(sample["frames"][picks], config.vision, 5 * 2 * 32 * 32, 5 * 6 * 32 * 32, clip_budget=True)
    assert (grid[1] * 16, grid[2] * 16) == expected_size and grid[0] == 3
    np.testing.assert_array_equal(f["video_grid"], grid)
    np.testing.assert_array_equal(f["video_patches"], rows)
    text = tokenizer.decode(f["input_ids"][: f["prompt_length"]])
    blocks = timestamped_video_blocks([0.25, 1.375, 2.25], grid)  # frame pairs (0, .5) (1, 1.75) (2.25, 2.25)
    assert "<|im_start|>user\n" + blocks + sample["question"] in text
    assert "<0.2 seconds>" in blocks and "<1.4 seconds>" in blocks and "<2.2 seconds>" in blocks
    video_ids = f["input_ids"] == config.video_token_id
    assert video_ids.sum() == rows.shape[0] // 4
    assert f["position_ids"].shape == (3, f["input_ids"].size)
    # Each block starts at one temporal position: every video pad of a block shares it.
    first = np.flatnonzero(video_ids)[: grid[1] * grid[2] // 4]
    assert len(set(f["position_ids"][0, first].tolist())) == 1
