"""Importers of released datasets, on tiny fixtures written here: PNG frames, 8 fps mp4 videos whose
red channel encodes the frame index (8 * index), and data files in each released layout."""

import json

import av
import numpy as np
import pytest
from PIL import Image
from run_configs import run_script

from fourd_jax import cli
from fourd_jax.data import importers, records
from fourd_jax.data.importers.rows import BadRow
from fourd_jax.data.importers.text import answer_letter
from fourd_jax.data.taxonomy import OBJECT_DISTANCES, OBJECT_SPEEDS
from fourd_jax.errors import InputError

RED_STEP = 8  # red value per frame index in the fixture videos; survives lossy coding after rounding


def write_video(path, num_frames=32, rate=8, size=(64, 48), step=RED_STEP, blue=None):
    """An mp4 at `rate` fps whose frame i is a flat colour with red = step * i (blue = 255 - step * i,
    or the constant `blue`)."""
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            image = np.empty((height, width, 3), np.uint8)
            image[...] = (step * i, 100, 255 - step * i if blue is None else blue)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_indices(frames, step=RED_STEP):
    return [int(round(float(f[..., 0].mean()) / step)) for f in frames]


def write_png(path, value, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def assert_round_trip(samples, path):
    """Samples survive records.write / records.read unchanged."""
    assert records.write(path, samples) == len(samples)
    back = list(records.read(path))
    assert len(back) == len(samples)
    for sample, read in zip(samples, back, strict=True):
        assert set(read) == set(sample)
        for key, value in sample.items():
            if key in ("frames", "timestamps", "intrinsics", "cam_to_world", "object_centers", "object_headings"):
                np.testing.assert_array_equal(read[key], value)
                assert read[key].shape == np.asarray(value).shape
            elif key == "imagery":
                assert len(read[key]) == len(value)
                for got, want in zip(read[key], value, strict=True):
                    np.testing.assert_array_equal(got, want)
            else:
                assert read[key] == value, key


def assert_no_geometry(sample):
    assert sample["intrinsics"].shape == (0, 0)
    assert sample["cam_to_world"].shape == (0, 4, 4)
    assert sample["object_centers"].shape == sample["object_headings"].shape == (0, 0, 3)
    assert sample["object_ids"] == sample["object_names"] == sample["target_objects"] == []
    assert all(key in sample for key, (_, required) in records.FIELDS.items() if required)


def assert_one_sentence(message, *parts):
    assert message.endswith(".") and "\n" not in message and ". " not in message.rstrip(".")
    for part in parts:
        assert part in message


# --- video decoding ---------------------------------------------------------------------------------


def test_decode_video_picks_first_frame_at_or_after_each_instant(tmp_path):
    video = write_video(tmp_path / "clip.mp4")  # 4 s at 8 fps
    frames, timestamps = importers.decode_video(video)
    assert frames.dtype == np.uint8 and frames.shape == (4, 48, 64, 3)
    assert frame_indices(frames) == [0, 8, 16, 24]
    np.testing.assert_allclose(timestamps, [0, 1, 2, 3])
    frames, timestamps = importers.decode_video(video, fps=2.0)
    assert frame_indices(frames) == list(range(0, 32, 4))
    np.testing.assert_allclose(timestamps, np.arange(8) / 2)
    # A target rate above the video's: every frame once, none repeated.
    frames, _ = importers.decode_video(video, fps=20.0)
    assert frame_indices(frames) == list(range(32))


def test_decode_video_keeps_max_frames_evenly_spaced(tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    frames, timestamps = importers.decode_video(video, fps=2.0, max_frames=3)  # from 8 frames: 0, 3.5 -> 4, 7
    assert frame_indices(frames) == [0, 16, 28]
    np.testing.assert_allclose(timestamps, [0, 2, 3.5])
    frames, _ = importers.decode_video(video, max_frames=10)  # fewer than the limit: all kept
    assert frame_indices(frames) == [0, 8, 16, 24]
    np.testing.assert_array_equal(importers.even_indices(5, 3), [0, 2, 4])
    np.testing.assert_array_equal(importers.even_indices(2, 3), [0, 1])


def test_decode_video_names_a_missing_or_undecodable_file(tmp_path):
    with pytest.raises(InputError) as missing:
        importers.decode_video(tmp_path / "absent.mp4")
    assert_one_sentence(str(missing.value), "absent.mp4", "does not exist")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InputError) as bad:
        importers.decode_video(garbage)
    assert_one_sentence(str(bad.value), "garbage.mp4", "cannot be decoded")
    with pytest.raises(InputError, match="fps"):
        importers.decode_video(garbage, fps=0)


# --- 4DThinker --------------------------------------------------------------------------------------

SFT_TRACE = ("<think>The wall shifts left.<output_image> Then further.<output_image></think>"
             "<answer>D. Pan Right</answer>")


def sft_row(tmp_path, **changes):
    frames = [str(write_png(tmp_path / "frames" / f"{i}.png", 40 * i).relative_to(tmp_path)) for i in range(3)]
    imagery = [str(write_png(tmp_path / "imagery" / f"{i}.png", 200 + i, size=(16, 16))) for i in range(2)]
    row = {"id": "cam_7", "text_input": "How does the camera move?\n\nA. Pan Left\nB. Dolly In\nC. Tilt Up, Tilt Down "
           "and Truck Left\nD. Pan Right", "text_output": SFT_TRACE, "image_input": frames, "image_output": imagery}
    row.update(changes)
    return row


def rl_row(**changes):
    row = {"Question": "In which direction is the red car moving?", "A": "Moving Left", "B": "Moving Right",
           "C": "Stationary", "D": "Moving Toward Camera", "Correct": "B", "video_path": "clip.mp4"}
    row.update(changes)
    return row


def test_4dthinker_sft_and_rl_rows(tmp_path):
    write_video(tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(tmp_path), rl_row()])
    write_png(tmp_path / "frames" / "2.png", 80, size=(40, 30))  # a frame of another size: resized
    sft, rl = importers.import_4dthinker(path)

    assert sft["sample_id"] == "4dthinker:train:cam_7" and sft["source"] == sft["family"] == "4dthinker"
    assert sft["question"] == "How does the camera move?"
    assert sft["options"] == ["Pan Left", "Dolly In", "Tilt Up, Tilt Down and Truck Left", "Pan Right"]
    assert sft["answer"] == "D" and sft["trace"] == SFT_TRACE and sft["subtask"] == "camera_motion"
    assert sft["frames"].shape == (3, 24, 32, 3) and sft["fps"] == 1.0
    assert [int(f[0, 0, 0]) for f in sft["frames"]] == [0, 40, 80]
    np.testing.assert_array_equal(sft["timestamps"], [0, 1, 2])
    assert sft["shown_frames"] == [0, 1, 2]
    assert [img.shape for img in sft["imagery"]] == [(16, 16, 3)] * 2 and sft["imagery"][1][0, 0, 0] == 201
    assert sft["meta"]["original_id"] == "cam_7" and sft["meta"]["format"] == "sft"

    assert rl["sample_id"] == "4dthinker:train:2" and rl["subtask"] == "object_direction"
    assert rl["question"] == "In which direction is the red car moving?"
    assert rl["answer"] == "B" and rl["trace"] == "" and rl["imagery"] == []
    assert frame_indices(rl["frames"]) == [0, 8, 16, 24] and rl["meta"]["format"] == "rl"
    for sample in (sft, rl):
        assert_no_geometry(sample)
    assert_round_trip([sft, rl], tmp_path / "out.array_record")


