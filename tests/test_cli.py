"""The `fourd-jax` command line: conversion both ways, bad input as one sentence, the demo."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from reference import Row, hf_logits, make_batch
from run_configs import run_script

from fourd_jax import checkpoint, cli
from fourd_jax.cli_args import build_parser


def test_convert_hf_to_jax_and_back(reference, tmp_path, capsys):
    _, torch_model, source, model, params = reference
    ckpt, out = tmp_path / "orbax", tmp_path / "hf"
    assert cli.main(["convert", "hf-to-jax", str(source), str(ckpt)]) == 0
    restored_model, restored = checkpoint.restore_params(ckpt)
    assert restored_model.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(out)]) == 0
    from transformers import Qwen2_5_VLForConditionalGeneration

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    batch = make_batch(model.config, [Row([("text", 6), ("image", (1, 4, 4)), ("text", 3)])])
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(torch_model, batch))
    assert "wrote Hugging Face checkpoint" in capsys.readouterr().out


def test_bad_input_is_one_sentence_on_stderr(tmp_path, capsys):
    assert cli.main(["convert", "hf-to-jax", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fourd-jax convert: error: src {tmp_path / 'nowhere'} does not exist."
    (tmp_path / "empty").mkdir()
    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "empty"), str(tmp_path / "y")]) == 2
    assert "holds no complete Orbax checkpoint" in capsys.readouterr().err


def test_console_script_help_lists_the_commands():
    script = Path(sys.executable).with_name("fourd-jax")  # the entry point pip installed beside python
    assert script.exists(), f"{script} is missing: install the package (pip install -e .)"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("convert", "bench", "synth", "data", "dift", "rl", "eval", "plot", "demo", "probe", "study"):
        assert command in out


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the packaged configs are found from any directory
    small = ["--config.num_scenes=10", "--config.split_fractions=(0.5, 0.1, 0.4)",
             "--config.eval_max_new_tokens=12", "--config.dift.optim.total_steps=2",
             "--config.dift.train.checkpoint_every=2", "--config.dift.data.seq_buckets=(1024,)",
             "--config.rl.optim.total_steps=1", "--config.rl.sample.max_new_tokens=12",
             "--config.rl.data.seq_buckets=(1024,)", "--config.warmup.optim.total_steps=2",
             "--config.warmup.train.checkpoint_every=2"]
    assert cli.main(["demo", "--workdir", str(tmp_path), *small]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result) >= {"subtasks", "micro", "macro"}
    stages = ("blind", "dift", "rl")
    n = 0
    for name, row in [*result["subtasks"].items(), ("micro", result["micro"])]:
        assert set(row) >= {"n", "chance", *stages, "ci"} and row["chance"] == 0.25, name
        assert set(row["ci"]) == set(stages), name
        for stage in stages:  # accuracies as fractions, each inside its own 95% interval
            lo, hi = row["ci"][stage]
            assert 0.0 <= lo <= row[stage] <= hi <= 1.0, (name, stage)
        if name != "micro":
            n += row["n"]
    assert n == result["micro"]["n"] > 0
    for stage in stages:  # every held-out question answered by every stage, the blind one without video
        predictions = (tmp_path / f"eval_{stage}" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == n, stage
        micro = json.loads((tmp_path / f"eval_{stage}" / "results.json").read_text())["micro"]
        assert result["micro"][stage] == micro["accuracy"] == micro["correct"] / n
    configs = {stage: json.loads((tmp_path / stage / "manifest.json").read_text())["config"]
               for stage in ("warmup", "warmup_blind", "dift", "blind")}
    assert configs["blind"]["data"]["video"] is False and configs["warmup_blind"]["data"]["video"] is False
    # DIFT starts from the letter-only camera warm-up, the blind control from its video-free twin.
    for stage in ("warmup", "warmup_blind"):
        assert configs[stage]["data"]["assistant"] == "answer"
        assert configs[stage]["data"]["subtasks"] == ["camera_motion"]
        assert json.loads((tmp_path / stage / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert configs["dift"]["model"]["init_from"] == str(tmp_path / "warmup" / "checkpoints")
    assert configs["blind"]["model"]["init_from"] == str(tmp_path / "warmup_blind" / "checkpoints")
    assert json.loads((tmp_path / "dift" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert json.loads((tmp_path / "blind" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])["logprob_drift"] <= 1e-4
    out = capsys.readouterr().out
    assert "blind" in out and "dift" in out and "rl" in out and "micro" in out
    for path in ("accuracy.png", "dift/curves.png", "rl/curves.png", "hf/config.json", "tokenizer/tokenizer.json"):
        assert (tmp_path / path).exists(), path

    # The eval command on the same run, and its one-sentence refusals.
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "dift"), "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "ev"), "--max-new-tokens", "4", "--max-frames", "8",
                     "--max-pixels", str(112 * 112), "--max-samples", "1"]) == 0
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert again["micro"]["n"] == 1 and (tmp_path / "ev" / "results.csv").exists()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "ev")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "dift"), "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "ev"), "--tokenizer", str(tmp_path / "ev")]) == 2

    assert cli.main(["demo", "--workdir", str(tmp_path), "--config.model=huge"]) == 2
    assert "config.model 'huge' is not one of" in capsys.readouterr().err
    assert cli.main(["demo", "--workdir", str(tmp_path), "--config.no_such_field=1"]) == 2
    assert "the config has no field 'no_such_field'" in capsys.readouterr().err


def launch(script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands `launch/SCRIPT --print-only ARGS` would run, each as its argv."""
    path = Path(__file__).parents[1] / "launch" / script
    out = subprocess.run(["bash", str(path), "--print-only", *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_launch_scripts_build_their_commands():
    launch_dir = Path(__file__).parents[1] / "launch"
    scripts = sorted(p for p in launch_dir.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} == {"tpu_pod.sh", "gpu_node.sh", "slurm_gpu.sbatch"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(launch_dir / "tpu_pod.sh"), "frobnicate", "n", "z"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr

    # A pod run compiles the job's program for the slice on worker 0 first, then starts every worker.
    job = ["dift", "--config", "dift:qwen25vl_7b,v5p-64", "--data", "gs://bkt/data", "--config.optim.lr=2e-5"]
    compile_cmd, run_cmd = launch("tpu_pod.sh", "run", "my-run", "us-east5-a", "gs://bkt/runs/7b", "--", *job,
                                  ACCELERATOR="v5p-64")
    assert compile_cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=0" in compile_cmd
    remote = shlex.split(compile_cmd[compile_cmd.index("--command") + 1])
    assert remote[:3] == ["cd", "~/fourd_jax", "&&"]
    assert remote[3:] == [".venv/bin/fourd-jax", "compile", "--stage", "dift", "--topology", "v5p-64", "--config",
                          "dift:qwen25vl_7b,v5p-64", "--config.optim.lr=2e-5"]
    assert "--worker=all" in run_cmd
    remote = shlex.split(run_cmd[run_cmd.index("--command") + 1])
    assert remote[4:5 + len(job)] == [".venv/bin/fourd-jax", *job]
    assert remote[5 + len(job):7 + len(job)] == ["--workdir", "gs://bkt/runs/7b"]
    # Each generation gets its own TPU VM image.
    for accel, version in (("v5p-8", "v2-alpha-tpuv5"), ("v5e-16", "v2-alpha-tpuv5-lite"),
                           ("v6e-8", "v2-alpha-tpuv6e")):
        (create,) = launch("tpu_pod.sh", "create", "n", "z", accel)
        assert create[create.index("--accelerator-type") + 1] == accel and create[-1] == version

    (srun,) = launch("slurm_gpu.sbatch", "/shared/runs/7b", "dift", "--config", "dift:qwen25vl_7b,16xh100")
    assert srun == ["srun", "--kill-on-bad-exit=1", ".venv-gpu/bin/fourd-jax", "dift", "--config",
                    "dift:qwen25vl_7b,16xh100", "--workdir", "/shared/runs/7b"]
    assert launch("gpu_node.sh", "runs/7b", "dift", "--config", "dift:tiny")[-1] == [
        ".venv-gpu/bin/fourd-jax", "dift", "--config", "dift:tiny", "--workdir", "runs/7b"]


def test_gpu_bench_scripts_parse():
    """docs/gpu_bench.sh (issue 14's GPU run) and the wheels it installs: valid bash, and every bench they run
    takes the flags they pass (the benches themselves run at the tiny size in test_bench_roofline)."""
    docs = Path(__file__).parents[1] / "docs"
    for script in ("gpu_bench.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(docs / script)], check=True)
    text = (docs / "gpu_bench.sh").read_text()
    parser = build_parser()
    benches = [line for line in text.splitlines() if line.startswith("bench ")]
    assert [shlex.split(line)[2] for line in benches] == ["train", "sample", "sample"]
    for line in benches:
        args = shlex.split(line.replace('"$SIZE"', "1b").replace('"$EXAMPLES"', "16"))[2:]
        parsed = parser.parse_args(["bench", *args])
        assert parsed.size == "1b" and parsed.dtype == "bfloat16"


def test_plot_writes_curves_and_refuses_a_non_workdir(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / s, "ce": 2.0 / s, "latent_loss": 0.5, "latent_targets": s % 2,
             "grad_norm": 0.1, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 6)]
    rows[-1]["val_loss"] = 0.7  # one validation point
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_script(["plot", tmp_path])
    assert result.returncode == 0 and f"wrote {tmp_path / 'curves.png'}" in result.stdout
    assert (tmp_path / "curves.png").stat().st_size > 5_000
    # The same run without its one val_loss point draws a different picture: the point is on it.
    without = tmp_path / "without_val"
    without.mkdir()
    (without / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val_loss"}) + "\n"
                                                   for r in rows))
    assert run_script(["plot", without]).returncode == 0
    assert (without / "curves.png").read_bytes() != (tmp_path / "curves.png").read_bytes()
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    # A run validated once has one val_loss point: it is drawn, marked.
    from fourd_jax.train.plot import panel_series

    losses = {key: (points, marker) for key, points, marker in panel_series(rows)[0]}
    assert losses["val_loss"] == ([(5, 0.7)], "o")
    assert [p[0] for p in losses["latent_loss"][0]] == [1, 3, 5] and losses["loss"][1] is None
