"""`fourd-jax demo`: the whole method end to end on a small model, on CPU, beside a blind control.

Synthesise procedural 4D scenes with their questions, train the offline tokenizer on them (with
the latent tokens), train a small Qwen2.5-VL from scratch on a short reading warm-up (camera
questions answered with their letter only), DIFT it from there (`fourd-jax dift`), 4DRL it from
the DIFT checkpoint (`fourd-jax rl`), and train the same model the same way with no video at all
(the blind control: question and options only, its own warm-up included). Evaluate the three on
the held-out test scenes (`fourd-jax eval`), export the final policy to Hugging Face safetensors
(checked to reload bit for bit), and print a table per sub-task: n, chance, blind, dift, rl, each
accuracy with its 95% interval. Writes WORKDIR/results.json in the layout of
`report.merge_stage_results`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fourd_jax import study
from fourd_jax.convert import hf
from fourd_jax.distributed import is_writer
from fourd_jax.errors import InputError
from fourd_jax.eval import report
from fourd_jax.load import load_model
from fourd_jax.model.config import PRESETS
from fourd_jax.train import plot


def first_vs_last(log: list[dict], key: str) -> tuple[float, float]:
    """Mean of a metric over the first and the last quarter of a run's rows that have it."""
    values = [row[key] for row in log if key in row and (key != "latent_loss" or row.get("latent_targets"))]
    if not values:
        return float("nan"), float("nan")
    quarter = max(len(values) // 4, 1)
    return float(np.mean(values[:quarter])), float(np.mean(values[-quarter:]))


def run(workdir: str | Path, config: Any) -> dict:
    """Run the demo with the settings of the packaged `demo` config; write `workdir/results.json`."""
    if config.model not in PRESETS:
        raise InputError(f"config.model {config.model!r} is not one of {sorted(PRESETS)}.")
    workdir = Path(workdir)
    study.check_stages(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def say(step: str, result: str) -> None:
        if is_writer():
            print(f"  {step:<34} {result}  [{time.perf_counter() - start:.0f} s]", flush=True)

    data, manifest = study.synthesize_data(workdir, config)
    counts = {k: v["records"] for k, v in manifest["splits"].items()}
    say("synthesise 4D scenes -> records", f"{config.num_scenes} scenes, records per split {counts}")
    tokenizer = study.train_tokenizer(workdir, data, config)
    say("tokenizer (byte BPE + latent tokens)", f"{len(tokenizer)} tokens")

    tables: dict[str, dict] = {}
    warm = study.train_warmup(workdir, data, config)
    if warm is not None:
        log = study.metrics_rows(warm.parent)
        (ce0, ce1) = first_vs_last(log, "ce")
        say(f"reading warm-up, {len(log)} steps", f"CE {ce0:.2f} -> {ce1:.2f} ({config.warmup.data.assistant} "
            f"turns, {', '.join(config.warmup.data.subtasks) or 'all sub-tasks'})")
    log = study.train_sft(workdir / "dift", data, workdir, config, study.starting_from(config.dift, warm))
    (ce0, ce1), (lat0, lat1) = first_vs_last(log, "ce"), first_vs_last(log, "latent_loss")
    origin = "from the warm-up" if warm else "from scratch"
    say(f"DIFT {origin}, {len(log)} steps", f"CE {ce0:.2f} -> {ce1:.2f}, latent 1-cos {lat0:.3f} -> {lat1:.3f}")
    tables["dift"] = study.evaluate_arm(workdir / "dift", data, workdir / "eval_dift", config)
    say("eval after DIFT (test split)", study.summary(tables["dift"]))

    blind_warm = study.train_warmup(workdir, data, config, video=False)
    log = study.train_sft(workdir / "blind", data, workdir, config,
                          study.starting_from(study.blind_config(config.dift), blind_warm))
    (ce0, ce1) = first_vs_last(log, "ce")
    say(f"blind control, {len(log)} steps", f"CE {ce0:.2f} -> {ce1:.2f} (no video tokens)")
    tables["blind"] = study.evaluate_arm(workdir / "blind", data, workdir / "eval_blind", config, video=False)
    say("eval of the blind control", study.summary(tables["blind"]))

    log = study.train_rl(workdir / "rl", workdir / "dift", data, workdir, config, config.rl)
    r0, r1 = first_vs_last(log, "reward")
    say(f"4DRL (GRPO), {len(log)} steps", f"reward {r0:.3f} -> {r1:.3f}, max log-prob drift "
        f"{max(row['logprob_drift'] for row in log):.1e}")
    tables["rl"] = study.evaluate_arm(workdir / "rl", data, workdir / "eval_rl", config)
    say("eval after 4DRL (test split)", study.summary(tables["rl"]))

    tables = {name: tables[name] for name in ("blind", "dift", "rl")}
    if not is_writer():  # every process trained and evaluated together; process 0 exports and reports
        return report.merge_stage_results(tables)
    policy = load_model(workdir / "rl")
    hf.save(policy.model, policy.params, workdir / "hf", tokenizer=tokenizer)
    reloaded = load_model(workdir / "hf").params
    if not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(policy.params),
                                                   jax.tree_util.tree_leaves(reloaded), strict=True)):
        raise RuntimeError("The Hugging Face export changed the parameters.")
    say("4DRL policy -> HF safetensors", "reloads bit for bit")

    for stage in ("warmup", "warmup_blind", "dift", "blind", "rl"):
        if (workdir / stage / "metrics.jsonl").exists():
            plot.plot_metrics(workdir / stage)
    report.plot_stages(tables, workdir / "accuracy.png")
    results = report.merge_stage_results(tables)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = config.to_dict()
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfourd-jax demo: {results['seconds']:.0f} s on {jax.devices()[0].device_kind}; accuracy on held-out "
          f"synthetic scenes, with 95% intervals; blind = the same model and training with no video\n")
    print(report.compare_table(tables))
    print(f"\nwrote {workdir}/results.json, accuracy.png, */metrics.jsonl and curves, hf/")
    return results
