"""Make docs/SCALE.md from real ahead-of-time compiles (`fourd_jax.aot`) on this host.

    .venv/bin/python docs/scale_table.py compile [--only 7b]   # appends to docs/scale_runs.jsonl, skips done rows
    .venv/bin/python docs/scale_table.py redo rl:v5e-16 ...    # compiles those rows again, replacing them
    .venv/bin/python docs/scale_table.py render > docs/SCALE.md

Each (model, stage, slice) is compiled with the mesh preset of the slice (fourd_jax/configs/dift.py
MESHES; for RL fourd_jax/configs/rl.py MESHES) and the recipe's global batch raised to a multiple of
data x fsdp.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the topology compile needs no TPU backend

RUNS = Path(__file__).with_name("scale_runs.jsonl")
MODELS = ("qwen25vl_7b", "qwen25vl_3b")
STAGES = ("dift", "rl")
SLICES = ("v5p-8", "v6e-8", "v5e-16", "v5p-32", "v5p-64", "v6e-64", "v5e-64", "v5p-128", "v6e-256", "v5e-256")
FIRST = ("v5e-16", "v5e-64", "v5e-256")  # the slices whose presets changed: compiled first


def settings_for(model: str, stage: str, tpu: str):
    """The run's settings as `--config STAGE:MODEL,TPU` gives them, with the global batch raised to
    one sequence (DIFT) or prompt (RL) per data-parallel group."""
    from fourd_jax.configs import dift, rl
    from fourd_jax.train.settings import RunSettings

    config = (dift if stage == "dift" else rl).get_config(f"{model},{tpu}")
    ways = config.mesh.shape[0] * config.mesh.shape[1]
    config.data.batch_size = -(-config.data.batch_size // ways) * ways
    return RunSettings.of(config)


def compile_one(model: str, stage: str, tpu: str) -> dict:
    from fourd_jax import aot
    from fourd_jax.errors import InputError

    settings = settings_for(model, stage, tpu)
    mesh = settings.mesh_shape
    began = time.time()
    try:
        row = {**aot.compile_stage(settings, stage, tpu).as_dict(0.4), "error": ""}
    except InputError as e:
        row = {"error": str(e), "mesh_shape": list(mesh)}
    return {**row, "model": model, "stage": stage, "topology": tpu, "micro_batches": settings.optim.grad_accum,
            "compile_seconds": round(time.time() - began, 1)}


def compile_all(only: str = "") -> None:
    done = set()
    if RUNS.exists():
        done = {(r["model"], r["stage"], r["topology"]) for r in map(json.loads, RUNS.read_text().splitlines())}
    for model in MODELS:
        for stage in STAGES:
            for tpu in sorted(SLICES, key=lambda t: t not in FIRST):
                if (model, stage, tpu) in done or only not in model:
                    continue
                row = compile_one(model, stage, tpu)
                with RUNS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(model, stage, tpu, row.get("fits"), row["compile_seconds"], row.get("error", "")[:120],
                      flush=True)


def micro(row: dict) -> str:
    k = row.get("micro_batches", 1)
    return f" in {k} micro-batches" if k > 1 else ""


def render() -> str:
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()] if RUNS.exists() else []
    gib = 1024**3
    out = ["| model | stage | slice | chips | mesh (data, fsdp, tensor) | global batch x tokens | peak HBM / chip "
           "| fits | params + opt / chip | replicated | model TFLOPs / step | step at 40% MFU | compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {(m, s, t): i for i, (s, t, m) in enumerate((s, t, m) for s in STAGES for t in SLICES for m in MODELS)}
    for r in sorted(rows, key=lambda r: order.get((r["model"], r["stage"], r["topology"]), 1 << 30)):
        name = r["model"].replace("qwen25vl_", "")
        if r.get("error"):
            out.append(f"| {name} | {r['stage']} | {r['topology']} | | {tuple(r['mesh_shape'])} | | | no: "
                       f"{r['error'][:160]} | | | | | {r['compile_seconds']:.0f} s |")
            continue
        out.append(
            f"| {name} | {r['stage']} | {r['topology']} | {r['devices']} | {tuple(r['mesh_shape'])} "
            f"| {r['global_batch']} x {r['seq_len']}{micro(r)} "
            f"| {r['peak_bytes'] / gib:.1f} / {r['hbm_bytes'] / gib:.0f} GiB "
            f"| {'yes' if r['fits'] else 'no'} | {r['state_bytes'] / gib:.1f} GiB | {r['replicated_fraction']:.2%} "
            f"| {r['model_flops'] / 1e12:.0f} | {r['step_seconds']:.1f} s | {r['compile_seconds']:.0f} s |")
    return "\n".join(out)


def redo(keys: list[str]) -> None:
    """Compile the rows STAGE:SLICE again for both models (e.g. after a change to the step), replacing
    their earlier lines."""
    for key in keys:
        stage, tpu = key.split(":")
        for model in MODELS:
            row = compile_one(model, stage, tpu)
            kept = [line for line in RUNS.read_text().splitlines()
                    if (lambda r: (r["model"], r["stage"], r["topology"]) != (model, stage, tpu))(json.loads(line))]
            RUNS.write_text("\n".join([*kept, json.dumps(row)]) + "\n")
            print(model, stage, tpu, row.get("fits"), row["compile_seconds"], row.get("error", "")[:120], flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["redo"]:
        redo(sys.argv[2:])
    elif sys.argv[1:2] == ["compile"]:
        compile_all(sys.argv[3] if sys.argv[2:3] == ["--only"] else "")
    else:
        print(render())