def test_4dthinker_sft_rows_with_a_video_or_as_conversations(tmp_path):
    write_video(tmp_path / "clip.mp4")
    base = sft_row(tmp_path)
    with_video = {k: v for k, v in base.items() if k != "image_input"} | {"video": "clip.mp4"}
    conversation = {"id": "conv_1", "video": "clip.mp4", "image_output": base["image_output"],
                    "conversations": [{"from": "human", "value": "<video>\n" + base["text_input"]},
                                      {"from": "gpt", "value": SFT_TRACE}]}
    no_media = {k: v for k, v in base.items() if k != "image_input"}
    no_answer_turn = {**conversation, "conversations": conversation["conversations"][:1]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [with_video, conversation, no_media, no_answer_turn])
    stats = importers.ImportStats()
    video_row, conv = importers.import_4dthinker(path, skip_bad_records=True, stats=stats)
    for sample in (video_row, conv):
        assert sample["question"] == "How does the camera move?" and sample["answer"] == "D"
        assert sample["trace"] == SFT_TRACE and len(sample["imagery"]) == 2
        assert frame_indices(sample["frames"]) == [0, 8, 16, 24]  # 1 fps from the 8 fps clip
    assert video_row["meta"]["format"] == "sft" and conv["meta"]["format"] == "conversations"
    assert conv["sample_id"] == "4dthinker:mixed:conv_1"
    assert stats.read == 4 and stats.num_skipped == 2
    messages = list(stats.first_problem.values())
    assert any("row 3: field 'image_input' (or 'video') is missing" in m for m in messages)
    assert any("row 4: field 'conversations' has no human turn followed by a gpt turn" in m for m in messages)
    assert_round_trip([video_row, conv], tmp_path / "out.array_record")


