"""`fourd-jax synth`: deterministic bytes, splits, manifest, inspection and the TFDS view."""

import hashlib
import json
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from independent_keys import (
    SPEED_OF_MOTION,
    RecordScene,
    distance_key_holds,
    expected_key,
    independent_direction,
    moves_from_poses,
)
from PIL import Image

from fourd_jax import cli
from fourd_jax.data import records
from fourd_jax.data.inspect import summarize
from fourd_jax.data.sim.render import overlay_mask, render_scene
from fourd_jax.data.sim.scene import SceneConfig, sample_scene
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.taxonomy import DSR_SUBTASKS

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
    per_subtask, letters = Counter(), Counter()  # as the writer counted them
    for split in manifest["splits"].values():
        per_subtask.update(split["per_subtask"])
        letters.update(split["answer_letters"])
    assert summary["per_subtask"] == dict(per_subtask) and len(per_subtask) > 10
    assert summary["answer_letters"] == {k: letters[k] for k in "ABCD"}
    assert sheet.stat().st_size > 10_000
    with Image.open(sheet) as image:
        assert image.size[0] > 500 and len(set(np.asarray(image.convert("L")).ravel().tolist())) > 50


def test_inspect_names_a_bad_record(synth_dir, tmp_path):
    raw = [data for _, _, data in records.read_raw(synth_dir / "val")][:3]
    writer = ArrayRecordWriter(str(tmp_path / "mixed.array_record"), "group_size:1")
    for item in (raw[0], raw[1][:50], raw[2]):
        writer.write(item)
    writer.close()
    summary = summarize(tmp_path)
    assert summary["records"] == 2
    assert summary["bad_records"] == [f"{tmp_path / 'mixed.array_record'} record 1: not a msgpack record (ValueError)"]


def test_synth_cli_refuses_bad_arguments(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--num-scenes", "0"]) == 2
    assert "argument --num-scenes: must be a whole number >= 1, not 0" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path), "--num-scenes", "2", "--families", "dsr,nope"]) == 2
    assert "unknown question families ['nope']" in capsys.readouterr().err


def test_tfds_data_source_reads_the_same_records(synth_dir, tmp_path):
    import tensorflow_datasets as tfds  # local: heavy (TFDS), and only this test reads through it

    from fourd_jax.data.tfds_builder import FourdRecords  # local: imports TFDS too

    FourdRecords(records_dir=synth_dir, data_dir=tmp_path).download_and_prepare()
    source = tfds.data_source("fourd_records", data_dir=tmp_path)
    ours = {s["sample_id"]: s for s in records.read(synth_dir / "val")}
    assert len(source["val"]) == len(ours)
    for k in range(len(source["val"])):
        decoded = records.decode(source["val"][k]["record"])
        np.testing.assert_array_equal(decoded["frames"], ours[decoded["sample_id"]]["frames"])
        assert decoded["question"] == ours[decoded["sample_id"]]["question"]


@pytest.fixture(scope="module")
def keyed_records(tmp_path_factory):
    """Every record of 40 synthesised scenes, read back from disk."""
    out = tmp_path_factory.mktemp("keyed")
    synthesize(out, 40, seed=11, config=CONFIG, workers=1, progress=False)
    return list(records.read(out))


def stored_key(sample):
    return sample["options"]["ABCD".index(sample["answer"])]


