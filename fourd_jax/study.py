"""`fourd-jax study`: the ablations the papers left open, on the same data, model and budget per arm.

Arms (the packaged config `study` names them; each is the demo's stage config with one change):
    text_sft        CE only, on traces with the imagery blocks removed        (a)
    dift            CE + latent cosine (the method's first stage)              (b)
    dift_no_latent  imagery blocks kept, latent_weight 0                       (c)
    rl_text         dift, then 4DRL with the policy gradient on text tokens    (d)
    rl_full         dift, then 4DRL with the gradient on latent tokens too     (e)
    blind           dift's training with no video at all                       (f)

Every supervised arm starts from the same reading warm-up when the config has one (config.warmup;
the blind arm from the same warm-up without video), so the arms differ only in the stage they
ablate. Each seed synthesises its own scenes (same count and settings), trains every arm on them and
evaluates every arm on the same held-out questions. The report gives per sub-task, micro and macro
accuracy with 95% intervals over questions, the spread over seeds, and for rl_text against rl_full
the reward curves, the per-step gradient norm's mean and variance, the KL to the reference and the
log-prob drift. It writes W/study.json, W/study.csv and W/study_*.png.

The demo (`fourd_jax.demo`) runs the dift, blind and rl_text arms through the same functions.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, record_texts
from fourd_jax.distributed import is_writer, written_by_one
from fourd_jax.errors import InputError
from fourd_jax.eval import evaluate, report
from fourd_jax.load import load_tokenizer
from fourd_jax.train import dift, rl
from fourd_jax.train.settings import RunSettings

ARMS = ("text_sft", "dift", "dift_no_latent", "rl_text", "rl_full", "blind")
RL_ARMS = {"rl_text": False, "rl_full": True}  # arm -> the policy gradient reaches latent tokens
VIDEO_FREE = ("blind",)


# ----------------------------------------------------------------------------- the shared stages


def synthesize_data(root: Path, config: Any) -> tuple[Path, dict]:
    """Records of `config.num_scenes` scenes into ROOT/data (reused when its manifest matches).

    In a multi-process job process 0 writes them while the others wait at a barrier, then all read
    the same complete records."""
    data = root / "data"
    scene = SceneConfig(num_frames=int(config.frames), image_size=(int(config.image_size),) * 2,
                        max_camera_moves=int(config.max_camera_moves),
                        camera_moves=tuple(config.camera_moves))
    synth = SynthConfig(scene=scene, families=tuple(config.families), subtasks=tuple(config.subtasks),
                        split_fractions=tuple(config.split_fractions),
                        fixed_camera_options=bool(config.fixed_camera_options))
    manifest_path = data / "manifest.json"

    def write() -> None:
        if manifest_path.is_file():  # an earlier run's records: reused only if they are what this config asks for
            manifest = json.loads(manifest_path.read_text())
            wanted = {"num_scenes": int(config.num_scenes), "seed": int(config.seed),
                      "config": json.loads(json.dumps(dataclasses.asdict(synth)))}
            if {key: manifest.get(key) for key in wanted} != wanted:
                raise InputError(f"{data} holds records of another synth config (num_scenes, seed or scene "
                                 "settings differ); use a new --workdir.")
            return
        synthesize(data, int(config.num_scenes), seed=int(config.seed), config=synth,
                   workers=int(config.get("synth_workers", 1)), progress=False)

    written_by_one(write, f"the records {data}")
    return data, json.loads(manifest_path.read_text())


def train_tokenizer(root: Path, data: Path, config: Any) -> Any:
    """The offline BPE (with the latent tokens) trained on the training texts, saved to ROOT/tokenizer
    (by process 0; the others load it once it is written)."""
    def write() -> None:
        tokenizer = build_tokenizer(record_texts(data / "train"), vocab_size=int(config.tokenizer_vocab_size))
        tokenizer.save_pretrained(root / "tokenizer")

    written_by_one(write, f"the tokenizer {root / 'tokenizer'}")
    return load_tokenizer(root / "tokenizer", "tokenizer")


def stage_settings(stage: Any, config: Any, root: Path) -> Any:
    """A copy of a training stage's config pointed at the run's model preset, tokenizer, seed and frames."""
    stage = copy.deepcopy(stage)
    with stage.unlocked():
        stage.model.preset = config.model
        stage.tokenizer = str(root / "tokenizer")
        stage.seed = int(config.seed)
        stage.data.max_frames = int(config.frames)
        # The batch is split over every device (mesh (1, -1, 1)): round it up to a multiple.
        devices = jax.device_count()
        stage.data.batch_size = -(-int(stage.data.batch_size) // devices) * devices
        stage.data.video_max_pixels = stage.data.imagery_max_pixels = int(config.image_size) ** 2
    return stage


def blind_config(stage: Any) -> Any:
    """The blind control of a training stage: the same settings with no visual input at all, so no
    video tokens and no imagery blocks (their targets are made from the video's frames); a trace
    keeps its text."""
    stage = copy.deepcopy(stage)
    with stage.unlocked():
        stage.data.video = False
        if stage.data.assistant == "imagery_trace":
            stage.data.assistant = "text_trace"
    return stage


def starting_from(stage: Any, checkpoint: Path | None) -> Any:
    """A copy of a training stage that starts from `checkpoint` (None: the stage as configured)."""
    if checkpoint is None:
        return stage
    stage = copy.deepcopy(stage)
    with stage.unlocked():
        stage.model.init_from = str(checkpoint)
    return stage


def train_warmup(root: Path, data: Path, config: Any, video: bool = True) -> Path | None:
    """The reading warm-up (config.warmup: letter-only answers, docs/LEARNING.md) into ROOT/warmup, or
    ROOT/warmup_blind without video for the blind control; its checkpoint directory, or None when the
    run has no warm-up (no config.warmup, or 0 steps)."""
    stage = config.get("warmup")
    if stage is None or int(stage.optim.total_steps) == 0:
        return None
    workdir = root / ("warmup" if video else "warmup_blind")
    train_sft(workdir, data, root, config, stage if video else blind_config(stage))
    return workdir / "checkpoints"


def metrics_rows(workdir: Path) -> list[dict]:
    """The rows of a training stage's WORKDIR/metrics.jsonl."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _finished(state: Any, stage: Any, workdir: Path) -> None:
    """A stage stopped early by SIGTERM has saved its checkpoint; stop the whole job there too."""
    step, total = int(jax.device_get(state.step)), int(stage.optim.total_steps)
    if step < total:
        raise Preempted(f"{workdir} stopped at step {step} of {total} (SIGTERM) and saved its checkpoint; run the "
                        "same command again to resume.")


class Preempted(SystemExit):
    """The job was asked to stop (SIGTERM) during a training stage."""


def check_stages(root: Path, config: Any, arms: tuple[str, ...] = ()) -> None:
    """Validate every training stage a run will use (its warm-up and each arm's), so a bad value
    fails in one sentence before the first stage starts."""
    stages = [config.get("warmup"), config.dift, config.rl] + [arm_stage(arm, config) for arm in arms]
    for stage in stages:
        if stage is not None:
            RunSettings.of(stage_settings(stage, config, root))


def train_sft(workdir: Path, data: Path, root: Path, config: Any, stage: Any) -> list[dict]:
    """Train one supervised arm (`fourd-jax dift` with `stage`); its metrics rows."""
    stage = stage_settings(stage, config, root)
    _finished(dift.train(RunSettings.of(stage), workdir, data=str(data), progress=False), stage, workdir)
    return metrics_rows(workdir)


def train_rl(workdir: Path, init: Path, data: Path, root: Path, config: Any, stage: Any) -> list[dict]:
    """Train one 4DRL arm from the checkpoint in `init` (`fourd-jax rl`); its metrics rows."""
    stage = stage_settings(stage, config, root)
    _finished(rl.train(RunSettings.of(stage), workdir, init=str(init), data=str(data), progress=False), stage,
              workdir)
    return metrics_rows(workdir)


def evaluate_arm(arm: Path, data: Path, out: Path, config: Any, video: bool = True) -> dict:
    """Greedy answers of an arm's checkpoint on the test split; the accuracy table."""
    eval_config = evaluate.EvalConfig(batch_size=int(config.eval_batch_size),
                                      max_new_tokens=int(config.eval_max_new_tokens),
                                      seq_buckets=tuple(config.dift.data.seq_buckets), max_frames=int(config.frames),
                                      video_max_pixels=int(config.image_size) ** 2,
                                      latent_size=int(config.dift.data.latent_size), video=video)
    return evaluate.evaluate(arm, data, out, eval_config, progress=False)


def summary(table: dict) -> str:
    """One line: micro accuracy with its interval and n, against chance."""
    micro = table["micro"]
    lo, hi = micro["ci"]
    return (f"micro {micro['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] of {micro['n']} "
            f"(chance {micro['chance']:.1%})")


# ----------------------------------------------------------------------------- the study


def arm_stage(arm: str, config: Any) -> Any:
    """The training stage config of an arm (for RL arms: the 4DRL stage)."""
    if arm in RL_ARMS:
        stage = copy.deepcopy(config.rl)
        with stage.unlocked():
            stage.rl.latent_gradient = RL_ARMS[arm]
        return stage
    stage = copy.deepcopy(config.dift)
    with stage.unlocked():
        if arm == "text_sft":
            stage.data.assistant = "text_trace"
        elif arm == "dift_no_latent":
            stage.loss.latent_weight = 0.0
        elif arm == "blind":
            stage = blind_config(stage)
        elif arm != "dift":
            raise InputError(f"unknown study arm {arm!r}; choose from {ARMS}.")
    return stage


def run_seed(root: Path, config: Any, arms: tuple[str, ...]) -> dict[str, Any]:
    """Every arm on one seed's data: {arm: {"table": accuracy table, "log": metrics rows, "seconds"}}."""
    data, _ = synthesize_data(root, config)
    train_tokenizer(root, data, config)
    done: dict[str, Any] = {}
    # RL arms start from the dift arm, so it trains first.
    order = [a for a in ARMS if a in arms or (a == "dift" and any(r in arms for r in RL_ARMS))]
    # Every supervised arm starts from the same warm-up (the blind arm from its video-free twin).
    warm: dict[bool, Path | None] = {}
    for arm in order:
        start = time.perf_counter()
        stage = arm_stage(arm, config)
        video = arm not in VIDEO_FREE
        if arm in RL_ARMS:
            log = train_rl(root / arm, root / "dift", data, root, config, stage)
        else:
            if video not in warm:
                warm[video] = train_warmup(root, data, config, video)
            log = train_sft(root / arm, data, root, config, starting_from(stage, warm[video]))
        table = evaluate_arm(root / arm, data, root / f"eval_{arm}", config, video=video)
        done[arm] = {"table": table, "log": log, "seconds": round(time.perf_counter() - start, 1)}
        if is_writer():
            print(f"  seed {config.seed} {arm:<15} {summary(table)}  [{done[arm]['seconds']:.0f} s]", flush=True)
    return {arm: done[arm] for arm in arms}


def rl_dynamics(log: list[dict]) -> dict[str, Any]:
    """What an RL arm's metrics say about its updates: reward curve, gradient-norm mean and variance,
    KL to the reference and log-prob drift (max over steps)."""
    grad = np.array([row["grad_norm"] for row in log], np.float64)
    return {
        "reward": [float(row["reward"]) for row in log],
        "grad_norm_mean": float(grad.mean()), "grad_norm_var": float(grad.var()),
        "kl_mean": float(np.mean([row["kl"] for row in log])),
        "logprob_drift_max": float(max(row["logprob_drift"] for row in log)),
    }


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """study.json's content from every seed's arms: per arm, each seed's table (rows with n, accuracy and
    95% interval) and, per sub-task / micro / macro, the mean and standard deviation over seeds."""
    arms = list(seeds[0])
    out: dict[str, Any] = {"arms": {}, "seeds": len(seeds)}
    for arm in arms:
        tables = [s[arm]["table"] for s in seeds]
        rows = sorted(tables[0]["subtasks"]) + ["micro", "macro"]

        def row(table: dict, name: str) -> dict:
            return table[name] if name in ("micro", "macro") else table["subtasks"].get(name)

        spread = {}
        for name in rows:
            accs = [row(t, name)["accuracy"] for t in tables if row(t, name) is not None]
            spread[name] = {"mean": float(np.mean(accs)), "std_over_seeds": float(np.std(accs))}
        # No timings here: the same seed gives a bitwise-identical study.json.
        entry = {"per_seed": [{k: t[k] for k in ("subtasks", "micro", "macro")} for t in tables], "spread": spread}
        if arm in RL_ARMS:
            entry["dynamics"] = [rl_dynamics(s[arm]["log"]) for s in seeds]
        out["arms"][arm] = entry
    return out


def write_report(root: Path, study: dict[str, Any]) -> None:
    """W/study.json, W/study.csv (one row per arm, seed and sub-task) and the PNG plots."""
    (root / "study.json").write_text(json.dumps(study, indent=2, sort_keys=True) + "\n")
    with open(root / "study.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "subtask", "n", "accuracy", "ci_low", "ci_high", "chance"])
        for arm, entry in study["arms"].items():
            for seed, table in enumerate(entry["per_seed"]):
                named = [*table["subtasks"].items(), ("micro", table["micro"]), ("macro", table["macro"])]
                for name, r in named:
                    writer.writerow([arm, seed, name, r.get("n", ""), r["accuracy"], *r["ci"], r["chance"]])
    _plot(root, study)


def _plot(root: Path, study: dict[str, Any]) -> None:
    # matplotlib is heavy and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(study["arms"])
    first = study["arms"][arms[0]]["per_seed"][0]
    names = [*first["subtasks"], "micro"]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 + 1.3 * len(names)), 4.0))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        table = study["arms"][arm]["per_seed"][0]
        rows = [table["subtasks"].get(n) if n != "micro" else table["micro"] for n in names]
        acc = np.array([r["accuracy"] if r else np.nan for r in rows])
        lo = np.array([r["ci"][0] if r else np.nan for r in rows])
        hi = np.array([r["ci"][1] if r else np.nan for r in rows])
        ax.bar(np.arange(len(names)) + (k - (len(arms) - 1) / 2) * width, acc * 100, width, label=arm,
               yerr=np.stack([acc - lo, hi - acc]) * 100, capsize=2)
    ax.axhline(first["micro"]["chance"] * 100, color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_title("fourd-jax study: held-out accuracy per arm (seed 0)", fontsize=10)
    ax.set_ylim(0, 105)  # room above the bars for the legend
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(root / "study_accuracy.png", dpi=120)
    plt.close(fig)

    rl = [a for a in arms if a in RL_ARMS]
    if rl:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for arm in rl:
            for seed, dyn in enumerate(study["arms"][arm]["dynamics"]):
                ax.plot(dyn["reward"], label=f"{arm} seed {seed}", alpha=0.8)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean reward")
        ax.set_title("4DRL reward: text-only vs full-token gradient")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(root / "study_rl_reward.png", dpi=120)
        plt.close(fig)


def run(workdir: str | Path, config: Any, seeds: int = 1, arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    """The whole study: every arm on `seeds` seeds (config.seed, config.seed + 1, ...); writes the report."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise InputError(f"unknown study arms {unknown}; choose from {ARMS}.")
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}.")
    check_stages(Path(workdir), config, arms)
    root = Path(workdir)
    per_seed = []
    for k in range(seeds):
        seed_config = copy.deepcopy(config)
        with seed_config.unlocked():
            seed_config.seed = int(config.seed) + k
        per_seed.append(run_seed(root / f"seed_{k}", seed_config, tuple(arms)))
    study = aggregate(per_seed)
    study["config"] = config.to_dict()
    if not is_writer():  # every process trained and evaluated together; one writes the report
        return study
    write_report(root, study)
    print("\n" + report.compare_table({arm: per_seed[0][arm]["table"] for arm in arms}))
    print(f"\nwrote {root}/study.json, study.csv, study_accuracy.png" + (", study_rl_reward.png"
                                                                      if any(a in RL_ARMS for a in arms) else ""))
    return study
