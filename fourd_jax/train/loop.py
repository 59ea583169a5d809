"""The outer training loop both stages share: the only place with side effects.

    state <- restore latest checkpoint, or a fresh sharded state
    for each step until `steps`:
        stop on preemption (SIGTERM to any process; all agree at the step boundary): save, exit 0
        batch -> device (sharded by example over data x fsdp) -> jitted step -> metrics
        stop after `max_nonfinite` non-finite steps in a row
        log metrics; save every `checkpoint_every` steps (async)
    save the final step

A stage supplies `step(state, host_batch) -> (state, metrics)` (jitted inside) and the FLOPs of a
batch; the loop handles everything else.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from tqdm import tqdm

from fourd_jax.batch import agree_shapes
from fourd_jax.distributed import any_process
from fourd_jax.train.checkpoints import Checkpointer
from fourd_jax.train.observe import TIMING_KEYS, MetricsWriter, peak_flops
from fourd_jax.train.state import TrainState


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary.

    On a pod the signal may reach one host only (or the hosts at different times); the loop stops
    when any process has it (`any_process`, one scalar gathered per step), so every process saves the
    same step and leaves the loop together.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def run(
    *,
    state: TrainState,
    step_fn: Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Any]]],
    batches: Iterator[dict[str, Any]],
    checkpointer: Checkpointer,
    metrics: MetricsWriter,
    total_steps: int,
    config: dict,
    model_config: dict,
    schedule: Callable[[int], float],
    flops_fn: Callable[[dict[str, Any]], float],
    checkpoint_every: int,
    max_nonfinite: int,
    peak_flops_per_device: float | None = None,
    best_metric: str | None = "loss",
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train from `state` to `total_steps`; returns the final state (after saving it).

    `evaluate(state)` (e.g. the validation loss) runs at every checkpoint step and the last step;
    its metrics join that step's row, and `best_metric` may name one of them.
    """
    start_step = int(jax.device_get(state.step))
    peak = peak_flops(peak_flops_per_device)
    chief = jax.process_index() == 0
    if start_step and chief:
        print(f"resumed from step {start_step}", flush=True)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    last_metric = None
    preempted = False
    with Preemption() as preemption:
        while int(jax.device_get(state.step)) < total_steps:
            preempted = any_process(preemption.requested)
            if preempted:
                break
            batch = agree_shapes(next(batches))
            began = time.perf_counter()
            state, step_metrics = step_fn(state, batch)
            step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            elapsed = time.perf_counter() - began
            step = int(jax.device_get(state.step))
            streak = int(jax.device_get(state.nonfinite_streak))
            if streak >= max_nonfinite:
                checkpointer.wait()
                raise NonFiniteError(f"{streak} consecutive steps had a non-finite loss or gradient (step {step}); "
                                     "stopping. Lower optim.lr or check the data.")
            flops = flops_fn(batch)
            step_metrics.update(
                lr=float(schedule(step - 1)), step_time=elapsed, tokens_per_s=step_metrics["tokens"] / elapsed,
                mfu=(flops / elapsed / (peak * jax.device_count())) if peak else None,
                skipped_records=float(batch.get("num_skipped", 0)), nonfinite_total=float(state.nonfinite_total),
            )
            saving = step % checkpoint_every == 0 and step < total_steps
            if evaluate is not None and (saving or step == total_steps):
                step_metrics.update(evaluate(state))
            metrics.write(step, step_metrics)
            last_metric = step_metrics.get(best_metric) if best_metric else None
            bar.update(1)
            bar.set_postfix(progress_fields(step_metrics), refresh=False)
            if saving:
                metrics.flush()  # the rows up to a checkpoint are durable with it (a gs:// workdir uploads here)
                checkpointer.save(state, batches, config, model_config, metric=last_metric)
        metrics.flush()
        checkpointer.save(state, batches, config, model_config, metric=last_metric, wait=True)
    bar.close()
    if preempted and chief:
        print(f"stopped by SIGTERM at step {int(jax.device_get(state.step))}; checkpoint saved.", flush=True)
    return state


# What the progress bar shows of a step's metrics, when the stage reports them: the loss and its terms
# (the combined DIFT loss jumps with whether a batch has imagery, so its parts are shown too), the reward.
PROGRESS_FIELDS = {"loss": "loss", "ce": "ce", "latent_loss": "latent", "reward": "reward"}


def progress_fields(step_metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix: the losses (or reward) of the step, its learning rate and tokens/s."""
    shown = {name: f"{step_metrics[key]:.4f}" for key, name in PROGRESS_FIELDS.items()
             if step_metrics.get(key) is not None}
    return {**shown, "lr": f"{step_metrics['lr']:.2e}", "tok/s": f"{step_metrics['tokens_per_s']:.0f}"}


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without wall-clock fields (what must repeat bit for bit across runs)."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}