def test_4dthinker_frame_lists_are_cut_to_max_frames(tmp_path):
    frames = [str(write_png(tmp_path / "f" / f"{i}.png", 10 * i)) for i in range(5)]
    path = write_jsonl(tmp_path / "rl.jsonl", [rl_row(video_path=None, frame_paths=frames)])
    (sample,) = importers.import_4dthinker(path, max_frames=3)
    assert [int(f[0, 0, 0]) for f in sample["frames"]] == [0, 20, 40]
    np.testing.assert_array_equal(sample["timestamps"], [0, 2, 4])


def test_text_input_and_answer_parsing():
    question, options, rest = importers.split_text_input(
        "Watch the clip.\nWhat happens?\n\nA) Speeding Up\nB. Slowing Down\n\nC. Moving at Varying Speeds\n"
        "D. Maintaining a Constant Speed\nAnswer with a letter.")
    assert question == "Watch the clip.\nWhat happens?" and rest == "Answer with a letter."
    assert options == ["Speeding Up", "Slowing Down", "Moving at Varying Speeds", "Maintaining a Constant Speed"]
    assert answer_letter("C. moving at varying speeds.", options, "x") == "C"
    assert answer_letter("Slowing Down", options, "x") == "B"
    for bad in ("E", "C. Slowing Down", "faster"):
        with pytest.raises(BadRow):
            answer_letter(bad, options, "x")


def test_subtask_rule():
    infer = importers.infer_subtask
    assert infer("?", ["Pan Left", "Dolly In, Tilt Up and Roll Clockwise", "Truck Right", "Pedestal Up"]) == (
        "camera_motion")
    assert infer("?", list(OBJECT_SPEEDS[:4])) == "object_speed"
    assert infer("?", list(OBJECT_DISTANCES[:4])) == "object_distance"
    assert infer("?", ["Moving Left", "Stationary", "Moving Up", "Moving Away from Camera"]) == "object_direction"
    assert infer("How does its speed change?", ["a", "b", "c", "d"]) == "object_speed"
    assert infer("How did the camera move?", ["a", "b", "c", "d"]) == "camera_motion"
    assert infer("Which direction is the dog heading, seen from the camera?", ["a", "b", "c", "d"]) == (
        "object_direction")
    assert infer("What colour is it?", ["a", "b", "c", "d"]) == "unknown"


# --- bad rows -----------------------------------------------------------------------------------------


def bad_4dthinker_file(tmp_path):
    write_video(tmp_path / "clip.mp4", num_frames=8)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    return write_jsonl(tmp_path / "mixed.jsonl", [
        rl_row(),                                                   # line 1: good
        sft_row(tmp_path, image_output=sft_row(tmp_path)["image_output"][:1]),  # 2 markers, 1 image
        rl_row(Correct="E"),                                        # answer not A-D
        rl_row(video_path="broken.mp4"),                            # undecodable video
        "{not json",                                                # not JSON
        {"id": 5},                                                  # neither SFT nor RL
        rl_row(video_path="absent.mp4"),                            # missing video
        sft_row(tmp_path, text_input="What now?\nA. Pan Left\nB. Dolly In"),  # two options only
    ])


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = bad_4dthinker_file(tmp_path)
    stats = importers.import_to_records("4dthinker", path, tmp_path / "out.array_record")
    assert (stats.read, stats.written, stats.num_skipped) == (8, 1, 7)
    assert stats.skipped == {importers.IMAGERY_COUNT: 1, importers.BAD_ANSWER: 1, importers.UNREADABLE_MEDIA: 2,
                             importers.INVALID_JSON: 1, importers.MISSING_FIELD: 1, importers.BAD_OPTIONS: 1}
    assert "row 2" in stats.first_problem[importers.IMAGERY_COUNT]
    assert stats.summary().startswith("read 8, written 1, skipped 7 (bad answer: 1,")
    (sample,) = records.read(tmp_path / "out.array_record")
    assert sample["sample_id"] == "4dthinker:mixed:1"


