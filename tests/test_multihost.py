"""Multi-host jobs on 2 CPU processes (gloo): shape agreement that keeps left padding, GRPO and eval
equal to one process, preemption (SIGTERM to one host) with an exact resume for DIFT and RL, and one
writer for a job's data with the other processes at a barrier."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from run_configs import load_config, tiny_records
from test_train import cli_env, dift_cmd

from fourd_jax import checkpoint
from fourd_jax.data import records
from fourd_jax.data.batching import collate, pad_to_agreed, shape_summary
from fourd_jax.data.features import featurize
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.train import loop
from fourd_jax.train.checkpoints import Checkpointer
from fourd_jax.train.settings import RunSettings

REPO = Path(__file__).parents[1]
BUCKETS = tuple(range(64, 1025, 64))  # fine buckets: the two hosts' prompts land in different ones
STOPPED = "stopped by SIGTERM at step {}; checkpoint saved."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_records(tmp_path_factory.mktemp("multihost_data"), seed=7)


@pytest.fixture(scope="module")
def init(data, tmp_path_factory):
    """A workdir laid out as DIFT leaves it (checkpoints/ with a random tiny model, tokenizer/)."""
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.apply import init_params
    from fourd_jax.model.config import PRESETS
    from fourd_jax.model.vlm import Qwen25VL

    path = tmp_path_factory.mktemp("multihost_init") / "dift"
    model = Qwen25VL(config_for_tokenizer(data[1], PRESETS["tiny"]()))
    # Noise on every matrix: a fresh init answers every prompt with the same newlines, which would
    # make answers in the wrong rows look right.
    leaves, tree = jax.tree_util.tree_flatten(init_params(model, jax.random.key(0)))
    noise = [0.15 * jax.random.normal(key, x.shape, x.dtype) * (x.ndim > 1)
             for x, key in zip(leaves, jax.random.split(jax.random.key(1), len(leaves)), strict=True)]
    params = jax.tree_util.tree_unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])
    checkpoint.save_params(path / "checkpoints", model, params)
    data[1].save_pretrained(path / "tokenizer")
    return path


# ----------------------------------------------------------------------------- shape agreement (no processes)


def test_agreed_left_padded_prompts_are_the_batch_one_process_collates(data):
    """Two hosts' prompts of different buckets, agreed, equal the batch one process collates from all
    four rows (in the global order, host 0's rows then host 1's): left padding kept, rope deltas moved."""
    path, tokenizer = data
    settings = RunSettings.of(load_config("rl", **{"data.seq_buckets": BUCKETS}))
    features = settings.pipeline(supervised=False, left_pad=True).features
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.config import PRESETS

    model_config = config_for_tokenizer(tokenizer, PRESETS["tiny"]())
    examples = [featurize(records.decode(raw), tokenizer, model_config, features)
                for _, _, raw in list(records.read_raw(path / "train"))[:8]]
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    hosts = [by_length[:2], by_length[-2:]]  # the shortest on host 0, the longest on host 1

    def batch_of(rows):
        return collate(rows, len(rows), BUCKETS, model_config, features.latent_size, left_pad=True)

    local = [batch_of(rows) for rows in hosts]
    assert local[0]["input_ids"].shape[1] < local[1]["input_ids"].shape[1]  # different buckets
    summaries = np.stack([shape_summary(b) for b in local])
    agreed = [pad_to_agreed(b, summaries) for b in local]
    whole = batch_of(hosts[0] + hosts[1])
    for key in ("input_ids", "attention_mask", "targets", "loss_mask", "latent_mask", "rope_deltas",
                "example_mask", "video_patches", "video_valid", "video_rotary_pos", "video_frame_id",
                "video_unit_slot", "video_tokens"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in agreed]), whole[key], err_msg=key)
    np.testing.assert_array_equal(np.concatenate([b["position_ids"] for b in agreed], axis=1), whole["position_ids"])
    # Invalid media slots read a zero patch row in both (its index is where each host's padding began).
    valid = whole["video_valid"]
    np.testing.assert_array_equal(np.concatenate([b["video_patch_index"] for b in agreed])[valid],
                                  whole["video_patch_index"][valid])
    assert all((b["attention_mask"][:, -1] == 1).all() for b in agreed)  # the sampler reads the last column
    assert int(agreed[0]["video_frame_len"]) == int(whole["video_frame_len"])


# ----------------------------------------------------------------------------- processes


def start(argv, devices, log: Path) -> subprocess.Popen:
    """A process whose output goes to files (a pipe nobody reads while we wait could fill and block it)."""
    return subprocess.Popen(argv, env=cli_env(devices), cwd=REPO, stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"), text=True)


def finish(proc: subprocess.Popen, log: Path, timeout=600) -> str:
    proc.wait(timeout=timeout)
    err = log.with_suffix(".err").read_text()
    assert proc.returncode == 0, err[-3000:]
    return log.with_suffix(".out").read_text()


def cluster(port, i):
    return [f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}"]


def pair(argv_of, tmp_path, name):
    """Two processes of one cluster (2 CPU devices each): argv_of(cluster flags of process i)."""
    import portpicker

    port = portpicker.pick_unused_port()
    logs = [tmp_path / f"{name}_{i}" for i in range(2)]
    return [start(argv_of(cluster(port, i)), 2, log) for i, log in enumerate(logs)], logs


def preempt_process_1(procs, logs, workdir: Path) -> int:
    """SIGTERM to process 1 only once the run has logged a step; both must save the same step and exit 0.
    Returns that step."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].with_suffix(".err").read_text(
        )[-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    out = [finish(p, log) for p, log in zip(procs, logs, strict=True)]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert Checkpointer(workdir / "checkpoints").latest_step() == step
    assert STOPPED.format(step) in out[0].splitlines()  # said once, by process 0
    assert "SIGTERM" not in out[1]
    return step


def rows(workdir: Path) -> list[dict]:
    return [loop.without_timing(json.loads(line)) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


COUNTS = ("tokens", "ce_tokens", "latent_targets", "skipped_records", "policy_tokens", "completion_length",
          "latent_blocks")  # what the batches (and samples) are: equal exactly when the same rows were read


def assert_rows_close(got, want, rtol, atol=1e-6) -> float:
    """Every step once, in order, with the same counts and metrics within rtol; returns the largest
    relative difference of a metric."""
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, len(want) + 1))
    largest = 0.0
    for a, b in zip(got, want, strict=True):
        assert sorted(a) == sorted(b)
        assert [a.get(k) for k in COUNTS] == [b.get(k) for k in COUNTS], f"step {b['step']}"
        keys = [k for k in b if b[k] is not None]
        x, y = np.array([a[k] for k in keys], np.float64), np.array([b[k] for k in keys], np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"step {b['step']}: {keys}")
        largest = max(largest, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-3))))  # |y| ~ 0: absolute
    return largest