def test_every_key_is_rederived_from_the_stored_geometry(keyed_records):
    """SPEC 6: anyone can recompute the key from the record alone (its float32 geometry and meta)."""
    seen = Counter()
    for sample in keyed_records:
        scene = RecordScene(sample)
        key, subtask = stored_key(sample), sample["subtask"]
        seen[(sample["family"], subtask)] += 1
        assert sum(option == key for option in sample["options"]) == 1 and len(set(sample["options"])) == 4
        if sample["family"] == "dsr":
            question = SimpleNamespace(subtask=subtask, meta=sample["meta"])
            assert key == expected_key(scene, question), sample["sample_id"]
            continue
        if subtask == "camera_motion":
            assert set(key.replace(" and ", ", ").split(", ")) == moves_from_poses(scene.cam_to_world)
            continue
        obj = sample["object_ids"].index(sample["target_objects"][0])
        if subtask == "object_direction":  # 4DThinker and MLLM-4D ask it alike
            assert key == independent_direction(scene, obj), sample["sample_id"]
        elif subtask == "object_distance":
            assert distance_key_holds(scene, obj, key), sample["sample_id"]
        else:
            assert subtask == "object_speed" and key == SPEED_OF_MOTION[sample["meta"]["motions"][obj]]
        if sample["family"] == "mllm4d":  # the trace states the true centres in the first camera's axes
            cam0, obj0, cam1, obj1 = (np.array(m.split(", "), float)
                                      for m in re.findall(r"\[([-0-9., ]+)\]", sample["trace"]))
            first = scene.cam_to_world[0]

            def to_cam0(p, first=first):
                return (p - first[:3, 3]) @ first[:3, :3]

            np.testing.assert_allclose(cam0, 0.0, atol=0.006)
            np.testing.assert_allclose(cam1, to_cam0(scene.cam_to_world[-1, :3, 3]), atol=0.006)
            np.testing.assert_allclose(obj0, to_cam0(scene.centers[obj, 0]), atol=0.006)
            np.testing.assert_allclose(obj1, to_cam0(scene.centers[obj, -1]), atol=0.006)
    assert {subtask for family, subtask in seen if family == "dsr"} == set(DSR_SUBTASKS)
    assert {subtask for family, subtask in seen if family == "4dthinker"} == {
        "camera_motion", "object_direction", "object_distance", "object_speed"}
    assert seen[("mllm4d", "object_direction")] > 0


def test_each_imagery_image_is_its_frame_with_the_object_mask_in_red(keyed_records):
    """Imagery = frame t with the target's mask blended 40% towards red and its contour in red; the
    mask sits where the stored geometry projects the object, and is the renderer's instance mask."""
    checked = near = 0
    rendered = {}
    for sample in keyed_records:
        sources = sample["meta"]["imagery_sources"]
        assert len(sources) == len(sample["imagery"]) == sample["trace"].count("<output_image>")
        for (t, obj), image in zip(sources, sample["imagery"], strict=True):
            frame = sample["frames"][t].astype(np.float64)
            changed = np.any(image != sample["frames"][t], axis=-1)
            assert changed.sum() >= 4
            blend = np.rint(0.6 * frame + 0.4 * np.array([255.0, 0.0, 0.0]))
            red = np.all(image == [255, 0, 0], axis=-1)
            assert np.all(np.all(image[changed] == blend[changed], axis=-1) | red[changed])
            # The object's centre (moved onto the image when it lies beyond an edge) projects into the
            # slightly grown box of the overlaid pixels.
            centre = sample["object_centers"][obj, t].astype(np.float64)
            pose = sample["cam_to_world"][t].astype(np.float64)
            uvw = sample["intrinsics"].astype(np.float64) @ ((centre - pose[:3, 3]) @ pose[:3, :3])
            height, width = changed.shape
            u, v = np.clip(uvw[0] / uvw[2], 0, width - 1), np.clip(uvw[1] / uvw[2], 0, height - 1)
            rows, cols = np.nonzero(changed)
            outside = max(cols.min() - u, u - cols.max(), rows.min() - v, v - rows.max(), 0.0)
            near += outside <= 2  # beyond that only where another object hides part of this one
            # Exactly the overlay of the renderer's instance mask of that object at that frame.
            if sample["scene_seed"] not in rendered:
                rendered[sample["scene_seed"]] = render_scene(sample_scene(sample["scene_seed"], CONFIG.scene))
            mask = rendered[sample["scene_seed"]].instance[t] == obj + 1
            np.testing.assert_array_equal(image, overlay_mask(sample["frames"][t], mask))
            checked += 1
    assert checked > 100 and near >= 0.97 * checked, (near, checked)