@pytest.mark.parametrize("line, expected", [
    (2, "has 2 <output_image> markers but 'image_output' lists 1 images"),
    (3, "field 'Correct' holds 'E'"),
    (4, "broken.mp4 cannot be decoded as a video"),
    (5, "not valid JSON"),
    (6, "field 'text_input' (SFT) or 'Question' (RL) is missing"),
    (7, "absent.mp4 does not exist"),
    (8, "no four option lines"),
])
def test_bad_rows_raise_one_sentence_naming_file_and_row(tmp_path, line, expected):
    path = bad_4dthinker_file(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *[""] * (line - 2), lines[line - 1]]) + "\n")  # keep the line number
    out = tmp_path / "out.array_record"
    with pytest.raises(InputError) as error:
        importers.import_to_records("4dthinker", path, out, skip_bad_records=False)
    assert_one_sentence(str(error.value), f"{path} row {line}:", expected)
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == list(tmp_path.glob(".*.tmp")) == []


def test_unknown_format_and_unreadable_data_file(tmp_path):
    with pytest.raises(InputError, match="unknown"):
        importers.import_to_records("nope", tmp_path / "x.json", tmp_path / "o.array_record")
    (tmp_path / "x.json").write_text("[{broken")
    with pytest.raises(InputError, match="neither JSON nor JSON lines"):
        list(importers.import_vlm4d(tmp_path / "x.json"))


# --- DSR ----------------------------------------------------------------------------------------------

DSR_QA = [
    {"Type": "abs_dis", "Question": "Between 0.0s and 3.0s, how does the distance change?",
     "A": "(1) Become larger.", "B": "(1) Become smaller.", "C": "(1) Keep nearly constant.",
     "D": "(1) Become larger. (2) Become smaller.", "Correct": "C"},
    {"Type": "rel_dir", "Question": "Following the perspective of the camera, where is the car?",
     "A": "A. (1) Front|Left.", "B": "B. (1) Behind.", "C": "C. (1) Right.", "D": "D. (1) Above.", "Correct": "A"},
]


def test_dsr_raw_qa_both_layouts(tmp_path):
    write_video(tmp_path / "videos" / "v1.mp4", num_frames=24)
    mapping = tmp_path / "qa_map.json"
    mapping.write_text(json.dumps({"v1.mp4": DSR_QA}))
    listed = tmp_path / "qa_list.json"
    listed.write_text(json.dumps([{**qa, "video": "videos/v1.mp4"} for qa in DSR_QA]))
    from_mapping = list(importers.import_dsr(mapping, tmp_path / "videos"))
    from_list = list(importers.import_dsr(listed))
    for samples in (from_mapping, from_list):
        assert [s["subtask"] for s in samples] == ["abs_dis", "rel_dir"]
        assert [s["answer"] for s in samples] == ["C", "A"]
        assert samples[1]["options"] == ["(1) Front|Left.", "(1) Behind.", "(1) Right.", "(1) Above."]
        assert samples[0]["question"] == DSR_QA[0]["Question"]
        # DSR samples up to 32 frames uniformly over the clip: all 24 here (SPEC 4).
        assert frame_indices(samples[0]["frames"]) == list(range(24)) and samples[0]["source"] == "dsr"
        assert_no_geometry(samples[0])
    assert [s["sample_id"] for s in from_mapping] == ["dsr:qa_map:1", "dsr:qa_map:2"]
    assert from_mapping[0]["meta"]["video"] == "v1.mp4"
    assert_round_trip(from_mapping, tmp_path / "dsr.array_record")

    listed.write_text(json.dumps([{**DSR_QA[0], "Type": "abs_color", "video": "videos/v1.mp4"}]))
    with pytest.raises(InputError) as error:
        list(importers.import_dsr(listed))
    assert_one_sentence(str(error.value), "qa_list.json row 1", "'abs_color'", "13 DSR sub-tasks")


