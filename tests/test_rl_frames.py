"""RL frames keep their longest side <= 448 (SPEC 2): the side cap of smart_resize, FeatureConfig and the RL config."""

import math
from pathlib import Path

import numpy as np
import pytest

from fourd_jax.configs import rl
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.processor import process, smart_resize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.model.config import tiny
from fourd_jax.train.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def rl_config(preset):
    return rl.get_config(preset)


def test_area_cap_alone_lets_a_wide_frame_exceed_448():
    # 1920x1080 under 448*448 pixels: beta = sqrt(1920*1080 / 200704) = 3.2143;
    # h = floor(1080 / 3.2143 / 28) * 28 = 12 * 28, w = floor(1920 / 3.2143 / 28) * 28 = 21 * 28 > 448.
    assert smart_resize(1080, 1920, 28, 4 * 28 * 28, 448 * 448) == (336, 588)


@pytest.mark.parametrize("height, width, expected", [
    # 16:9: the long side becomes 448, the short one floor(1080 * 448 / 1920 / 28) * 28 = floor(9.0) * 28.
    (1080, 1920, (252, 448)),
    (1920, 1080, (448, 252)),
    # 4:3 640x480: floor(480 * 448 / 640 / 28) = floor(12.0) -> 336.
    (480, 640, (336, 448)),
    # Already within both caps: untouched (rounded to multiples of 28 only).
    (280, 420, (280, 420)),
    (448, 448, (448, 448)),
])
def test_side_cap(height, width, expected):
    h, w = smart_resize(height, width, 28, 4 * 28 * 28, 448 * 448, max_side=448)
    assert (h, w) == expected
    assert max(h, w) <= 448 and h % 28 == 0 and w % 28 == 0


def test_side_cap_zero_is_no_cap_and_too_small_cap_is_refused():
    assert smart_resize(1080, 1920, 28, 4 * 28 * 28, 448 * 448, max_side=0) == (336, 588)
    with pytest.raises(InputError, match="max_side"):
        smart_resize(1080, 1920, 28, 4 * 28 * 28, 448 * 448, max_side=20)


def test_process_applies_the_side_cap():
    vision = tiny().vision
    factor = vision.patch_size * vision.spatial_merge_size
    frames = np.zeros((2, 90, 160, 3), np.uint8)  # 16:9
    rows, grid = process(frames, vision, 4 * factor * factor, 10**9, max_side=4 * factor)
    # long side 160 -> 4 * factor; short side floor(90 * 4 / 160) * factor = 2 * factor.
    h, w = 2 * factor, 4 * factor
    assert grid == (1, h // vision.patch_size, w // vision.patch_size)
    assert rows.shape[0] == math.prod(grid)


def test_featurize_caps_the_longest_side():
    tokenizer = build_tokenizer(["Where does it go? <answer>A</answer>"] * 4, vocab_size=300)
    config = config_for_tokenizer(tokenizer, tiny())
    vision = config.vision
    factor = vision.patch_size * vision.spatial_merge_size
    sample = {
        "sample_id": "wide", "family": "dsr", "subtask": "abs_dis", "fps": 1.0,
        "frames": np.full((4, 9 * 20, 16 * 20, 3), 128, np.uint8),  # 320x180
        "timestamps": np.arange(4, dtype=np.float32), "shown_frames": [0, 1, 2, 3],
        "question": "Where does it go?", "options": ["left", "right", "up", "down"], "answer": "A",
        "trace": "", "imagery": [],
    }
    features = FeatureConfig(max_frames=4, video_max_pixels=10**9, video_max_side=2 * factor, supervised=False)
    grid = featurize(sample, tokenizer, config, features)["video_grid"]
    # 320 -> 2 * factor; 180 -> floor(180 * 2 / 320) * factor = factor.
    assert grid.tolist() == [2, factor // vision.patch_size, 2 * factor // vision.patch_size]
    uncapped = FeatureConfig(max_frames=4, video_max_pixels=10**9, supervised=False)
    # Without the cap: each side rounded to the nearest multiple of the factor.
    assert featurize(sample, tokenizer, config, uncapped)["video_grid"].tolist() == [
        2, round(180 / factor) * factor // vision.patch_size, round(320 / factor) * factor // vision.patch_size]


def test_rl_presets_set_the_cap_and_it_reaches_the_features():
    for preset in ("qwen25vl_3b", "qwen25vl_7b"):
        config = rl_config(preset)
        assert config.data.video_max_side == 448
        assert RunSettings.of(config).pipeline(supervised=False).features.video_max_side == 448
    assert RunSettings.of(rl_config("tiny")).pipeline(supervised=False).features.video_max_side == 0
