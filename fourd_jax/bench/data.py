"""`fourd-jax bench data`: renderer frames/s and input-pipeline samples/s with 0, 1, 2 workers.

The renderer runs in this process (numpy, one core in practice) on 224x224 scenes with 6
objects. The pipeline reads freshly synthesised records and measures steady-state samples/s
after the first batch (worker start-up is reported separately); ratios are against the
in-process pipeline (0 workers) measured in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from fourd_jax.bench.report import record as record_row
from fourd_jax.data.features import FeatureConfig
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.data.sim.render import render_scene
from fourd_jax.data.sim.scene import SceneConfig, sample_scene
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.model.config import tiny


def render_fps(num_scenes: int = 6, image_size: int = 224) -> float:
    config = SceneConfig(image_size=(image_size, image_size), min_objects=6, max_objects=6)
    scenes = [sample_scene(seed, config) for seed in range(num_scenes)]
    render_scene(scenes[0])  # warm-up
    start = time.perf_counter()
    frames = sum(render_scene(s).rgb.shape[0] for s in scenes)
    return frames / (time.perf_counter() - start)


def pipeline_rate(path: Path, tokenizer: Any, model_config: Any, workers: int, batches: int,
                  batch_size: int) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch)."""
    config = PipelineConfig(batch_size=batch_size, num_epochs=None, num_workers=workers,
                            features=FeatureConfig(max_frames=16))
    start = time.perf_counter()
    iterator = iter(build_dataset(path, tokenizer, model_config, config))
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start), first


def run(num_scenes: int = 12, batches: int = 12, batch_size: int = 4, record: bool = True) -> dict[str, Any]:
    fps = render_fps()
    print(f"render: {fps:.1f} frames/s at 224x224 with 6 objects ({fps / 20:.2f}x the 20 frames/s target)")
    result: dict[str, Any] = {"render frames/s": round(fps, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(tmp, num_scenes, seed=0, config=SynthConfig(scene=SceneConfig(num_frames=16)), progress=False)
        result["synth s/scene"] = round((time.perf_counter() - start) / num_scenes, 2)
        tokenizer = build_tokenizer(record_texts(Path(tmp) / "train"), vocab_size=1000)
        model_config = config_for_tokenizer(tokenizer, tiny())
        base = None
        for workers in (0, 1, 2):
            rate, first = pipeline_rate(Path(tmp) / "train", tokenizer, model_config, workers, batches, batch_size)
            base = base or rate
            result[f"samples/s ({workers} workers)"] = round(rate, 1)
            result[f"x vs 0 ({workers})"] = round(rate / base, 2)
            result[f"first batch s ({workers})"] = round(first, 1)
            print(f"pipeline, {workers} workers: {rate:.1f} samples/s ({rate / base:.2f}x in-process), "
                  f"first batch after {first:.1f} s")
    if record:
        path = record_row(
            "data",
            "`fourd-jax bench data`: renderer frames/s (224x224, 6 objects, one process) and input-pipeline "
            "samples/s (16 frames of 224 px per sample, 4 per batch, the full decode -> resize -> patchify -> "
            "tokenize -> collate path) with 0, 1 and 2 Grain worker processes, after the first batch.",
            result,
        )
        print(f"recorded in {path}")
    return result
