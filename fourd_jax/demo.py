"""`fourd-jax demo`: the whole method end to end on a tiny model, on CPU.

Synthesise procedural 4D scenes with their questions, train the offline tokenizer on them (with
the latent tokens), DIFT a tiny Qwen2.5-VL from scratch (`fourd-jax dift`), 4DRL it from the DIFT
checkpoint (`fourd-jax rl`), evaluate both on the held-out test scenes (`fourd-jax eval`), and
export the final policy to Hugging Face safetensors (checked to reload bit for bit). Prints a
table per sub-task (chance, after DIFT, after 4DRL, n) and writes WORKDIR/results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fourd_jax import checkpoint
from fourd_jax.convert import hf
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, record_texts
from fourd_jax.errors import InputError
from fourd_jax.eval import evaluate, report
from fourd_jax.model.config import PRESETS
from fourd_jax.train import dift, plot, rl


def stage_settings(stage: Any, config: Any, workdir: Path) -> None:
    """Point a training stage's config at the demo's model preset, tokenizer, seed and frames."""
    with stage.unlocked():
        stage.model.preset = config.model
        stage.tokenizer = str(workdir / "tokenizer")
        stage.seed = config.seed
        stage.data.max_frames = config.frames
        # The batch is split over every device (mesh (1, -1, 1)): round it up to a multiple.
        devices = jax.device_count()
        stage.data.batch_size = -(-stage.data.batch_size // devices) * devices
        stage.data.video_max_pixels = stage.data.imagery_max_pixels = config.image_size ** 2


def first_vs_last(log: list[dict], key: str) -> tuple[float, float]:
    """Mean of a metric over the first and the last quarter of a run's rows that have it."""
    values = [row[key] for row in log if key in row and (key != "latent_loss" or row.get("latent_targets"))]
    quarter = max(len(values) // 4, 1)
    return float(np.mean(values[:quarter])), float(np.mean(values[-quarter:]))


def run(workdir: str | Path, config: Any) -> dict:
    """Run the demo with the settings of `configs/demo.py`; write `workdir/results.json`."""
    if config.model not in PRESETS:
        raise InputError(f"config.model {config.model!r} is not one of {sorted(PRESETS)}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines: list[str] = []

    def say(step: str, result: str) -> None:
        lines.append(f"  {step:<34} {result}  [{time.perf_counter() - start:.0f} s]")
        print(lines[-1], flush=True)

    data = workdir / "data"
    scene = SceneConfig(num_frames=config.frames, image_size=(config.image_size, config.image_size))
    manifest = synthesize(data, config.num_scenes, seed=config.seed,
                          config=SynthConfig(scene=scene, families=tuple(config.families)), progress=False)
    say("synthesise 4D scenes -> records", f"{config.num_scenes} scenes, records per split "
        f"{ {k: v['records'] for k, v in manifest['splits'].items()} }")

    tokenizer = build_tokenizer(record_texts(data / "train"), vocab_size=config.tokenizer_vocab_size)
    tokenizer.save_pretrained(workdir / "tokenizer")
    say("tokenizer (byte BPE + latent tokens)", f"{len(tokenizer)} tokens")

    stage_settings(config.dift, config, workdir)
    dift.train(config.dift, workdir / "dift", data=str(data), progress=False)
    log = [json.loads(line) for line in (workdir / "dift" / "metrics.jsonl").read_text().splitlines()]
    (ce0, ce1), (lat0, lat1) = first_vs_last(log, "ce"), first_vs_last(log, "latent_loss")
    say(f"DIFT from scratch, {len(log)} steps", f"CE {ce0:.2f} -> {ce1:.2f}, latent 1-cos {lat0:.3f} -> {lat1:.3f}")

    eval_config = evaluate.EvalConfig(batch_size=config.eval_batch_size, max_new_tokens=config.eval_max_new_tokens,
                                      seq_buckets=tuple(config.dift.data.seq_buckets), max_frames=config.frames,
                                      video_max_pixels=config.image_size ** 2,
                                      latent_size=int(config.dift.data.latent_size))
    tables = {"dift": evaluate.evaluate(workdir / "dift", data, workdir / "eval_dift", eval_config, progress=False)}
    say("eval after DIFT (test split)", f"micro {tables['dift']['micro']['accuracy']:.1%} "
        f"(chance {tables['dift']['micro']['chance']:.1%})")

    stage_settings(config.rl, config, workdir)
    rl.train(config.rl, workdir / "rl", init=str(workdir / "dift"), data=str(data), progress=False)
    log = [json.loads(line) for line in (workdir / "rl" / "metrics.jsonl").read_text().splitlines()]
    r0, r1 = first_vs_last(log, "reward")
    say(f"4DRL (GRPO), {len(log)} steps", f"reward {r0:.3f} -> {r1:.3f}, max log-prob drift "
        f"{max(row['logprob_drift'] for row in log):.1e}")
    tables["rl"] = evaluate.evaluate(workdir / "rl", data, workdir / "eval_rl", eval_config, progress=False)
    say("eval after 4DRL (test split)", f"micro {tables['rl']['micro']['accuracy']:.1%}")

    model, params = checkpoint.restore_params(workdir / "rl" / "checkpoints")
    hf.save(model, params, workdir / "hf", tokenizer=tokenizer)
    _, reloaded = hf.load(workdir / "hf")
    if not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(reloaded), strict=True)):
        raise RuntimeError("The Hugging Face export changed the parameters.")
    say("4DRL policy -> HF safetensors", "reloads bit for bit")

    for stage in ("dift", "rl"):
        plot.plot_metrics(workdir / stage)
    report.plot_stages(tables, workdir / "accuracy.png")
    results = report.merge_stage_results(tables)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = config.to_dict()
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfourd-jax demo: {results['seconds']:.0f} s on {jax.devices()[0].device_kind}; accuracy on held-out "
          f"synthetic scenes\n")
    print(report.compare_table(tables))
    print(f"\nwrote {workdir}/results.json, accuracy.png, */metrics.jsonl and curves, hf/")
    return results
