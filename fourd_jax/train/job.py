"""What a training job assembles from its config before the loop: data, tokenizer, model, params.

Shared by both stages. Every choice is written into the workdir (the tokenizer, the synthesised
data) so a resumed run finds exactly what the first run used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from fourd_jax.data.features import FeatureConfig
from fourd_jax.data.pipeline import PipelineConfig
from fourd_jax.errors import InputError
from fourd_jax.model.config import PRESETS
from fourd_jax.model.vlm import Qwen25VL, abstract_params, init_params
from fourd_jax.train import observe


def data_directory(config: Any, workdir: Path, data: str | None) -> Path:
    """--data, else config.data.path, else records synthesised once into WORKDIR/data."""
    path = data or config.data.path
    if path:
        path = Path(path)
        if not (path / "train").is_dir():
            raise InputError(f"data directory {path} has no train/ split (write one with fourd-jax synth).")
        return path
    path = workdir / "data"
    if not (path / "manifest.json").exists():
        from fourd_jax.data.sim.scene import SceneConfig
        from fourd_jax.data.synth import SynthConfig, synthesize

        size = int(config.data.synth_image_size)
        scene = SceneConfig(num_frames=int(config.data.synth_frames), image_size=(size, size))
        if jax.process_index() == 0:
            synthesize(path, int(config.data.synth_scenes), seed=int(config.seed), config=SynthConfig(scene=scene),
                       progress=False)
    return path


def tokenizer(config: Any, workdir: Path, data_dir: Path) -> Any:
    """config.tokenizer, else WORKDIR/tokenizer (trained on the data the first time); either way a
    copy ends up in WORKDIR/tokenizer."""
    from transformers import AutoTokenizer

    from fourd_jax.data.tokenizer import build_tokenizer, record_texts
    from fourd_jax.model.imagery import add_latent_tokens

    saved = workdir / "tokenizer"  # always kept with the run, so its checkpoints evaluate and export alone
    if config.tokenizer:
        tok = AutoTokenizer.from_pretrained(config.tokenizer)
        add_latent_tokens(tok)
        if jax.process_index() == 0 and not saved.exists():
            tok.save_pretrained(saved)
        return tok
    if not saved.exists():
        tok = build_tokenizer(record_texts(data_dir / "train"), vocab_size=int(config.tokenizer_vocab_size))
        if jax.process_index() == 0:
            tok.save_pretrained(saved)
        return tok
    return AutoTokenizer.from_pretrained(saved)


def sharding_rules(config: Any) -> Any:
    """The run's logical-axis rules: the default table with the config's `mesh.rules` overrides."""
    from fourd_jax import sharding

    return sharding.resolve_rules(tuple(config.mesh.get("rules", ())))


def model_and_params(config: Any, tok: Any, mesh: Any, rules: Any) -> tuple[Qwen25VL, Any]:
    """The model for this tokenizer and its parameters, created or loaded already sharded."""
    from fourd_jax import sharding
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.imagery import add_latent_imagery

    numerics = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                    remat_policy=config.model.remat_policy, attention_block=int(config.model.get("attention_block", 0)))
    source = config.model.init_from
    if not source:
        if config.model.preset not in PRESETS:
            raise InputError(f"model.preset {config.model.preset!r} is not one of {sorted(PRESETS)}.")
        model = Qwen25VL(config_for_tokenizer(tok, PRESETS[config.model.preset](**numerics)))
        return model, init_params(model, jax.random.key(int(config.seed)), mesh=mesh, rules=rules)
    from fourd_jax import checkpoint
    from fourd_jax.convert import hf

    if (Path(source) / "config.json").exists():
        model, params = hf.load(source, dtype=config.model.param_dtype, compute_dtype=config.model.dtype,
                                remat_policy=numerics["remat_policy"], attention_block=numerics["attention_block"])
    else:
        model, params = checkpoint.restore_params(source, **numerics)
    if model.config.latent_token_ids is None:
        model, params = add_latent_imagery(model, params, tok)
    shardings = sharding.param_shardings(abstract_params(model), mesh, rules)
    return model, jax.device_put(params, shardings)


def resolve_checkpoint(path: str | Path | None, what: str = "--checkpoint") -> tuple[str, str]:
    """(params directory, tokenizer directory or "") for a training workdir (its checkpoints/ and
    tokenizer/), an Orbax checkpoint directory, or a Hugging Face directory (its own tokenizer)."""
    source = Path(path or "")
    if not str(path or "") or not source.exists():
        raise InputError(f"{what} {str(path or '') or '(empty)'} does not exist.")
    if (source / "checkpoints").is_dir():
        tokenizer = source / "tokenizer"
        return str(source / "checkpoints"), str(tokenizer) if tokenizer.is_dir() else ""
    if (source / "config.json").exists():
        return str(source), str(source) if (source / "tokenizer_config.json").exists() else ""
    beside = source.parent / "tokenizer"  # WORKDIR/checkpoints -> WORKDIR/tokenizer
    return str(source), str(beside) if beside.is_dir() else ""


def optimizer_and_state(config: Any, model: Qwen25VL, params: Any, mesh: Any, rules: Any):
    """(optimizer, state shardings, state at step 0, lr schedule) for config.optim, created sharded."""
    import flax.linen as nn
    import ml_collections

    from fourd_jax.train.optim import learning_rate, make_optimizer
    from fourd_jax.train.state import new_state, state_shardings

    optim = ml_collections.ConfigDict(dict(config.optim))
    tx = make_optimizer(optim, params)
    shardings = state_shardings(model, tx, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda p: new_state(p, tx, config.seed), out_shardings=shardings)(params)
    return tx, shardings, state, learning_rate(optim)


def checkpointed_state(config: Any, workdir: Path, trainer: Any, batches: Any, data_dir: Path, mesh: Any):
    """(Checkpointer of WORKDIR/checkpoints, the state to start from): the latest checkpoint
    restored onto this mesh (with the data iterator's position) if there is one, else the
    trainer's fresh state. Also writes WORKDIR/manifest.json."""
    from fourd_jax.data import records
    from fourd_jax.train.checkpoints import Checkpointer
    from fourd_jax.train.state import abstract_state

    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                best_metric=config.train.best_metric or None)
    state = trainer.state
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_state(trainer.shardings, trainer.model, trainer.tx), batches)
    observe.write_manifest(workdir, config.to_dict(), records.files(data_dir / "train"), mesh)
    return checkpointer, state