def bench_rows():
    return [
        {"videoID": "scene_01", "question": "How does the speed of the dog change?", "type": "abs_spd",
         "options": ["A. (1) Become larger.", "B. (1) Become smaller.", "C. (1) Keep nearly constant.",
                     "D. (1) Becomes smaller."], "answer": "D"},
        {"videoID": "scene_01.mp4", "question": "Where will the dog be?", "type": "rel_dir_pred",
         "options": json.dumps(["A. Front.", "B. Left.", "C. Right.", "D. Behind."]), "answer": "B"},
        {"videoID": "scene_01", "question": "Misordered options?", "type": "non_temp",
         "options": ["B. x", "A. y", "C. z", "D. w"], "answer": "A"},
    ]


def test_dsr_bench_rows(tmp_path):
    write_video(tmp_path / "scene_01.mp4", num_frames=16)
    path = write_jsonl(tmp_path / "bench.jsonl", bench_rows())
    stats = importers.ImportStats()
    first, second = importers.import_dsr_bench(path, skip_bad_records=True, stats=stats)
    assert first["options"] == ["(1) Become larger.", "(1) Become smaller.", "(1) Keep nearly constant.",
                                "(1) Becomes smaller."]
    assert (first["answer"], first["subtask"], second["answer"], second["subtask"]) == ("D", "abs_spd", "B",
                                                                                         "rel_dir_pred")
    assert second["options"] == ["Front.", "Left.", "Right.", "Behind."]
    assert first["sample_id"] == "dsr:bench:1" and first["meta"]["videoID"] == "scene_01"
    assert frame_indices(second["frames"]) == list(range(16))  # up to 32 uniformly sampled: all 16
    assert first["shown_frames"] == list(range(16)) and second["shown_frames"] == list(range(14))  # dir_pred
    assert stats.skipped == {importers.BAD_OPTIONS: 1} and "option A in field 'options' is prefixed 'B'" in (
        stats.first_problem[importers.BAD_OPTIONS])
    assert_round_trip([first, second], tmp_path / "bench.array_record")


def test_dsr_bench_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa  # local: heavy and optional, like parquet support itself

    write_video(tmp_path / "scene_01.mp4", num_frames=8)
    pq.write_table(pa.Table.from_pylist(bench_rows()[:1]), tmp_path / "benchmark.parquet")
    stats = importers.import_to_records("dsr_bench", tmp_path / "benchmark.parquet", tmp_path / "b.array_record")
    assert (stats.read, stats.written) == (1, 1)
    (sample,) = records.read(tmp_path / "b.array_record")
    assert sample["answer"] == "D" and sample["subtask"] == "abs_spd" and len(sample["frames"]) == 8


# --- VLM4D --------------------------------------------------------------------------------------------

HUB = "https://huggingface.co/datasets/shijiezhou/VLM4D/resolve/main/"


