"""Orbax checkpoints of model parameters, laid out so training checkpoints extend them.

A checkpoint directory is an `ocp.CheckpointManager` root; each step holds named items:
`params` (the parameter pytree) and `model` (the config as JSON, with its family's name). Training adds its own
items (optimizer state, data iterator, ...) beside these, so `fourd-jax convert jax-to-hf` can
export any of them by restoring only these two.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from fourd_jax import families
from fourd_jax.errors import InputError, first_line, root_cause
from fourd_jax.files import absolute
from fourd_jax.model import lora
from fourd_jax.model.apply import abstract_params

PARAMS_ITEM = "params"
MODEL_ITEM = "model"
FAMILY_KEY = "family"  # in the model item, beside the config's fields
# In the model item of a LoRA run's step: the sibling directory (of the checkpoint root) that holds the
# frozen base once, as a `save_params` checkpoint; the step's params item then holds only the adapters.
LORA_BASE_KEY = "lora_base"


class CheckpointNotFound(InputError, FileNotFoundError):
    """A directory with no restorable checkpoint."""


def save_params(directory: str | os.PathLike, model: Any, params: Any, step: int = 0) -> epath.Path:
    """Write params and the model config as checkpoint `step` under `directory` (atomically)."""
    directory = absolute(directory)  # a local path made absolute, or a URL (gs://...)
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            MODEL_ITEM: ocp.args.JsonSave(model_item(model.config)),
        }))
        manager.wait_until_finished()
    return directory


def model_item(config: Any) -> dict[str, Any]:
    """The `model` item of a checkpoint: the config as JSON, with the name of its family
    (`fourd_jax.families`), so that a restore builds the right module."""
    return {FAMILY_KEY: families.family_of(config).name, **config.to_dict()}


ABANDONED_READS_SETTLE_S = 1.0


@contextlib.contextmanager
def stderr_kept_on_success():
    """Hold what is written to file descriptor 2 while a checkpoint is read: shown if the read
    succeeds, dropped if it fails (then `unreadable` reports the failure in one line). Orbax reads
    arrays concurrently, and the reads a failure abandons print tracebacks from tensorstore's threads."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed:  # let the abandoned reads finish (and print) while their output is still held
                time.sleep(ABANDONED_READS_SETTLE_S)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def unreadable(error: BaseException) -> str:
    """One line on a checkpoint read that failed: tensorstore's own message (the tensor and file).

    Orbax reads a step's arrays concurrently; when one read fails, the others fail too and surface
    later, as "Exception ignored" and "Task exception was never retrieved" tracebacks that repeat
    the same damage. Those are dropped from then on, since this line has reported it."""
    _drop_abandoned_reads()
    return first_line(error, root=True)


_ABANDONED = ("Encountered error while reading array index", "Error reading ")


def _abandoned(exc: BaseException | None) -> bool:
    return exc is not None and any(m in str(root_cause(exc)) or m in str(exc) for m in _ABANDONED)


def _drop_abandoned_reads() -> None:
    if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _abandoned(unraisable.exc_value):
            previous(unraisable)
    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook

    class AbandonedReads(logging.Filter):  # asyncio logs an unretrieved task exception with its exc_info
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and _abandoned(record.exc_info[1]))
    logging.getLogger("asyncio").addFilter(AbandonedReads())


def latest_step(directory: str | os.PathLike) -> int:
    """The newest complete step in a checkpoint directory, or one clear error."""
    directory = absolute(directory)  # a local path made absolute, or a URL (gs://...)
    if not directory.is_dir():
        raise CheckpointNotFound(f"{directory} is not a directory.")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
    if step is None:
        raise CheckpointNotFound(f"{directory} holds no complete Orbax checkpoint.")
    return step


def _with_saved_adapters(abstract: Any, directory: epath.Path, step: int, where: Any) -> Any:
    """The restore target plus the LoRA adapter leaves the saved params hold (a LoRA run's
    checkpoint: `fourd_jax.model.lora`), read from the checkpoint's metadata.

    Reading that metadata reads every array's header, so a damaged step fails here first; it is
    reported as the restore would report it, in one sentence."""
    try:
        with stderr_kept_on_success(), warnings.catch_warnings():
            # A failed read leaves Orbax's other metadata reads unawaited; collected here, quietly.
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / PARAMS_ITEM)
            finally:
                gc.collect()
    except Exception as e:  # noqa: BLE001 - Orbax and tensorstore report damage in many types
        raise CheckpointNotFound(f"{directory} step {step} does not restore ({unreadable(e)}).") from None
    flat = traverse_util.flatten_dict(dict(saved), sep="/")
    adapters = {path: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=where)
                for path, m in flat.items() if lora.is_adapter(path)}
    if not adapters:
        return abstract
    return lora.join(abstract, traverse_util.unflatten_dict(adapters, sep="/"))


def restore_params(
    directory: str | os.PathLike, step: int | None = None, shardings: Any = None, **config_overrides
) -> tuple[Any, Any]:
    """(model, params) from checkpoint `step` (default: the latest).

    `shardings` (a pytree of Shardings like params) restores straight onto a mesh, which may
    differ from the one that saved. The model is built by the family the checkpoint names (the
    default family, `fourd_jax.families.DEFAULT`, for checkpoints that name none). A LoRA run's
    step holds only its adapters; they come back on the frozen base its model item names.
    """
    directory = absolute(directory)  # a local path made absolute, or a URL (gs://...)
    step = latest_step(directory) if step is None else step
    with ocp.CheckpointManager(directory) as manager:
        if step not in manager.all_steps():
            raise CheckpointNotFound(f"{directory} has no step {step} (it has {manager.all_steps()}).")
        try:
            meta = manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 - a missing or damaged model item
            raise CheckpointNotFound(f"{directory} step {step} does not restore ({unreadable(e)}).") from None
        fields = dict(meta[MODEL_ITEM])
        name = fields.pop(FAMILY_KEY, families.DEFAULT.name)  # checkpoints written before families: the default
        base_name = fields.pop(LORA_BASE_KEY, None)
        family = families.FAMILIES.get(name)
        if family is None:
            raise InputError(f"{directory} step {step} holds a model of family {name!r}, which is not one of "
                             f"{sorted(families.FAMILIES)}.")
        config = family.config_type().from_dict(fields)
        if config_overrides:
            config = config.replace(**config_overrides)
        model = family.module_type()(config)
        # Without shardings, each process reads whole arrays onto its own first device (the saved
        # shardings name the saving run's devices, which another process does not have).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {} if base_name else jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
            nn.meta.unbox(abstract_params(model)),
        )
        abstract = _with_saved_adapters(abstract, directory, step, local)
        base_shardings = None
        if shardings is not None:
            if base_name:
                base_shardings, adapter_shardings = lora.split(shardings)
                shardings = traverse_util.unflatten_dict(adapter_shardings, sep="/")
            abstract = jax.tree_util.tree_map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        try:
            with stderr_kept_on_success():
                restored = manager.restore(step, args=ocp.args.Composite(**{
                    PARAMS_ITEM: ocp.args.StandardRestore(abstract)}))[PARAMS_ITEM]
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore report damage in many types
            raise CheckpointNotFound(f"{directory} step {step} does not restore ({unreadable(e)}).") from None
    if base_name:
        base_dir = directory.parent / base_name
        if not base_dir.is_dir():
            raise CheckpointNotFound(f"{directory} step {step} holds LoRA adapters whose frozen base, {base_dir}, "
                                     "is missing; copy it with the checkpoints.")
        _, base = restore_params(base_dir, shardings=base_shardings, **config_overrides)
        restored = lora.join(base, restored)
    return model, restored