def max_param_difference(one: Path, two: Path) -> float:
    (_, a), (_, b) = checkpoint.restore_params(one / "checkpoints"), checkpoint.restore_params(two / "checkpoints")
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in leaves)


def test_dift_preempted_on_one_host_resumes_to_the_uninterrupted_run(data, tmp_path):
    """SIGTERM to process 1 of 2: both save the same step and exit 0; the restarted pair ends where an
    uninterrupted pair ends (every metric row, parameters). (That 2 processes give the losses of 1 is
    test_train's; RL's test below checks both at once.)"""
    steps = 5
    straight, _ = pair(lambda flags: dift_cmd(tmp_path / "straight", data, steps, *flags), tmp_path, "straight")
    procs, logs = pair(lambda flags: dift_cmd(tmp_path / "two", data, 1000, *flags), tmp_path, "stop")
    stopped = preempt_process_1(procs, logs, tmp_path / "two")
    assert 1 <= stopped < steps
    procs, logs = pair(lambda flags: dift_cmd(tmp_path / "two", data, steps, *flags), tmp_path, "resume")
    out = [finish(p, log) for p, log in zip(procs, logs, strict=True)]
    assert f"resumed from step {stopped}" in out[0].splitlines()
    for proc, name in zip(straight, ("straight_0", "straight_1"), strict=True):
        finish(proc, tmp_path / name)
    relative = assert_rows_close(rows(tmp_path / "two"), rows(tmp_path / "straight"), rtol=1e-6)
    assert "val_loss" in rows(tmp_path / "two")[-1]
    difference = max_param_difference(tmp_path / "straight", tmp_path / "two")
    print(f"DIFT: stopped at step {stopped}; resumed vs uninterrupted: largest relative metric difference "
          f"{relative:.1e}, max |param difference| {difference:.2e}")
    assert difference < 1e-6


