"""Imported DSR and DSR-Bench questions see 32 frames sampled uniformly over the clip, times rounded to
0.1 s, and `*_dir_pred` questions have the last two of them withheld (SPEC 4), as synthetic records do."""

import json

import numpy as np
from test_importers import frame_indices, write_jsonl, write_png, write_video

from fourd_jax.data import importers, records

STEP = 6  # red value per frame index of the clips written here (40 frames stay below 256)


def write_clip(path, num_frames, rate):
    """An mp4 at `rate` fps whose frame i has red = STEP * i."""
    return write_video(path, num_frames=num_frames, rate=rate, step=STEP, blue=100)


def indices(frames):
    return frame_indices(frames, step=STEP)


def uniform(count, k=32):
    """round(linspace(0, count - 1, k)), in plain Python (no ties occur for the counts used here)."""
    return [round(i * (count - 1) / (k - 1)) for i in range(k)]


def bench(video, kinds):
    return [{"videoID": video, "question": f"Q{i}?", "type": kind,
             "options": ["A. (1) Front.", "B. (1) Left.", "C. (1) Right.", "D. (1) Behind."], "answer": "B"}
            for i, kind in enumerate(kinds)]


def test_dsr_bench_samples_32_frames_uniformly_and_withholds_two_for_dir_pred(tmp_path):
    write_clip(tmp_path / "clip.mp4", num_frames=40, rate=3)  # 13.3 s at 3 fps: 1 fps would give 14 frames
    path = write_jsonl(tmp_path / "bench.jsonl", bench("clip", ["abs_dir", "abs_dir_pred", "rel_dir_pred"]))
    direct, abs_pred, rel_pred = importers.import_dsr_bench(path)
    expected = uniform(40)
    assert len(set(expected)) == 32
    for sample in (direct, abs_pred, rel_pred):
        assert indices(sample["frames"]) == expected
        # Frame k sits at k / 3 s; times are rounded to 0.1 s.
        np.testing.assert_allclose(sample["timestamps"], [round(k / 3, 1) for k in expected], atol=1e-6)
    assert direct["shown_frames"] == list(range(32))
    assert abs_pred["shown_frames"] == rel_pred["shown_frames"] == list(range(30))
    # The stored records keep it.
    records.write(tmp_path / "b.array_record", [direct, abs_pred])
    back = list(records.read(tmp_path / "b.array_record"))
    assert [s["shown_frames"] for s in back] == [list(range(32)), list(range(30))]
    # Sampled frames 1, 2, 3 are clip frames round(39 / 31 * i) = 1, 3, 4 at 0.333, 1.0, 1.333 s.
    np.testing.assert_allclose(back[1]["timestamps"][[1, 2, 3]], [0.3, 1.0, 1.3], atol=1e-6)


def test_dsr_raw_qa_video_and_frame_list(tmp_path):
    write_clip(tmp_path / "v.mp4", num_frames=36, rate=4)
    for i in range(5):
        write_png(tmp_path / "frames" / f"{i}.png", 40 * i)
    qa = {"Question": "Where will the car be?", "A": "A. (1) Front.", "B": "B. (1) Left.", "C": "C. (1) Right.",
          "D": "D. (1) Behind.", "Correct": "C"}
    rows = [{**qa, "Type": "abs_dir_pred", "video": "v.mp4"}, {**qa, "Type": "rel_dis", "video": "v.mp4"},
            {**qa, "Type": "rel_dir_pred", "frame_paths": [f"frames/{i}.png" for i in range(5)]}]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    video_pred, video_dis, listed = importers.import_dsr(tmp_path / "qa.json")
    assert indices(video_pred["frames"]) == indices(video_dis["frames"]) == uniform(36)
    np.testing.assert_allclose(video_pred["timestamps"], [round(k / 4, 1) for k in uniform(36)], atol=1e-6)
    assert video_pred["shown_frames"] == list(range(30)) and video_dis["shown_frames"] == list(range(32))
    # A released frame list: all 5 frames (fewer than 32), the last two withheld.
    assert [int(f.mean()) for f in listed["frames"]] == [0, 40, 80, 120, 160]
    assert listed["shown_frames"] == [0, 1, 2]


def test_short_clips_keep_every_frame_and_dir_pred_needs_three(tmp_path):
    write_clip(tmp_path / "short.mp4", num_frames=10, rate=5)
    write_clip(tmp_path / "two.mp4", num_frames=2, rate=2)
    rows = bench("short", ["abs_dir_pred"]) + bench("two", ["rel_dir_pred", "abs_dis"])
    stats = importers.ImportStats()
    samples = list(importers.import_dsr_bench(write_jsonl(tmp_path / "b.jsonl", rows), skip_bad_records=True,
                                              stats=stats))
    assert [len(s["frames"]) for s in samples] == [10, 2]  # no frame is repeated to reach 32
    assert indices(samples[0]["frames"]) == list(range(10))
    assert samples[0]["shown_frames"] == list(range(8)) and samples[1]["shown_frames"] == [0, 1]
    assert stats.skipped == {importers.TOO_FEW_FRAMES: 1}
    assert "row 2" in stats.first_problem[importers.TOO_FEW_FRAMES]


def test_other_importers_keep_fps_sampling(tmp_path):
    write_clip(tmp_path / "v.mp4", num_frames=40, rate=4)  # 10 s at 4 fps -> 1 fps: frames 0, 4, ..., 36
    rows = [{"id": 1, "video": "v.mp4", "question_type": "direction", "question": "Where?",
             "choices": {"A": "left", "B": "right", "C": "up", "D": "down"}, "answer": "up"}]
    (tmp_path / "vlm4d.json").write_text(json.dumps(rows))
    (sample,) = importers.import_vlm4d(tmp_path / "vlm4d.json")
    assert indices(sample["frames"]) == list(range(0, 40, 4))
    np.testing.assert_allclose(sample["timestamps"], np.arange(10))
