"""The `fourd-jax` command line: conversion both ways, bad input as one sentence, the demo."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from reference import Row, hf_logits, make_batch

from fourd_jax import checkpoint, cli


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
    assert err == f"fourd-jax convert: error: {tmp_path / 'nowhere'} is not a directory."
    (tmp_path / "empty").mkdir()
    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "empty"), str(tmp_path / "y")]) == 2
    assert "holds no complete Orbax checkpoint" in capsys.readouterr().err


def test_console_script_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "fourd_jax.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("convert", "bench", "demo"):
        assert command in out


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).parents[1])  # configs/ is resolved from the repository root
    assert cli.main(["demo", "--workdir", str(tmp_path), "--config.max_new_tokens=5"]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["config"]["max_new_tokens"] == 5
    assert result["steps"]["JAX -> HF safetensors -> JAX -> Orbax -> JAX"] == "parameters identical bit for bit"
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert cli.main(["demo", "--workdir", str(tmp_path), "--config.model=huge"]) == 2
    assert "config.model 'huge' is not one of" in capsys.readouterr().err
    assert cli.main(["demo", "--workdir", str(tmp_path), "--config.no_such_field=1"]) == 2
    assert "the config has no field 'no_such_field'" in capsys.readouterr().err


def test_launch_scripts_parse_and_refuse_unknown_commands():
    launch = Path(__file__).parents[1] / "launch"
    scripts = sorted(p for p in launch.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} == {"tpu_pod.sh", "gpu_node.sh", "slurm_gpu.sbatch"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(launch / "tpu_pod.sh"), "frobnicate", "n", "z"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_plot_writes_curves_and_refuses_a_non_workdir(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / s, "ce": 2.0 / s, "latent_loss": 0.5, "latent_targets": s % 2,
             "grad_norm": 0.1, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 5_000
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
