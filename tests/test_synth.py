"""`fourd-jax synth`: deterministic bytes, splits, manifest, inspection and the TFDS view."""

import hashlib
import json

import numpy as np
import pytest

from fourd_jax import cli
from fourd_jax.data import records
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize

CONFIG = SynthConfig(scene=SceneConfig(num_frames=10, image_size=(112, 112)), scenes_per_shard=3)


def digest(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 10, seed=3, config=CONFIG, workers=1, progress=False)
    return out


def test_same_seed_gives_identical_bytes_with_any_worker_count(synth_dir, tmp_path):
    synthesize(tmp_path / "again", 10, seed=3, config=CONFIG, workers=2, progress=False)
    assert digest(tmp_path / "again") == digest(synth_dir)
    synthesize(tmp_path / "other", 10, seed=4, config=CONFIG, workers=1, progress=False)
    assert digest(tmp_path / "other") != digest(synth_dir)


def test_splits_manifest_and_record_contents(synth_dir):
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    assert {k: v["scenes"] for k, v in manifest["splits"].items()} == {"train": 8, "val": 1, "test": 1}
    samples = list(records.read(synth_dir / "val"))
    assert len(samples) == manifest["splits"]["val"]["records"] > 5
    assert {s["family"] for s in records.read(synth_dir, decode_images=False)} == {"dsr", "4dthinker", "mllm4d"}
    for s in samples:
        assert s["frames"].shape == (10, 112, 112, 3) and s["frames"].dtype == np.uint8
        assert s["cam_to_world"].shape == (10, 4, 4) and s["object_centers"].shape[1:] == (10, 3)
        assert s["trace"].count("<output_image>") == len(s["imagery"])
        assert all(img.shape == (112, 112, 3) for img in s["imagery"])
        assert s["options"][("ABCD").index(s["answer"])] not in [o for i, o in enumerate(s["options"])
                                                                 if "ABCD"[i] != s["answer"]]
        if s["imagery"]:  # imagery frames carry the red overlay where the object's mask is
            assert (s["imagery"][0] != s["frames"]).any()
    sids = [s["sample_id"] for s in records.read(synth_dir, decode_images=False)]
    assert len(sids) == len(set(sids))


def test_inspect_cli_reports_counts_and_draws_a_sheet(synth_dir, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert cli.main(["data", "inspect", str(synth_dir), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("contact sheet")])
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    assert summary["records"] == sum(s["records"] for s in manifest["splits"].values())
    assert summary["bad_records"] == []
    assert sheet.stat().st_size > 10_000


def test_synth_cli_refuses_bad_arguments(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--num-scenes", "0"]) == 2
    assert "--num-scenes must be at least 1" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path), "--num-scenes", "2", "--families", "dsr,nope"]) == 2
    assert "unknown question families ['nope']" in capsys.readouterr().err


def test_tfds_data_source_reads_the_same_records(synth_dir, tmp_path):
    import tensorflow_datasets as tfds

    from fourd_jax.data.tfds_builder import FourdRecords

    FourdRecords(records_dir=synth_dir, data_dir=tmp_path).download_and_prepare()
    source = tfds.data_source("fourd_records", data_dir=tmp_path)
    ours = {s["sample_id"]: s for s in records.read(synth_dir / "val")}
    assert len(source["val"]) == len(ours)
    for k in range(len(source["val"])):
        decoded = records.decode(source["val"][k]["record"])
        np.testing.assert_array_equal(decoded["frames"], ours[decoded["sample_id"]]["frames"])
        assert decoded["question"] == ours[decoded["sample_id"]]["question"]
