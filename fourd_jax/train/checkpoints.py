"""Training checkpoints (Orbax): everything needed to continue a run exactly.

Each step directory holds the items
  params       the parameters (also what `fourd-jax convert jax-to-hf` exports); in a LoRA run only
               the adapters, the frozen base being written once beside the checkpoints
               (`fourd_jax.train.lora.keep_base`, named by the model item's `lora_base`)
  model        the ModelConfig (JSON)
  train_state  step, optimizer state, RNG and non-finite counters
  data         the Grain iterator state (the next batch)
  config       the run's config (JSON)
Orbax writes each step under a temporary name and renames it when complete, so a process killed
mid-save leaves the previous step restorable. Retention keeps the last `keep` steps plus the best
one by the recorded metric. A step that was completely written but no longer restores (a file lost
or damaged since) is skipped on resume with one line saying why; the run continues from the newest
step that restores, and writes the skipped step anew when it gets there.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from fourd_jax.checkpoint import (
    LORA_BASE_KEY,
    MODEL_ITEM,
    PARAMS_ITEM,
    stderr_kept_on_success,
    unreadable,
)
from fourd_jax.errors import InputError
from fourd_jax.files import absolute, write_text_atomic
from fourd_jax.model import lora
from fourd_jax.train.state import TrainState

TRAIN_ITEM, DATA_ITEM, CONFIG_ITEM = "train_state", "data", "config"


class Checkpointer:
    """Async saves with last-N + best retention; restore onto any mesh. `lora_base`: the name of
    the sibling directory holding a LoRA run's frozen base; its steps then save the adapters only."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", lora_base: str | None = None):
        self.directory = absolute(directory)  # a local path made absolute, or a URL (gs://...)
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        self.lora_base = lora_base
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True))
        self._metrics_file = self.directory / "metrics_by_step.json"
        self._metrics = json.loads(self._metrics_file.read_text()) if self._metrics_file.exists() else {}
        self._unrestorable: set[int] = set()  # steps on disk that failed to restore; rewritten when reached

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, iterator: Any, config: dict, model_config: dict,
             metric: float | None = None, wait: bool = False) -> None:
        step = int(jax.device_get(state.step))
        self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            if step not in self._unrestorable:
                return  # e.g. a run resumed at its last step saves nothing new
            self.manager.delete(step)  # a damaged copy of this step: replaced by the one just trained
            self._unrestorable.discard(step)
        rest = state.replace(params=None)
        params = state.params
        if self.lora_base:
            params = lora.adapters_of(params)
            model_config = {**model_config, LORA_BASE_KEY: self.lora_base}
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            TRAIN_ITEM: ocp.args.StandardSave(rest),
            DATA_ITEM: grain.checkpoint.CheckpointSave(iterator),
            CONFIG_ITEM: ocp.args.JsonSave(config),
            MODEL_ITEM: ocp.args.JsonSave(model_config),
        }))
        if metric is not None:
            self._metrics[str(step)] = float(metric)
        if wait:
            self.manager.wait_until_finished()
        self._retain(current=step)

    def _retain(self, current: int) -> None:
        steps = sorted(self.manager.all_steps())
        keep = set(steps[-self.keep:]) | {current}
        scored = {int(s): m for s, m in self._metrics.items() if int(s) in steps}
        if self.best_metric and scored:
            pick = min if self.best_mode == "min" else max
            keep.add(pick(scored, key=scored.get))
        for step in steps:
            if step not in keep:
                self.manager.wait_until_finished()
                self.manager.delete(step)
                self._metrics.pop(str(step), None)
        if jax.process_index() == 0:  # written whole: a run cut off here leaves the previous file
            write_text_atomic(self._metrics_file, json.dumps(self._metrics, indent=1, sort_keys=True))

    def restore(self, abstract: TrainState, iterator: Any, step: int | None = None, base: Any = None) -> TrainState:
        """The state at `step` (default latest) shaped and sharded like `abstract`; also restores
        `iterator` in place to the batch after that step. `base`: a LoRA run's frozen base params,
        which its steps do not hold."""
        step = self.latest_step() if step is None else step
        if self.lora_base and base is None:
            raise ValueError("a LoRA run's checkpoints restore onto its frozen base: pass base.")
        params = lora.adapters_of(abstract.params) if self.lora_base else abstract.params
        with stderr_kept_on_success():  # a failed read's abandoned siblings print nothing
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                PARAMS_ITEM: ocp.args.StandardRestore(params),
                TRAIN_ITEM: ocp.args.StandardRestore(abstract.replace(params=None)),
                DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator),
            }))
        params = restored[PARAMS_ITEM]
        if self.lora_base:
            params = lora.join(base, params)
        return restored[TRAIN_ITEM].replace(params=params)

    def restore_newest(self, abstract: TrainState, iterator: Any, base: Any = None) -> TrainState:
        """`restore` from the newest step that restores completely. Each newer step that fails is
        reported in one line (its step and the error's first line) and left on disk until the run
        writes that step again; when no step restores, one sentence lists why."""
        reasons = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(abstract, iterator, step, base)
            except Exception as e:  # noqa: BLE001 - Orbax and tensorstore report damage in many types
                reason = unreadable(e)
                reasons.append(f"step {step}: {reason}")
                self._unrestorable.add(step)
                if jax.process_index() == 0:
                    print(f"checkpoint step {step} in {self.directory} does not restore ({reason}); "
                          "resuming from an earlier step.", file=sys.stderr, flush=True)
        raise InputError(f"no checkpoint in {self.directory} restores ({'; '.join(reasons)}).")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