JOB = """
import json, sys
from fourd_jax import cli, distributed
from fourd_jax.eval import evaluate
from fourd_jax.train import rl
from fourd_jax.train.settings import RunSettings

job = json.loads(sys.argv[1])
config = cli.parse_config("fourd-jax rl", job["flags"], "rl")
distributed.initialize(config.distributed)
rl.train(RunSettings.of(config), job["workdir"], init=job["init"], data=job["data"], steps=job["steps"],
         progress=False)
eval_config = evaluate.EvalConfig(**{**job["eval"], "seq_buckets": tuple(job["eval"]["seq_buckets"])})
evaluate.evaluate(job["init"], job["data"], job["eval_out"], eval_config, progress=False)
"""
RL_FLAGS = ["--config=rl:tiny", f"--config.data.seq_buckets={BUCKETS}", "--config.data.batch_size=4",
            "--config.rl.num_generations=2", "--config.sample.max_new_tokens=8", "--config.train.checkpoint_every=100"]
# 13 of the 14 test questions at 4 a batch: host 0 answers 7 (4 batches), host 1 answers 6 (3 batches, then
# an empty one while host 0 finishes), and the last batches are short.
EVAL = {"batch_size": 4, "max_new_tokens": 8, "seq_buckets": BUCKETS, "max_frames": 8,
        "video_max_pixels": 112 * 112, "max_samples": 13}


def test_rl_and_eval_on_two_hosts_equal_one_and_resume_after_sigterm(data, init, tmp_path):
    """GRPO on 2 processes whose left-padded prompts sit in different buckets: SIGTERM to process 1
    stops both at the same step; the restarted pair gives the rewards, losses and parameters of one
    process over the whole run; eval on both processes writes the results of one."""
    path, tokenizer = data
    steps = 5
    script = tmp_path / "job.py"
    script.write_text(JOB)

    def job(workdir, n, flags, eval_out):
        spec = {"flags": [*RL_FLAGS, *flags], "workdir": str(workdir), "init": str(init), "data": str(path),
                "steps": n, "eval": EVAL, "eval_out": str(eval_out)}
        return [sys.executable, str(script), json.dumps(spec)]

    one = start(job(tmp_path / "one", steps, [], tmp_path / "eval_one"), 4, tmp_path / "one")
    rl_cmd = [sys.executable, "-m", "fourd_jax.cli", "rl", "--workdir", str(tmp_path / "two"), "--init", str(init),
              "--data", str(path), "--steps", "1000", *RL_FLAGS]
    procs, logs = pair(lambda flags: [*rl_cmd, *flags], tmp_path, "stop")

    # Meanwhile: the hosts' shares of the first global batch (stream positions 0, 2 and 1, 3) are in
    # different buckets, so the pair must agree on one and keep its prompts left-padded.
    settings = RunSettings.of(load_config("rl", **{"data.seq_buckets": BUCKETS, "data.batch_size": 4}))
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.config import PRESETS

    model_config = config_for_tokenizer(tokenizer, PRESETS["tiny"]())
    first = next(iter(build_dataset(path / "train", tokenizer, model_config,
                                    settings.pipeline(supervised=False, left_pad=True))))
    assert first["stream_position"].tolist() == [0, 1, 2, 3]
    lengths = first["attention_mask"].sum(1)
    buckets = [next(b for b in BUCKETS if b >= max(lengths[host::2])) for host in range(2)]
    assert buckets[0] != buckets[1], (lengths, buckets)

    stopped = preempt_process_1(procs, logs, tmp_path / "two")
    assert 1 <= stopped < steps
    procs, logs = pair(lambda flags: job(tmp_path / "two", steps, flags, tmp_path / "eval_two"), tmp_path, "resume")
    out = [finish(p, log) for p, log in zip(procs, logs, strict=True)]
    assert f"resumed from step {stopped}" in out[0].splitlines()
    finish(one, tmp_path / "one")

    two_rows, one_rows = rows(tmp_path / "two"), rows(tmp_path / "one")
    relative = assert_rows_close(two_rows, one_rows, rtol=1e-5)
    assert all(r["logprob_drift"] <= 1e-5 for r in two_rows)
    difference = max_param_difference(tmp_path / "one", tmp_path / "two")
    rewards = [r["reward"] for r in one_rows]
    print(f"RL: stopped at step {stopped}; rewards {rewards}; largest relative metric difference 1 vs 2 "
          f"processes {relative:.1e}, max |param difference| {difference:.2e}")
    assert difference < 1e-5

    # Eval: one results.json (process 0's), the same as one process's, answers in file order.
    for name in ("results.json", "predictions.jsonl"):
        assert (tmp_path / "eval_two" / name).read_text() == (tmp_path / "eval_one" / name).read_text(), name
    results = json.loads((tmp_path / "eval_two" / "results.json").read_text())
    assert results["micro"]["n"] == EVAL["max_samples"]
    answers = [json.loads(line)["completion"] for line in (tmp_path / "eval_two" / "predictions.jsonl").open()]
    assert len(set(answers)) > len(answers) // 2  # answers that differ by question, so their order shows