def train_loop(config: Any, workdir: Path, trainer: Any, batches: Any, checkpointer: Any, state: Any,
               flops: Any, steps: int | None, progress: bool, evaluate: Any = None) -> Any:
    """`loop.run` with the run's config (steps, checkpoints, non-finite limit, best metric) and its
    metrics writer; closes the writer and the checkpointer however the loop ends."""
    from fourd_jax.train import loop

    metrics = observe.MetricsWriter(workdir, resume_from_step=int(jax.device_get(state.step)))
    try:
        return loop.run(
            state=state, step_fn=trainer.step_fn, batches=batches, checkpointer=checkpointer, metrics=metrics,
            total_steps=int(steps or config.optim.total_steps), config=config.to_dict(),
            model_config=trainer.model.config.to_dict(), schedule=trainer.schedule, flops_fn=flops,
            checkpoint_every=config.train.checkpoint_every, max_nonfinite=config.train.max_nonfinite,
            peak_flops_per_device=config.train.peak_flops or None, best_metric=config.train.best_metric or None,
            evaluate=evaluate, progress=progress)
    finally:
        metrics.close()
        checkpointer.close()


def pipeline_config(config: Any, supervised: bool = True) -> PipelineConfig:
    d = config.data
    sources = {"in_step": "pixels", "precomputed": "precomputed"}
    if config.loss.imagery_targets not in sources:
        raise InputError(f"loss.imagery_targets must be 'in_step' or 'precomputed', not "
                         f"{config.loss.imagery_targets!r}.")
    features = FeatureConfig(latent_size=int(d.latent_size), max_frames=int(d.max_frames),
                             video_max_pixels=int(d.video_max_pixels), imagery_max_pixels=int(d.imagery_max_pixels),
                             video_max_side=int(d.get("video_max_side", 0)),
                             max_length=max(d.seq_buckets), supervised=supervised,
                             imagery_source=sources[config.loss.imagery_targets],
                             assistant=str(d.get("assistant", "imagery_trace")), video=bool(d.get("video", True)))
    return PipelineConfig(batch_size=int(d.batch_size) // jax.process_count(), seq_buckets=tuple(d.seq_buckets),
                          seed=int(config.seed), num_epochs=None, num_workers=int(d.num_workers),
                          skip_bad_records=bool(d.skip_bad_records), subtasks=tuple(d.get("subtasks", ())),
                          features=features)


def flops_fn(model_config: Any):
    """FLOPs of one training step on a host batch (text forward + backward, frozen vision forward)."""
    def flops(batch: dict[str, Any]) -> float:
        tokens = float(np.sum(batch["attention_mask"])) * jax.process_count()
        patches = float(np.sum(batch["video_valid"]) + np.sum(batch["imagery_valid"])) * jax.process_count()
        seq = batch["input_ids"].shape[1]
        return (tokens * observe.decoder_flops_per_token(model_config, seq)
                + patches * observe.vision_flops_per_patch(model_config))
    return flops