def test_vlm4d_rows(tmp_path):
    write_video(tmp_path / "videos_real" / "davis" / "ride.mp4", num_frames=24)
    rows = [
        {"id": 3, "video": HUB + "videos_real/davis/ride.mp4", "question_type": "counting",
         "question": "How many cars pass?", "choices": {"A": 1, "B": 2, "C": 3, "D": 4}, "answer": "3"},
        {"id": 4, "video": "videos_real/davis/ride.mp4", "question_type": "exo_direction",
         "question": "Which way does the rider turn?",
         "choices": {"A": "left", "B": "right", "C": "no turn", "D": "back"}, "answer": "right"},
        {"id": 5, "video": "videos_real/davis/ride.mp4", "question_type": "counting", "question": "Speed?",
         "choices": {"A": 1.5, "B": 2, "C": 3, "D": 4}, "answer": 2},
        {"id": 6, "video": "videos_real/davis/ride.mp4", "question_type": "counting", "question": "Twice?",
         "choices": {"A": 1, "B": 2, "C": 2, "D": 4}, "answer": 2},
        {"id": 7, "video": "videos_real/davis/ride.mp4", "question_type": "counting", "question": "None?",
         "choices": {"A": 1, "B": 2, "C": 3, "D": 4}, "answer": "five"},
    ]
    path = tmp_path / "real_mc.json"
    path.write_text(json.dumps(rows))
    stats = importers.ImportStats()
    samples = list(importers.import_vlm4d(path, skip_bad_records=True, stats=stats))
    assert [s["answer"] for s in samples] == ["C", "B", "B"]
    assert samples[0]["options"] == ["1", "2", "3", "4"] and samples[2]["options"][0] == "1.5"
    assert samples[0]["subtask"] == "counting" and samples[1]["subtask"] == "exo_direction"
    assert samples[0]["sample_id"] == "vlm4d:real_mc:3" and samples[0]["meta"]["original_id"] == 3
    assert samples[0]["source"] == samples[0]["family"] == "vlm4d"
    assert frame_indices(samples[0]["frames"]) == [0, 8, 16]
    assert stats.skipped == {importers.BAD_ANSWER: 2}
    assert_round_trip(samples, tmp_path / "vlm4d.array_record")
    with pytest.raises(InputError) as error:
        list(importers.import_vlm4d(path))
    assert_one_sentence(str(error.value), "real_mc.json row 4", "equals 2 of the choices")


def test_data_import_cli_writes_records_and_reports_skips(tmp_path, capsys):
    write_video(tmp_path / "clips" / "a.mp4", num_frames=24)
    rows = [{"id": 1, "video": "clips/a.mp4", "question_type": "direction", "question": "Where?",
             "choices": {"A": "left", "B": "right", "C": "up", "D": "down"}, "answer": "up"},
            {"id": 2, "video": "clips/missing.mp4", "question_type": "direction", "question": "Where?",
             "choices": {"A": "left", "B": "right", "C": "up", "D": "down"}, "answer": "up"}]
    (tmp_path / "vlm4d.json").write_text(json.dumps(rows))
    out = tmp_path / "imported.array_record"
    result = run_script(["data", "import", tmp_path / "vlm4d.json", "--format", "vlm4d", "--out", out])
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert "written 1" in printed[0]
    assert printed[1:] == [f"  skipped unreadable media: {tmp_path / 'vlm4d.json'} row 2: " + printed[1].split(
        "row 2: ", 1)[1]] and "missing.mp4" in printed[1]  # each skipped row with its reason
    (sample,) = records.read(out)
    assert sample["answer"] == "C" and frame_indices(sample["frames"]) == [0, 8, 16]
    assert cli.main(["data", "import", str(tmp_path / "vlm4d.json"), "--format", "vlm4d", "--out",
                     str(tmp_path / "strict.array_record"), "--strict"]) == 2
    assert "row 2" in capsys.readouterr().err


def test_an_import_that_keeps_nothing_fails_and_writes_nothing(tmp_path):
    """The wrong --format, or rows that all fail, is an error naming the first failing row; the output
    is not created, and an existing file there is left as it was."""
    rows = [{"id": i, "video": "clips/missing.mp4", "question_type": "direction", "question": "Where?",
             "choices": {"A": "left", "B": "right", "C": "up", "D": "down"}, "answer": "up"} for i in (1, 2)]
    (tmp_path / "vlm4d.json").write_text(json.dumps(rows))
    out = tmp_path / "out.array_record"
    result = run_script(["data", "import", tmp_path / "vlm4d.json", "--format", "4dthinker", "--out", out])
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith(f"fourd-jax data: error: no record kept from {tmp_path / 'vlm4d.json'} as format "
                          "'4dthinker' (read 2, written 0, skipped 2 (missing field: 2)); the first: missing field: ")
    assert "row 1" in err and err.count("\n") == 0 and err.endswith(".") and not err.endswith("..")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm4d.json"]
    out.write_bytes(b"earlier import")
    with pytest.raises(InputError, match="no record kept from .* unreadable media: .*row 1"):
        importers.import_to_records("vlm4d", tmp_path / "vlm4d.json", out)
    assert out.read_bytes() == b"earlier import"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.array_record", "vlm4d.json"]
