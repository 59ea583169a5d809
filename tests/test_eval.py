"""`fourd-jax eval` on imported benchmarks: DSR-Bench and VLM4D records are answered with the
sampler and scored per sub-task (a random tiny model; what is checked is the plumbing)."""

import json

import jax
import pytest
from test_importers import bench_rows, write_jsonl, write_video

from fourd_jax.data import importers
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.eval import evaluate, report
from fourd_jax.model import Qwen25VL
from fourd_jax.model.config import PRESETS
from fourd_jax.model.vlm import init_params


def test_eval_reads_imported_dsr_bench_and_vlm4d(tmp_path):
    write_video(tmp_path / "scene_01.mp4", num_frames=16, size=(112, 84))
    write_video(tmp_path / "ride.mp4", num_frames=16, size=(112, 84))
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    importers.import_to_records("dsr_bench", write_jsonl(tmp_path / "bench.jsonl", bench_rows()[:2]),
                                records_dir / "dsr.array_record")
    vlm4d = [{"id": 3, "video": "ride.mp4", "question_type": "counting", "question": "How many cars pass?",
              "choices": {"A": 1, "B": 2, "C": 3, "D": 4}, "answer": "3"}]
    (tmp_path / "real_mc.json").write_text(json.dumps(vlm4d))
    importers.import_to_records("vlm4d", tmp_path / "real_mc.json", records_dir / "vlm4d.array_record",
                                root=tmp_path)

    tokenizer = build_tokenizer(["How many cars pass? Where will the dog be? <answer>A</answer>"] * 4,
                                vocab_size=300)
    model = Qwen25VL(config_for_tokenizer(tokenizer, PRESETS["tiny"]()))
    params = init_params(model, jax.random.key(0))
    config = evaluate.EvalConfig(batch_size=8, max_new_tokens=6, seq_buckets=(1024,), max_frames=4,
                                 video_max_pixels=112 * 84)
    predictions, skipped = evaluate.predict(model, params, tokenizer, records_dir, config, progress=False)
    assert skipped == 0
    assert sorted((p.family, p.subtask, p.answer) for p in predictions) == [
        ("dsr", "abs_spd", "D"), ("dsr", "rel_dir_pred", "B"), ("vlm4d", "counting", "C")]
    assert all(p.predicted in (None, "A", "B", "C", "D") for p in predictions)
    table = report.write_results(tmp_path / "out", predictions)
    assert table["micro"]["n"] == 3 and set(table["subtasks"]) == {"abs_spd", "rel_dir_pred", "counting"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["micro"]["n"] == 3
    # A question longer than every bucket is skipped and counted, never scored.
    short = evaluate.EvalConfig(batch_size=8, max_new_tokens=2, seq_buckets=(64,), max_frames=4,
                                video_max_pixels=112 * 84)
    with pytest.raises(InputError, match=r"no questions to evaluate \(3 records were skipped"):
        evaluate.predict(model, params, tokenizer, records_dir, short, progress=False)
