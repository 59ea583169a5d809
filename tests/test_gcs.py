"""gs:// workdirs and data, end to end against a GCS emulator on the loopback address: synth writes
records to gs://, DIFT reads them and resumes there exactly, GRPO starts from and resumes in gs://
workdirs, eval scores a gs:// checkpoint into a gs:// output. Nothing lands on the local disk but the
staged copies in the cache."""

import json
import os

import jax
import numpy as np
import portpicker
import pytest
from etils import epath
from run_configs import load_config, run_script

from fourd_jax import checkpoint, files
from fourd_jax.data import records
from fourd_jax.errors import InputError
from fourd_jax.train import dift, loop, rl
from fourd_jax.train.settings import RunSettings

BUCKET = "gs://bkt"
DATA = f"{BUCKET}/data"
# The variables configure_storage sets from STORAGE_EMULATOR_HOST, restored with it at teardown.
SET_BY_CONFIGURE = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _send_generation_on_download() -> None:
    """GCS answers a media download with the object's generation in `x-goog-generation`; the emulator
    (2026.x) leaves it out. tensorstore's OCDBT store (Orbax's arrays) reads a manifest back with it and
    writes the next one conditioned on it, failing with "Malformed StorageGeneration" without it."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):  # whole object, or a range of it
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
    download.sends_generation = True
    objects.download = download  # `objects.get` calls it for ?alt=media; the routes below name it directly
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """An in-memory GCS emulator with bucket `bkt` on a free loopback port, for this process and the
    commands it starts (STORAGE_EMULATOR_HOST; staged files go to a temporary FOURD_JAX_CACHE)."""
    from gcp_storage_emulator.server import create_server

    _send_generation_on_download()
    port = portpicker.pick_unused_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    # Clients that close a connection early make the emulator print a BrokenPipe traceback; they are harmless.
    server._api._httpd.handle_error = lambda request, address: None
    saved = {name: os.environ.get(name) for name in ("STORAGE_EMULATOR_HOST", files.CACHE_ENV, *SET_BY_CONFIGURE)}
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ[files.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield port
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def data(emulator):
    """`fourd-jax synth --out gs://bkt/data`: 6 small scenes of one question family."""
    result = run_script(["synth", "--out", DATA, "--num-scenes", "6", "--frames", "8", "--image-size", "56",
                         "--families", "4dthinker", "--scenes-per-shard", "3"])
    assert result.returncode == 0, result.stderr[-2000:]
    return DATA


def dift_config(**overrides):
    return load_config("dift", **{"data.seq_buckets": (1024,), "train.checkpoint_every": 3, "train.eval_batches": 1,
                                  "tokenizer_vocab_size": 300, **overrides})


def metrics_rows(workdir: str) -> list[dict]:
    text = (epath.Path(workdir) / "metrics.jsonl").read_text()
    return [loop.without_timing(json.loads(line)) for line in text.splitlines()]


def test_synth_writes_records_and_its_manifest_to_gcs(data):
    manifest = json.loads(epath.Path(f"{data}/manifest.json").read_text())
    shards = records.files(f"{data}/train")
    assert [str(s) for s in shards] == [f"{data}/train/train-00000-of-00002.array_record",
                                       f"{data}/train/train-00001-of-00002.array_record"]
    assert records.count(f"{data}/train") == manifest["splits"]["train"]["records"] > 0
    assert not any(epath.Path(f"{data}/train").glob(".*"))  # no temporary file left beside the shards


def test_dift_on_gcs_resumes_exactly_as_one_run(data, tmp_path, monkeypatch):
    """3 steps, stop, resume to 6 equals 6 steps in one go (metrics rows and params), all in gs://; the
    tokenizer trained on the records, the manifest and TensorBoard events are written there too."""
    monkeypatch.chdir(tmp_path)  # Path("gs://b/x").absolute() once made a local gs:/b/x: nothing may appear here
    straight, split = f"{BUCKET}/straight", f"{BUCKET}/split"
    dift.train(RunSettings.of(dift_config()), straight, data=data, steps=6, progress=False)
    dift.train(RunSettings.of(dift_config()), split, data=data, steps=3, progress=False)
    assert [r["step"] for r in metrics_rows(split)] == [1, 2, 3]
    dift.train(RunSettings.of(dift_config()), split, data=data, steps=6, progress=False)
    rows = [metrics_rows(w) for w in (straight, split)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == list(range(1, 7))
    _, a = checkpoint.restore_params(f"{straight}/checkpoints")
    _, b = checkpoint.restore_params(f"{split}/checkpoints")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert checkpoint.latest_step(f"{split}/checkpoints") == 6
    workdir = epath.Path(split)
    assert json.loads((workdir / "manifest.json").read_text())["data"] == data
    assert all((workdir / "tokenizer" / name).exists() for name in ("tokenizer.json", "fourd_inputs.json"))
    assert len(list((workdir / "tensorboard").iterdir())) == 2  # one events file per run
    assert list(tmp_path.iterdir()) == []
    # Validation errors name the gs:// path, as they do a local one.
    with pytest.raises(InputError, match=f"^data directory {BUCKET}/nothing has no train/ split"):
        dift.train(RunSettings.of(dift_config()), f"{BUCKET}/other", data=f"{BUCKET}/nothing", steps=1)
    with pytest.raises(InputError, match=f"^{BUCKET}/split was trained with tokenizer_vocab_size=300, not 301;"):
        dift.train(RunSettings.of(dift_config(tokenizer_vocab_size=301)), split, data=data, steps=7)


def test_rl_from_a_gcs_workdir_resumes_exactly(data, tmp_path):
    """GRPO from the DIFT workdir in gs:// (its tokenizer and the records its manifest names): 1 step,
    stop, resume to 2 equals 2 steps in one go."""
    if not epath.Path(f"{BUCKET}/split/checkpoints").exists():
        dift.train(RunSettings.of(dift_config()), f"{BUCKET}/split", data=data, steps=1, progress=False)
    config = load_config("rl", **{"data.seq_buckets": (1024,), "sample.max_new_tokens": 8, "mesh.shape": (2, 2, 2),
                                  "data.batch_size": 4, "rl.num_generations": 2})
    straight, resumed = f"{BUCKET}/rl_straight", f"{BUCKET}/rl_resumed"
    rl.train(RunSettings.of(config), straight, init=f"{BUCKET}/split", steps=2, progress=False)
    rl.train(RunSettings.of(config), resumed, init=f"{BUCKET}/split", steps=1, progress=False)
    rl.train(RunSettings.of(config), resumed, init=f"{BUCKET}/split", steps=2, progress=False)
    rows = [metrics_rows(w) for w in (straight, resumed)]
    assert [r["step"] for r in rows[0]] == [1, 2] and rows[0] == rows[1]
    assert json.loads(epath.Path(f"{resumed}/manifest.json").read_text())["data"] == data
    assert checkpoint.latest_step(f"{resumed}/checkpoints") == 2


def test_eval_scores_a_gcs_checkpoint_into_gcs(data, monkeypatch):
    """`fourd-jax eval` with only STORAGE_EMULATOR_HOST set: tensorstore is pointed at the emulator by the
    command itself."""
    workdir = f"{BUCKET}/split"
    if not epath.Path(f"{workdir}/checkpoints").exists():
        dift.train(RunSettings.of(dift_config()), workdir, data=data, steps=1, progress=False)
    for name in SET_BY_CONFIGURE:
        monkeypatch.delenv(name, raising=False)
    result = run_script(["eval", "--checkpoint", workdir, "--data", data, "--out", f"{BUCKET}/eval",
                         "--max-samples", "2", "--batch-size", "8", "--max-new-tokens", "4", "--max-frames", "4"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = epath.Path(f"{BUCKET}/eval")
    table = json.loads((out / "results.json").read_text())
    assert table["micro"]["n"] == 2 and table["checkpoint"] == workdir and table["data"] == f"{data}/test"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert (out / "results.csv").read_text().startswith("subtask,n,correct,")
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    missing = run_script(["eval", "--checkpoint", f"{BUCKET}/none", "--data", data, "--out", f"{BUCKET}/eval2"])
    assert missing.returncode == 2 and missing.stderr.strip().endswith(f"--checkpoint {BUCKET}/none does not exist.")


def test_one_endpoint_for_every_client(emulator, monkeypatch):
    """STORAGE_EMULATOR_HOST sets tensorstore's endpoint; a different one set by hand is one sentence."""
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    files.configure_storage()
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == f"http://127.0.0.1:{emulator}"
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
    with pytest.raises(InputError, match="^TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:1 and STORAGE_EMULATOR_HOST="):
        files.configure_storage()


def test_staged_copies_follow_the_remote_version(emulator, tmp_path):
    """A remote file is downloaded once per version: a rewritten file is staged anew, an unchanged one reused."""
    remote = epath.Path(f"{BUCKET}/staging/a.txt")
    remote.write_text("one")
    first = files.local_copy(remote)
    assert first.read_text() == "one" and files.local_copy(remote) == first
    remote.write_text("two, longer")
    second = files.local_copy(remote)
    assert second != first and second.read_text() == "two, longer"
    with pytest.raises(InputError, match=f"^{BUCKET}/staging/none does not exist.$"):
        files.local_copy(f"{BUCKET}/staging/none")
