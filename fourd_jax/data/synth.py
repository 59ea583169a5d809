"""`fourd-jax synth`: render procedural scenes and write their questions as 4D records.

Scene i of a run with seed S gets its own seed from (S, i), so every scene, and every shard file
built from scenes, depends only on S, the config and the scene indices: the same seed gives
byte-identical files whatever the number of worker processes. Scenes are split into
train / val / test by index blocks; each split is written in shards of `scenes_per_shard`
scenes, one ArrayRecord file each, and a `manifest.json` summarises the run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from tqdm import tqdm

from fourd_jax.data import records
from fourd_jax.data.qa.common import QA
from fourd_jax.data.qa.dsr import MIN_SCENE_FRAMES, dsr_questions
from fourd_jax.data.qa.fourdthinker import fourdthinker_questions
from fourd_jax.data.qa.mllm4d import mllm4d_questions
from fourd_jax.data.sim.render import bounding_boxes, overlay_mask, render_scene
from fourd_jax.data.sim.scene import Scene, SceneConfig, sample_scene
from fourd_jax.data.taxonomy import DSR_SUBTASKS, FOURDTHINKER_SUBTASKS, MLLM4D_SUBTASKS
from fourd_jax.errors import InputError
from fourd_jax.files import as_path, write_text_atomic

FAMILIES = {"dsr": dsr_questions, "4dthinker": fourdthinker_questions, "mllm4d": mllm4d_questions}
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    scene: SceneConfig = SceneConfig()
    families: tuple[str, ...] = ("dsr", "4dthinker", "mllm4d")
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
    scenes_per_shard: int = 25
    # Sub-tasks kept (e.g. ("camera_motion", "object_direction")); () keeps every one. Questions are
    # drawn as usual and the others dropped, so the kept ones are those of the full mix.
    subtasks: tuple[str, ...] = ()
    # 4DThinker camera questions offer the scene's four camera moves in a fixed order (needs
    # scene.camera_moves of four moves and scene.max_camera_moves 1); see camera_question.
    fixed_camera_options: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise InputError(f"unknown question families {unknown}; choose from {sorted(FAMILIES)}.")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise InputError(f"split_fractions {self.split_fractions} must be non-negative and sum to 1.")
        known = {"4dthinker": FOURDTHINKER_SUBTASKS, "dsr": DSR_SUBTASKS, "mllm4d": MLLM4D_SUBTASKS}
        offered = {name for family in self.families for name in known[family]}
        if set(self.subtasks) - offered:
            raise InputError(f"subtasks {sorted(set(self.subtasks) - offered)} are not asked by the families "
                             f"{list(self.families)}; choose from {sorted(offered)}.")
        if self.fixed_camera_options and (len(self.scene.camera_moves) != 4 or self.scene.max_camera_moves != 1):
            raise InputError(f"fixed_camera_options needs scene.camera_moves of four moves and scene.max_camera_moves "
                             f"1, not {list(self.scene.camera_moves)} and {self.scene.max_camera_moves}.")
        if "dsr" in self.families and self.scene.num_frames < MIN_SCENE_FRAMES:
            raise InputError(f"DSR questions need at least {MIN_SCENE_FRAMES} frames per scene, not "
                             f"{self.scene.num_frames} (raise --frames or leave out the dsr family).")


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene `index` in a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def split_sizes(num_scenes: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Scenes per split (index blocks in train, val, test order); rounding goes to train."""
    val, test = (int(round(num_scenes * f)) for f in fractions[1:])
    return {"train": num_scenes - val - test, "val": val, "test": test}


def scene_questions(scene: Scene, boxes: np.ndarray, config: SynthConfig, seed: int) -> list[QA]:
    """All questions of the chosen families; each family draws from its own random stream."""
    out: list[QA] = []
    for k, family in enumerate(sorted(config.families)):
        rng = np.random.default_rng([seed, k])
        if family == "4dthinker":
            out += fourdthinker_questions(scene, boxes, rng, config.scene.camera_moves, config.fixed_camera_options)
        else:
            out += FAMILIES[family](scene, boxes, rng)
    return out


