"""`fourd-jax eval` on imported benchmarks: DSR-Bench and VLM4D records are answered with the
sampler and scored per sub-task (a random tiny model; what is checked is the plumbing), every record
counts in the denominators, and VLM4D gets its real / synthetic and exo / ego rows."""

import json

import jax
import msgpack
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from run_configs import run_script
from test_importers import bench_rows, write_jsonl, write_video

from fourd_jax.convert import hf
from fourd_jax.data import importers, records
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.eval import evaluate, report
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.vlm import Qwen25VL

CHOICES = {"A": 1, "B": 2, "C": 3, "D": 4}


def vlm4d_row(number, video):
    return {"id": number, "video": video, "question_type": "counting", "question": "How many cars pass?",
            "choices": CHOICES, "answer": "3"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Imported records (2 DSR-Bench, 2 real + 1 synthetic VLM4D) and a random tiny model."""
    tmp_path = tmp_path_factory.mktemp("eval")
    write_video(tmp_path / "scene_01.mp4", num_frames=16, size=(112, 84))
    write_video(tmp_path / "videos_real" / "ride.mp4", num_frames=16, size=(112, 84))
    write_video(tmp_path / "videos_synthetic" / "synth_001.mp4", num_frames=16, size=(112, 84))
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    importers.import_to_records("dsr_bench", write_jsonl(tmp_path / "bench.jsonl", bench_rows()[:2]),
                                records_dir / "dsr.array_record")
    # Real ids <= 922 are exo-centric; the synthetic file's id says nothing about the view.
    (tmp_path / "real_mc.json").write_text(json.dumps([vlm4d_row(3, "videos_real/ride.mp4"),
                                                       vlm4d_row(1000, "videos_real/ride.mp4")]))
    (tmp_path / "synthetic_mc.json").write_text(json.dumps([vlm4d_row(5, "videos_synthetic/synth_001.mp4")]))
    for name in ("real_mc", "synthetic_mc"):
        importers.import_to_records("vlm4d", tmp_path / f"{name}.json", records_dir / f"vlm4d_{name}.array_record",
                                    root=tmp_path)
    tokenizer = build_tokenizer(["How many cars pass? Where will the dog be? <answer>A</answer>"] * 4,
                                vocab_size=300)
    model = Qwen25VL(config_for_tokenizer(tokenizer, PRESETS["tiny"]()))
    params = init_params(model, jax.random.key(0))
    return tmp_path, records_dir, tokenizer, model, params


def eval_config(**changes):
    base = {"batch_size": 8, "max_new_tokens": 6, "seq_buckets": (1024,), "max_frames": 4,
            "video_max_pixels": 112 * 84}
    return evaluate.EvalConfig(**{**base, **changes})


def right(predictions):
    return sum(p.predicted == p.answer for p in predictions)


def test_eval_reads_imported_dsr_bench_and_vlm4d(setup):
    tmp_path, records_dir, tokenizer, model, params = setup
    predictions, unscored = evaluate.predict(model, params, tokenizer, records_dir, eval_config(), progress=False)
    assert unscored == 0
    assert [(p.sample_id, p.family, p.subtask, p.answer) for p in predictions] == [
        ("dsr:bench:1", "dsr", "abs_spd", "D"), ("dsr:bench:2", "dsr", "rel_dir_pred", "B"),
        ("vlm4d:real_mc:3", "vlm4d", "counting", "C"), ("vlm4d:real_mc:1000", "vlm4d", "counting", "C"),
        ("vlm4d:synthetic_mc:5", "vlm4d", "counting", "C")]
    assert all(p.predicted in (None, "A", "B", "C", "D") and p.reason is None for p in predictions)
    assert [p.groups for p in predictions] == [
        (), (), ("vlm4d", "vlm4d/real", "vlm4d/real_exo"), ("vlm4d", "vlm4d/real", "vlm4d/real_ego"),
        ("vlm4d", "vlm4d/synthetic")]

    table = report.write_results(tmp_path / "out", predictions)
    # DSR-Bench and VLM4D together: each family's sub-tasks are rows of their own
    assert table["micro"]["n"] == 5 and set(table["subtasks"]) == {"dsr/abs_spd", "dsr/rel_dir_pred",
                                                                   "vlm4d/counting"}
    assert table["micro"]["unanswered"] == sum(p.predicted is None for p in predictions)
    assert table["unscored"] == []
    vlm = predictions[2:]
    expected = {"vlm4d": vlm, "vlm4d/real": vlm[:2], "vlm4d/real_exo": vlm[:1], "vlm4d/real_ego": vlm[1:2],
                "vlm4d/synthetic": vlm[2:]}
    assert list(table["groups"]) == sorted(expected)
    for name, members in expected.items():
        row = table["groups"][name]
        assert (row["n"], row["correct"]) == (len(members), right(members))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["micro"]["n"] == 5 and saved["groups"]["vlm4d/real"]["n"] == 2
    printed = report.compare_table({"accuracy": table})
    assert [line.split()[0] for line in printed.splitlines()[-5:]] == sorted(expected)


def test_eval_max_samples_counts_records_in_file_order(setup):
    _, records_dir, tokenizer, model, params = setup
    predictions, _ = evaluate.predict(model, params, tokenizer, records_dir, eval_config(max_samples=3),
                                      progress=False)
    assert [p.sample_id for p in predictions] == ["dsr:bench:1", "dsr:bench:2", "vlm4d:real_mc:3"]


def write_raw(path, items):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for item in items:
        writer.write(item)
    writer.close()


def test_unscored_questions_count_as_wrong_and_are_listed(setup):
    tmp_path, records_dir, tokenizer, model, params = setup
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("dsr", "vlm4d_real_mc", "vlm4d_synthetic_mc"):
        (mixed / f"{name}.array_record").write_bytes((records_dir / f"{name}.array_record").read_bytes())
    # A record whose frames are not PNG (its sub-task is known) and one that is not a record at all.
    packed = msgpack.unpackb(records.encode(next(records.read(records_dir / "vlm4d_real_mc.array_record"))),
                             raw=False)
    packed["sample_id"], packed["frames"] = "broken-frames", [b"not a png"] * len(packed["frames"])
    write_raw(mixed / "zz_bad.array_record", [msgpack.packb(packed, use_bin_type=True), b"\x00garbage"])

    # A bucket the VLM4D prompts (2 frames at 1 fps) fit and the DSR-Bench ones (4 of 16 frames) do not.
    features = FeatureConfig(max_frames=4, video_max_pixels=112 * 84, supervised=False)
    lengths: dict[str, list[int]] = {}
    for sample in records.read(records_dir):
        lengths.setdefault(sample["family"], []).append(len(featurize(sample, tokenizer, model.config,
                                                                      features)["input_ids"]))
    bucket = max(lengths["vlm4d"])
    assert bucket < min(lengths["dsr"])
    config = eval_config(seq_buckets=(bucket,))
    predictions, unscored = evaluate.predict(model, params, tokenizer, mixed, config, progress=False)
    assert unscored == 4 and len(predictions) == 7
    by_id = {p.sample_id: p for p in predictions}
    for sample_id, subtask in (("dsr:bench:1", "abs_spd"), ("dsr:bench:2", "rel_dir_pred")):
        p = by_id[sample_id]
        assert (p.subtask, p.family, p.predicted, p.correct) == (subtask, "dsr", None, False)
        assert f"more than max_length {bucket}" in p.reason
    broken = by_id["broken-frames"]
    assert (broken.subtask, broken.family, broken.groups) == ("counting", "vlm4d",
                                                              ("vlm4d", "vlm4d/real", "vlm4d/real_exo"))
    assert "field 'frames' cannot be decoded" in broken.reason
    garbage = by_id["zz_bad.array_record:1"]
    assert (garbage.subtask, garbage.family) == (report.UNREADABLE, "unknown")
    assert "not a msgpack record" in garbage.reason

    table = report.write_results(tmp_path / "mixed_out", predictions)
    scored = [p for p in predictions if p.reason is None]
    assert len(scored) == 3
    assert table["micro"]["n"] == 7 and table["micro"]["correct"] == right(scored)
    assert table["subtasks"]["dsr/abs_spd"] == {**table["subtasks"]["dsr/abs_spd"], "n": 1, "correct": 0,
                                                "accuracy": 0.0, "unanswered": 0}  # unscored, not unanswered
    counting = [p for p in scored if p.subtask == "counting"]
    assert (table["subtasks"]["vlm4d/counting"]["n"], table["subtasks"]["vlm4d/counting"]["correct"]) == (
        4, right(counting))
    assert table["subtasks"][report.UNREADABLE]["n"] == 1
    # Macro leaves the unreadable pseudo-sub-task out: abs_spd, counting, rel_dir_pred.
    assert table["macro"]["subtasks"] == 3
    assert table["groups"]["vlm4d/real"]["n"] == 3  # two scored real records and the broken one
    saved = json.loads((tmp_path / "mixed_out" / "results.json").read_text())
    assert [u["sample_id"] for u in saved["unscored"]] == ["dsr:bench:1", "dsr:bench:2", "broken-frames",
                                                           "zz_bad.array_record:1"]
    assert all(u["reason"] for u in saved["unscored"])
    assert report.compare_table({"accuracy": table}).splitlines()[-1] == "unscored (counted wrong): accuracy 4"

    # Nothing at all fits: an error, not an empty table.
    with pytest.raises(InputError, match="holds no question that can be scored: all 5"):
        evaluate.predict(model, params, tokenizer, records_dir, eval_config(seq_buckets=(64,)), progress=False)


@pytest.mark.parametrize("meta, groups", [
    # The released layout: a Hugging Face URL into videos_real/ or videos_synthetic/.
    ({"video": "https://huggingface.co/datasets/shijiezhou/VLM4D/resolve/main/videos_real/davis/a.mp4",
      "source_file": "real_mc.json", "original_id": 922}, ("vlm4d", "vlm4d/real", "vlm4d/real_exo")),
    ({"video": "videos_real/ego4d/b.mp4", "source_file": "qa.json", "original_id": 923},
     ("vlm4d", "vlm4d/real", "vlm4d/real_ego")),
    ({"video": "videos_synthetic/synth_001.mp4", "source_file": "qa.json", "original_id": 5},
     ("vlm4d", "vlm4d/synthetic")),
    # Without the folders, the QA file's name tells the split; an id may be text.
    ({"video": "clips/c.mp4", "source_file": "real_mc.json", "original_id": "17"},
     ("vlm4d", "vlm4d/real", "vlm4d/real_exo")),
    ({"video": "clips/c.mp4", "source_file": "synthetic_mc.json"}, ("vlm4d", "vlm4d/synthetic")),
    ({"video": "clips\\videos_real\\d.mp4", "source_file": "x.json"},
     ("vlm4d", "vlm4d/real", "vlm4d/real_unknown_view")),
    ({"video": "clips/e.mp4", "source_file": "mine.json", "original_id": 1}, ("vlm4d", "vlm4d/unknown_split")),
])
def test_vlm4d_groups(meta, groups):
    assert evaluate.vlm4d_groups(meta) == groups
    assert evaluate.record_groups("vlm4d", meta) == groups
    assert evaluate.record_groups("dsr", meta) == ()


def test_the_eval_bar_shows_its_total(setup):
    """Through the installed script: the bar on stderr counts to the number of questions scored."""
    tmp_path, records_dir, tokenizer, model, params = setup
    hf.save(model, params, tmp_path / "hf", tokenizer=tokenizer)
    result = run_script(["eval", "--checkpoint", tmp_path / "hf", "--data", records_dir, "--out", tmp_path / "bar",
                         "--max-samples", "4", "--batch-size", "8", "--max-new-tokens", "4", "--max-frames", "4",
                         "--max-pixels", str(112 * 84)])
    assert result.returncode == 0, result.stderr[-2000:]
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("eval")][-1]
    assert "4/4" in bar, bar
    assert len((tmp_path / "bar" / "predictions.jsonl").read_text().splitlines()) == 4