SYNTH = """
import json, sys, time
from pathlib import Path
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
job = json.loads(sys.argv[1])
jax.distributed.initialize(job["coordinator"], num_processes=2, process_id=job["id"])
from fourd_jax import study
from fourd_jax.configs import demo
from fourd_jax.data import records

calls = []
real = study.synthesize
def slow_writer(*args, **kwargs):
    calls.append(1)
    time.sleep(4)  # a reader that did not wait would find no manifest, or half the records
    return real(*args, **kwargs)
study.synthesize = slow_writer
config = demo.get_config()
with config.unlocked():
    config.num_scenes, config.frames, config.image_size, config.synth_workers = 3, 4, 56, 1
data, manifest = study.synthesize_data(Path(job["root"]), config)
counts = {split: records.count(data / split) if (data / split).is_dir() else 0 for split in manifest["splits"]}
tokenizer = study.train_tokenizer(Path(job["root"]), data, config)
print(json.dumps({"calls": len(calls), "counts": counts,
                  "manifest": {split: v["records"] for split, v in manifest["splits"].items()},
                  "vocab": len(tokenizer)}))
"""


def test_a_multihost_job_synthesises_once_and_the_others_read_complete_data(tmp_path):
    """Process 0 writes the records (slowly) and the tokenizer; process 1 waits at the barrier and then
    reads every record the manifest lists."""
    import portpicker

    script = tmp_path / "synth.py"
    script.write_text(SYNTH)
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    logs = [tmp_path / f"synth_{i}" for i in range(2)]
    procs = [start([sys.executable, str(script), json.dumps({"coordinator": address, "id": i,
                                                              "root": str(tmp_path / "job")})], 1, log)
             for i, log in enumerate(logs)]
    seen = [json.loads(finish(p, log, timeout=300).strip().splitlines()[-1]) for p, log in zip(procs, logs,
                                                                                             strict=True)]
    assert [s["calls"] for s in seen] == [1, 0]  # one writer
    for s in seen:
        assert s["counts"] == s["manifest"] and sum(s["counts"].values()) > 0
    assert seen[0]["counts"] == seen[1]["counts"] and seen[0]["vocab"] == seen[1]["vocab"]

