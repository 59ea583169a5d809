"""A failed or mismatched run leaves nothing a later run would silently reuse: empty splits are refused
before anything is written, workdir artefacts are written whole and only reused for the same inputs,
and synth never mixes its shards with an earlier run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_configs import load_config, run_script, tiny_records

from fourd_jax.data import records
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.errors import InputError
from fourd_jax.train import job, observe
from fourd_jax.train.settings import RunSettings

SCRIPT = Path(sys.executable).with_name("fourd-jax")
SMALL = SynthConfig(scene=SceneConfig(num_frames=8, image_size=(56, 56)), families=("4dthinker",))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_records(tmp_path_factory.mktemp("artefact_data"), seed=5)


def digest(path: Path) -> dict[str, str]:
    return observe.file_digest(records.files(path / "train"))


def test_an_empty_train_split_is_refused_before_the_workdir_is_made(tmp_path):
    """The reported case: a train/ holding a 0-record file used to crash in Grain and leave a tokenizer
    trained on nothing in the workdir."""
    records.write(tmp_path / "data" / "train" / "empty.array_record", [])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([str(SCRIPT), "dift", "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "data"),
                             "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fourd-jax dift: error: data directory {tmp_path / 'data'} has an empty train/ "
                                     "split (0 records); synthesise or import records into it first.")
    assert not (tmp_path / "w").exists()


def test_the_workdir_tokenizer_is_written_whole_and_reused_only_for_its_inputs(data, tmp_path):
    path, _ = data
    settings = RunSettings.of(load_config("dift", **{"tokenizer_vocab_size": 320}))
    workdir = tmp_path / "w"
    workdir.mkdir()
    tok = job.tokenizer(settings, workdir, path, digest(path))
    assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer"]  # no partial directory left behind
    inputs = json.loads((workdir / "tokenizer" / job.TOKENIZER_INPUTS).read_text())
    assert inputs == {"trained_on": sorted(digest(path).values()), "vocab_size": 320}
    again = job.tokenizer(settings, workdir, path, digest(path))
    assert again.get_vocab() == tok.get_vocab()
    other = tmp_path / "other"
    synthesize(other, 3, seed=9, config=SMALL, progress=False)
    with pytest.raises(InputError, match=f"^{workdir / 'tokenizer'} was trained on other records or with another "
                                         "tokenizer_vocab_size than this run's"):
        job.tokenizer(settings, workdir, other, digest(other))
    bigger = RunSettings.of(load_config("dift", **{"tokenizer_vocab_size": 400}))
    with pytest.raises(InputError, match="was trained on other records or with another tokenizer_vocab_size"):
        job.tokenizer(bigger, workdir, path, digest(path))
    # A given tokenizer is copied in once; another one given later is refused by name.
    given = RunSettings.of(load_config("dift", **{"tokenizer": str(path / "tokenizer")}))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    job.tokenizer(given, fresh, path, digest(path))
    assert (fresh / "tokenizer" / "tokenizer.json").exists()
    with pytest.raises(InputError, match=f"^{workdir / 'tokenizer'} is not the tokenizer {path / 'tokenizer'}"):
        job.tokenizer(given, workdir, path, digest(path))


def test_a_resumed_run_refuses_other_records(data, tmp_path):
    path, _ = data
    (tmp_path / "manifest.json").write_text(json.dumps({"data_files": {"x": "0" * 64}}))
    with pytest.raises(InputError, match="was trained on other records than .*the files' SHA-256 differ"):
        job.check_same_records(tmp_path, path, digest(path))
    # The same files, moved elsewhere, are the same records.
    moved = {f"/elsewhere/{i}": sha for i, sha in enumerate(digest(path).values())}
    (tmp_path / "manifest.json").write_text(json.dumps({"data_files": moved}))
    job.check_same_records(tmp_path, path, digest(path))


def test_synth_refuses_an_earlier_output_unless_told_to_replace_it(tmp_path):
    args = ["--num-scenes", "3", "--frames", "8", "--image-size", "56", "--families", "4dthinker"]
    out = tmp_path / "d"
    assert run_script(["synth", "--out", out, *args, "--seed", "1"]).returncode == 0
    first = {p.name: p.read_bytes() for p in records.files(out)}
    result = run_script(["synth", "--out", out, *args, "--seed", "2"])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fourd-jax synth: error: --out {out} is not empty; choose a new directory, "
                                     "or pass --overwrite to replace an earlier synth output there.")
    assert {p.name: p.read_bytes() for p in records.files(out)} == first
    # --overwrite replaces it whole: no shard of the first run is left beside the new ones.
    assert run_script(["synth", "--out", out, "--num-scenes", "12", *args[2:], "--seed", "2",
                       "--scenes-per-shard", "5", "--overwrite"]).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_scenes"] == 12
    assert sum(s["records"] for s in manifest["splits"].values()) == records.count(out)
    (out / "notes.txt").write_text("mine")
    result = run_script(["synth", "--out", out, *args, "--overwrite"])
    assert result.returncode == 2 and "holds more than a synth output (notes.txt)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").exists()
    result = run_script(["synth", "--out", out / "notes.txt", *args])
    assert result.stderr.strip() == (f"fourd-jax synth: error: --out {out / 'notes.txt'} is a file; synth writes a "
                                     "directory of splits.")


def test_synth_warns_about_an_empty_split(tmp_path, capsys):
    synthesize(tmp_path / "d", 2, seed=0, config=SMALL, progress=False)
    err = capsys.readouterr().err
    assert f"synth: warning: the val split of {tmp_path / 'd'} is empty" in err
    assert f"synth: warning: the test split of {tmp_path / 'd'} is empty" in err


def test_inspect_makes_the_sheet_directory_or_says_why_it_cannot(tmp_path):
    synthesize(tmp_path / "d", 3, seed=0, config=SMALL, progress=False)
    sheet = tmp_path / "new" / "deeper" / "sample.png"
    assert run_script(["data", "inspect", tmp_path / "d", "--sheet", sheet]).returncode == 0
    assert sheet.stat().st_size > 1_000
    (tmp_path / "afile").write_text("x")
    result = run_script(["data", "inspect", tmp_path / "d", "--sheet", tmp_path / "afile" / "s.png"])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fourd-jax data: error: --sheet {tmp_path / 'afile' / 's.png'} cannot be "
                                     "written: a parent of it is a file.")


def test_training_without_val_records_says_it_reports_no_val_loss(tmp_path):
    """Two scenes leave val/ and test/ empty: synth warns, and DIFT says it will report no val_loss."""
    result = run_script(["synth", "--out", tmp_path / "d", "--num-scenes", "2", "--frames", "8", "--image-size", "56",
                         "--families", "4dthinker"])
    assert "the val split of" in result.stderr and "is empty" in result.stderr
    result = run_script(["dift", "--workdir", tmp_path / "w", "--data", tmp_path / "d", "--steps", "1",
                         "--config.data.seq_buckets=(1024,)", "--config.tokenizer_vocab_size=300"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"note: {tmp_path / 'd'} has no val/ records, so this run reports no val_loss." in result.stderr
    # The training bar (on stderr) shows the loss terms, the learning rate and tokens/s, not only the loss.
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("train")][-1]
    assert all(f"{field}=" in bar for field in ("loss", "ce", "latent", "lr", "tok/s")), bar
