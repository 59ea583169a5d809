"""Patchify equals the transformers image processor; placeholder expansion matches the grids."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from fourd_jax.data.processor import expand_placeholders, patchify, process, smart_resize
from fourd_jax.errors import InputError
from fourd_jax.model.config import VisionConfig


@pytest.mark.parametrize("size", [(56, 84), (112, 56), (84, 140)])
def test_image_patches_equal_transformers(size):
    image = np.random.RandomState(sum(size)).randint(0, 256, (*size, 3)).astype(np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    ours, grid = patchify(image[None], VisionConfig())
    np.testing.assert_array_equal(np.array([grid]), ref["image_grid_thw"])
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("size,max_pixels", [((50, 61), 28 * 28 * 1280), ((333, 200), 28 * 28 * 30),
                                             ((20, 700), 28 * 28 * 1280), ((480, 640), 256 * 28 * 28)])
def test_resized_image_patches_equal_transformers(size, max_pixels):
    image = np.random.RandomState(size[0]).randint(0, 256, (*size, 3)).astype(np.uint8)
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})(
        images=[image], return_tensors="np")
    ours, grid = process(image[None], VisionConfig(), 56 * 56, max_pixels)
    np.testing.assert_array_equal(np.array([grid]), ref["image_grid_thw"])
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6)


def test_smart_resize_equals_transformers():
    rs = np.random.RandomState(0)
    for _ in range(500):
        h, w = (int(v) for v in rs.randint(10, 3000, 2))
        lo, hi = int(rs.choice([3136, 128 * 784])), int(rs.choice([256 * 784, 768 * 784, 1280 * 784]))
        assert smart_resize(h, w, 28, lo, hi) == reference_smart_resize(h, w, 28, lo, hi)


def test_video_patches_are_two_frame_images():
    """A video's temporal patch t is the image processor's output on frames (2t, 2t+1)."""
    rs = np.random.RandomState(0)
    frames = rs.randint(0, 256, (3, 56, 28, 3)).astype(np.uint8)  # odd: the last frame repeats
    ours, grid = patchify(frames, VisionConfig())
    assert grid == (2, 4, 2)
    first, _ = patchify(frames[:2], VisionConfig())
    last, _ = patchify(frames[[2, 2]], VisionConfig())
    np.testing.assert_array_equal(ours, np.concatenate([first, last]))
    single, _ = patchify(frames[:1], VisionConfig())
    np.testing.assert_array_equal(single, patchify(frames[[0, 0]], VisionConfig())[0])


def test_bad_frames_and_placeholder_counts_fail_clearly():
    with pytest.raises(InputError, match="frame size 50x56 must be a multiple of 28"):
        patchify(np.zeros((1, 50, 56, 3), np.uint8), VisionConfig())
    with pytest.raises(InputError, match="uint8"):
        patchify(np.zeros((1, 56, 56, 3), np.float32), VisionConfig())
    text = "a <|image_pad|> b <|video_pad|> c <|image_pad|>"
    out = expand_placeholders(text, image_grids=[(1, 2, 2), (1, 4, 2)], video_grids=[(2, 2, 4)])
    assert out == "a <|image_pad|> b " + "<|video_pad|>" * 4 + " c " + "<|image_pad|>" * 2
    with pytest.raises(InputError, match="more <\\|image_pad\\|> placeholders than grids"):
        expand_placeholders(text, image_grids=[(1, 2, 2)], video_grids=[(2, 2, 4)])
    with pytest.raises(InputError, match="More grids than <\\|video_pad\\|> placeholders"):
        expand_placeholders("x", video_grids=[(2, 2, 4)])


@pytest.mark.parametrize("size", [(90, 130), (224, 224), (300, 180)])
def test_resized_video_equals_transformers_per_temporal_patch(size):
    """No torchvision here, so no video-processor reference: a video whose temporal patches are
    pairs of identical frames must equal the image processor on each of those frames."""
    rs = np.random.RandomState(size[1])
    stills = rs.randint(0, 256, (3, *size, 3)).astype(np.uint8)
    video = np.repeat(stills, 2, axis=0)  # frames f0 f0 f1 f1 f2 f2
    ours, grid = process(video, VisionConfig(), 4 * 28 * 28, 64 * 28 * 28)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28})
    ref = proc(images=list(stills), return_tensors="np")
    assert grid[0] == 3 and tuple(ref["image_grid_thw"][0][1:]) == grid[1:]
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("size", [(56, 84), (112, 112)])
def test_distinct_frames_of_a_temporal_patch_take_their_time_slot(size):
    """Rows are [channel, time, 14, 14] in the reference's layout: frame 2t fills time slot 0 and
    frame 2t + 1 time slot 1, each equal to the image processor's output for that frame alone."""
    rs = np.random.RandomState(size[0])
    frames = rs.randint(0, 256, (4, *size, 3)).astype(np.uint8)
    ours, grid = patchify(frames, VisionConfig())
    rows = ours.reshape(grid[0], grid[1] * grid[2], 3, 2, 14, 14)
    proc = Qwen2VLImageProcessorPil()
    for t in range(grid[0]):
        for slot in (0, 1):
            ref = proc(images=[frames[2 * t + slot]], return_tensors="np")["pixel_values"]
            ref = ref.reshape(grid[1] * grid[2], 3, 2, 14, 14)
            np.testing.assert_allclose(rows[t, :, :, slot], ref[:, :, slot], atol=1e-6)