def scene_records(index: int, seed: int, config: SynthConfig, split: str) -> Iterator[dict[str, Any]]:
    """Render one scene and turn each of its questions into a record."""
    sseed = scene_seed(seed, index)
    scene = sample_scene(sseed, config.scene)
    rendered = render_scene(scene)
    boxes = bounding_boxes(rendered.instance, len(scene.objects))
    frames = [records.encode_image(f) for f in rendered.rgb]  # encoded once, shared by the records
    shared = {
        "source": "sim", "fps": scene.fps, "timestamps": scene.timestamps, "frames": frames,
        "intrinsics": scene.intrinsics, "cam_to_world": scene.cam_to_world,
        "object_ids": [o.object_id for o in scene.objects],
        "object_categories": [o.category for o in scene.objects],
        "object_names": [o.name for o in scene.objects],
        "object_centers": scene.centers, "object_headings": scene.headings,
        "scene_seed": sseed, "camera_moves": [list(m) for m in scene.camera_moves],
    }
    questions = scene_questions(scene, boxes, config, sseed)
    for k, qa in enumerate(questions):
        if config.subtasks and qa.subtask not in config.subtasks:
            continue
        imagery = [overlay_mask(rendered.rgb[t], rendered.instance[t] == obj + 1) for t, obj in qa.imagery]
        yield {
            **shared,
            "sample_id": f"sim-{seed}-{index:06d}-{k:02d}-{qa.family}-{qa.subtask}",
            "family": qa.family, "subtask": qa.subtask, "question": qa.question, "options": list(qa.options),
            "answer": qa.answer, "trace": qa.trace, "imagery": imagery, "shown_frames": list(qa.shown_frames),
            "target_objects": list(qa.target_objects),
            "meta": {"split": split, "scene_index": index, "motions": [o.motion for o in scene.objects],
                     "imagery_sources": [[int(t), int(obj)] for t, obj in qa.imagery], **qa.meta},
        }


def _write_shard(job: tuple[epath.Path, str, list[int], int, SynthConfig]) -> tuple[str, Counter]:
    path, split, indices, seed, config = job
    counts: Counter = Counter()

    def samples():
        for index in indices:
            for record in scene_records(index, seed, config, split):
                counts[(record["family"], record["subtask"], record["answer"])] += 1
                yield record

    records.write(path, samples())
    return split, counts


def synthesize(out_dir: str | Path, num_scenes: int, seed: int = 0, config: SynthConfig = SynthConfig(),
               workers: int = 1, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write `num_scenes` scenes' records under out_dir/{train,val,test}/ and a manifest.

    `out_dir` must be new or empty, so that no shard of an earlier run sits beside the new ones;
    `overwrite` first clears an earlier synth output there (and nothing else)."""
    if num_scenes < 1:
        raise InputError(f"--num-scenes must be at least 1, got {num_scenes}.")
    out = as_path(out_dir)  # a local directory or a URL (gs://...): each shard is uploaded when written
    prepare_output(out, overwrite)
    sizes = split_sizes(num_scenes, config.split_fractions)
    jobs, start = [], 0
    for split in SPLITS:
        indices = list(range(start, start + sizes[split]))
        start += sizes[split]
        shards = [indices[i:i + config.scenes_per_shard] for i in range(0, len(indices), config.scenes_per_shard)]
        for k, shard in enumerate(shards):
            jobs.append((out / split / f"{split}-{k:05d}-of-{len(shards):05d}{records.SUFFIX}", split, shard, seed,
                         config))
    totals: dict[str, Counter] = {split: Counter() for split in SPLITS}
    bar = tqdm(total=len(jobs), desc="synth shards", unit="shard", disable=not progress)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for split, counts in pool.imap_unordered(_write_shard, jobs):
                totals[split].update(counts)
                bar.update()
    else:
        for job in jobs:
            split, counts = _write_shard(job)
            totals[split].update(counts)
            bar.update()
    bar.close()
    manifest = _manifest(num_scenes, seed, config, sizes, totals)
    # the manifest appears whole, and last: it marks a complete output
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for split in SPLITS:
        if not sizes[split]:
            print(f"synth: warning: the {split} split of {out} is empty ({num_scenes} scenes split "
                  f"{config.split_fractions}); use more scenes for a {split} split.", file=sys.stderr)
    return manifest


def prepare_output(out: epath.Path, overwrite: bool) -> None:
    """Refuse an output that is a file or a non-empty directory; with `overwrite`, clear an earlier
    synth output (only its splits and manifest: anything else there is refused, not deleted)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; synth writes a directory of splits.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"--out {out} is not empty; choose a new directory, or pass --overwrite to replace an "
                         "earlier synth output there.")
    ours = {*SPLITS, "manifest.json"}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others or not (out / "manifest.json").is_file():
        raise InputError(f"--out {out} holds more than a synth output ({', '.join(others) or 'no manifest.json'}); "
                         "--overwrite clears only an earlier synth output.")
    for name in ours:
        path = out / name
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()


def _manifest(num_scenes, seed, config, sizes, totals) -> dict[str, Any]:
    splits = {}
    for split, counts in totals.items():
        per_task: Counter = Counter()
        letters: Counter = Counter()
        for (family, subtask, answer), n in counts.items():
            per_task[f"{family}/{subtask}"] += n
            letters[answer] += n
        splits[split] = {"scenes": sizes[split], "records": sum(counts.values()),
                         "per_subtask": dict(sorted(per_task.items())), "answer_letters": dict(sorted(letters.items()))}
    return {"schema_version": records.SCHEMA_VERSION, "seed": seed, "num_scenes": num_scenes,
            "config": dataclasses.asdict(config), "splits": splits}
