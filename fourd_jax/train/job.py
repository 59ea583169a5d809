"""The training job both stages run, top to bottom:

    mesh -> data -> tokenizer -> trainer -> batches -> restore -> loop

A stage (DIFT, GRPO) supplies only `make_trainer(settings, tokenizer, mesh) -> Trainer`: its model,
optimizer, state and jitted step. Everything the job writes into the workdir (the tokenizer, the
manifest, checkpoints, metrics) is written here, so a resumed run finds exactly what the first used.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import optax
from etils import epath

from fourd_jax import checkpoint, families, sharding
from fourd_jax.batch import agree_batch_list, check_batch_divides
from fourd_jax.data import records
from fourd_jax.data.latent_tokens import add_latent_tokens
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.errors import InputError
from fourd_jax.files import absolute, as_path, is_remote, upload
from fourd_jax.load import load_model, load_tokenizer
from fourd_jax.model import lora as lora_math
from fourd_jax.model.apply import abstract_params, init_params
from fourd_jax.model.imagery import add_latent_imagery
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train import loop, observe
from fourd_jax.train import lora as train_lora
from fourd_jax.train.checkpoints import Checkpointer
from fourd_jax.train.optim import learning_rate, make_optimizer
from fourd_jax.train.settings import RunSettings
from fourd_jax.train.state import TrainState, abstract_state, new_state, state_shardings


@dataclasses.dataclass
class Trainer:
    """What a stage hands the job: a model, its optimizer and sharded state on a mesh, the step that
    updates them, and how its batches are read, counted and (optionally) validated."""

    model: Qwen25VL
    tx: optax.GradientTransformation
    shardings: TrainState
    state: TrainState
    step_fn: Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Any]]]  # host batch in
    schedule: optax.Schedule
    pipeline: PipelineConfig  # how the training batches are read
    flops_fn: Callable[[dict[str, Any]], float]  # FLOPs of one step on a host batch
    # validation(fixed host batches) -> evaluate(state) -> metrics, or None for a stage without one
    validation: Callable[[list[dict[str, Any]]], Callable[[TrainState], dict[str, float]]] | None = None


def data_directory(settings: RunSettings, data: str | None) -> epath.Path:
    """--data, else data.path: a directory of records with a non-empty train/ split."""
    path = data or settings.data.path
    if not path:
        raise InputError("no training data: pass --data DIR or --config.data.path=DIR (records from fourd-jax "
                         "synth or fourd-jax data import).")
    path = as_path(path)  # a local directory or a URL (gs://...)
    if not (path / "train").is_dir():
        raise InputError(f"data directory {path} has no train/ split (write one with fourd-jax synth).")
    if not records.count(path / "train"):
        raise InputError(f"data directory {path} has an empty train/ split (0 records); synthesise or import "
                         "records into it first.")
    return path


TOKENIZER_INPUTS = "fourd_inputs.json"  # beside a workdir's tokenizer: what it was trained on


def tokenizer(settings: RunSettings, workdir: epath.Path, data_dir: epath.Path, data_digest: dict[str, str]) -> Any:
    """`tokenizer`, else WORKDIR/tokenizer (trained on the data the first time); either way a copy
    ends up in WORKDIR/tokenizer, so the run's checkpoints evaluate and export alone. A tokenizer the
    workdir already holds is reused only if it was made from this run's inputs: the same given
    tokenizer, or the same training records and vocabulary size."""
    saved = workdir / "tokenizer"
    if settings.tokenizer:
        tok = load_tokenizer(settings.tokenizer, "tokenizer")
        add_latent_tokens(tok)
        if not holds_tokenizer(saved):
            save_tokenizer(tok, saved, {"copied_from": str(absolute(settings.tokenizer))})
        elif load_tokenizer(saved, "tokenizer").get_vocab() != tok.get_vocab():
            raise InputError(f"{saved} is not the tokenizer {settings.tokenizer} this run is given (their "
                             "vocabularies differ); use a new --workdir, or pass the tokenizer it was trained with.")
        return tok
    inputs = {"trained_on": sorted(data_digest.values()), "vocab_size": settings.tokenizer_vocab_size}
    if holds_tokenizer(saved):
        recorded = saved / TOKENIZER_INPUTS
        if recorded.is_file() and json.loads(recorded.read_text()) != inputs:
            raise InputError(f"{saved} was trained on other records or with another tokenizer_vocab_size than this "
                             f"run's ({data_dir / 'train'}); use a new --workdir, or the data it was trained on.")
        return load_tokenizer(saved, "tokenizer")
    tok = build_tokenizer(record_texts(data_dir / "train"), vocab_size=settings.tokenizer_vocab_size)
    save_tokenizer(tok, saved, inputs)
    return tok


def holds_tokenizer(saved: epath.Path) -> bool:
    """Whether a workdir's tokenizer was written completely: locally the directory (renamed into place
    whole); remotely its TOKENIZER_INPUTS, which `save_tokenizer` uploads last."""
    return (saved / TOKENIZER_INPUTS).is_file() if is_remote(saved) else saved.exists()


def save_tokenizer(tok: Any, saved: epath.Path, inputs: dict[str, Any]) -> None:
    """Write `tok` and what it was made from to `saved` atomically (process 0): a run cut off here
    leaves no half-written tokenizer to be reused. Remotely, where a directory cannot be renamed into
    place, it is written locally and uploaded with TOKENIZER_INPUTS last (`holds_tokenizer`)."""
    if jax.process_index() != 0:
        return
    if is_remote(saved):
        with tempfile.TemporaryDirectory() as local:
            tok.save_pretrained(local)
            (Path(local) / TOKENIZER_INPUTS).write_text(json.dumps(inputs, indent=1) + "\n")
            upload(local, saved, last=TOKENIZER_INPUTS)
        return
    partial = saved.with_name(f".{saved.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    tok.save_pretrained(partial)
    (partial / TOKENIZER_INPUTS).write_text(json.dumps(inputs, indent=1) + "\n")
    os.replace(partial, saved)


# Settings a resumed run may change: how long it runs, how it checkpoints and reports, where it runs and
# how fast. Any other difference from the run recorded in the workdir's manifest is refused.
RESUMABLE = ("optim.total_steps", "data.path", "data.num_workers", "model.remat_policy", "model.attention_block",
             "train.", "mesh.", "distributed.")


def check_same_config(workdir: epath.Path, settings: RunSettings) -> None:
    """One sentence naming the first setting in which this run differs from the one its workdir
    recorded (outside RESUMABLE); a workdir without a manifest has nothing to compare."""
    manifest = workdir / "manifest.json"
    if not manifest.is_file():
        return
    recorded = _flat(json.loads(manifest.read_text()).get("config", {}))
    current = _flat(json.loads(json.dumps(settings.as_dict(), default=str)))
    for key in sorted(set(recorded) | set(current)):
        if key.startswith(RESUMABLE):  # an exact field or a section prefix
            continue
        if recorded.get(key) != current.get(key):
            raise InputError(f"{workdir} was trained with {key}={recorded.get(key)!r}, not {current.get(key)!r}; "
                             "resume with the same config, or use a new --workdir.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_records(workdir: epath.Path, data_dir: epath.Path, data_digest: dict[str, str]) -> None:
    """One sentence unless a run resuming in `workdir` reads the records its manifest recorded."""
    manifest = workdir / "manifest.json"
    if not manifest.is_file():
        return
    recorded = json.loads(manifest.read_text()).get("data_files")
    if recorded is not None and sorted(recorded.values()) != sorted(data_digest.values()):
        raise InputError(f"{workdir} was trained on other records than {data_dir / 'train'} (the files' SHA-256 "
                         "differ from its manifest.json); resume with the same data, or use a new --workdir.")


def model_and_params(settings: RunSettings, tok: Any, mesh: Any) -> tuple[Qwen25VL, Any]:
    """The model for this tokenizer and its parameters: created from `model.preset`, or loaded from
    `model.init_from` (given the latent tokens when it has none), already sharded."""
    numerics = settings.model.numerics()
    if not settings.model.init_from:
        model = families.preset_model(settings.model.preset, config_transform=lambda c: config_for_tokenizer(tok, c),
                                      **numerics)
        params = init_params(model, jax.random.key(settings.seed), mesh=mesh, rules=settings.rules)
    else:
        loaded = load_model(settings.model.init_from, what="model.init_from", **numerics)
        # A LoRA run's checkpoint starts this run from its adapted model: the adapters folded into the base.
        model, params = loaded.model, lora_math.merge(loaded.params)
        if model.config.latent_token_ids is None:
            model, params = add_latent_imagery(model, params, tok)
        shardings = sharding.param_shardings(abstract_params(model), mesh, settings.rules)
        params = sharding.place(params, shardings)
    if settings.lora.enabled:
        params = train_lora.with_adapters(params, model, settings.lora, settings.optim.freeze, settings.seed, mesh,
                                          settings.rules)
    return model, params


def optimizer_and_state(settings: RunSettings, model: Qwen25VL, params: Any, mesh: Any):
    """(optimizer, state shardings, state at step 0, lr schedule) for `optim`, created sharded."""
    tx = make_optimizer(settings.optim, params)
    shardings = state_shardings(model, tx, mesh, settings.rules, settings.lora)
    with jax.set_mesh(mesh), nn.logical_axis_rules(settings.rules):
        state = jax.jit(lambda p: new_state(p, tx, settings.seed), out_shardings=shardings)(params)
    return tx, shardings, state, learning_rate(settings.optim)


def validation_batches(settings: RunSettings, trainer: Trainer, data_dir: epath.Path, tok: Any) -> list[dict[str, Any]]:
    """The first `train.eval_batches` batches of the val/ split in file order, which every process
    steps through together."""
    config = dataclasses.replace(trainer.pipeline, shuffle=False, num_epochs=1)
    batches = build_dataset(data_dir / "val", tok, trainer.model.config, config)
    return agree_batch_list(list(itertools.islice(batches, settings.train.eval_batches)))


def run(settings: RunSettings, workdir: str | Path, make_trainer: Callable[[RunSettings, Any, Any], Trainer],
        data: str | None = None, steps: int | None = None, progress: bool = True) -> TrainState:
    """Train the stage's `make_trainer` until global step `steps` (default optim.total_steps),
    resuming from the latest checkpoint in `workdir` if there is one."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a whole number >= 1, not {steps!r}.")
    mesh = sharding.make_mesh(settings.mesh_shape)
    check_batch_divides(settings.data.batch_size, mesh)
    if settings.data.packed_rows:
        check_batch_divides(settings.data.packed_rows, mesh, "data.packed_rows")
    data_dir = data_directory(settings, data)
    data_digest = observe.file_digest(records.files(data_dir / "train"))
    workdir = as_path(workdir)  # a local directory or a URL (gs://...)
    check_same_records(workdir, data_dir, data_digest)
    check_same_config(workdir, settings)
    workdir.mkdir(parents=True, exist_ok=True)  # made only once the run's inputs are known to be usable
    tok = tokenizer(settings, workdir, data_dir, data_digest)
    trainer = make_trainer(settings, tok, mesh)
    batches = iter(build_dataset(data_dir / "train", tok, trainer.model.config, trainer.pipeline))

    t = settings.train
    base, lora_base = None, None
    if settings.lora.enabled:  # the frozen base is written once; the checkpoints hold the adapters
        base = train_lora.keep_base(workdir, trainer.model, trainer.state.params,
                                    settings.model.init_from or f"model.preset {settings.model.preset!r}")
        lora_base = train_lora.BASE_DIR
    checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, best_metric=t.best_metric,
                                lora_base=lora_base)
    state = trainer.state
    if checkpointer.latest_step() is not None:  # restored onto this mesh, with the data iterator's position
        target = abstract_state(trainer.shardings, trainer.model, trainer.tx, settings.lora)
        state = checkpointer.restore_newest(target, batches, base)
    observe.write_manifest(workdir, settings.as_dict(), data_dir, data_digest, mesh)
    evaluate = None
    if trainer.validation is not None and t.eval_batches:
        if (data_dir / "val").is_dir() and records.count(data_dir / "val"):
            evaluate = trainer.validation(validation_batches(settings, trainer, data_dir, tok))
        elif jax.process_index() == 0:
            print(f"note: {data_dir} has no val/ records, so this run reports no val_loss.", file=sys.stderr)

    metrics = observe.MetricsWriter(workdir, resume_from_step=int(jax.device_get(state.step)))
    try:
        return loop.run(
            state=state, step_fn=trainer.step_fn, batches=batches, checkpointer=checkpointer, metrics=metrics,
            total_steps=settings.optim.total_steps if steps is None else steps, config=settings.as_dict(),
            model_config=checkpoint.model_item(trainer.model.config), schedule=trainer.schedule,
            flops_fn=trainer.flops_fn, checkpoint_every=t.checkpoint_every, max_nonfinite=t.max_nonfinite,
            peak_flops_per_device=t.peak_flops, best_metric=t.best_metric, evaluate=evaluate, progress=progress)
    finally:
        metrics.close()
        checkpointer.close()

