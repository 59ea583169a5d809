"""The outer training loop both stages share: the only place with side effects.

    state <- restore latest checkpoint, or a fresh sharded state
    for each step until `steps`:
        stop on preemption (SIGTERM): save, exit 0
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
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fourd_jax import sharding
from fourd_jax.errors import InputError
from fourd_jax.train.checkpoints import Checkpointer
from fourd_jax.train.observe import TIMING_KEYS, MetricsWriter, peak_flops
from fourd_jax.train.state import TrainState


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

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


def agree_shapes(batch: dict[str, Any]) -> dict[str, Any]:
    """Pad each process's batch arrays to the largest shape any process has (multi-host).

    Every process buckets its own rows, so sequence and media sizes can differ between hosts; the
    global arrays need one shape. Padding is zeros: no attention, no loss, invalid media slots,
    rows past every example's media (which reads padding patches that nothing attends to).
    """
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    keys = sorted(k for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object and v.ndim)
    shapes = np.array([list(batch[k].shape) + [0] * (4 - batch[k].ndim) for k in keys])
    largest = np.max(multihost_utils.process_allgather(shapes), axis=0)
    out = dict(batch)
    for prefix in ("video", "imagery"):
        # A process whose rows have no media of a kind has an empty layout, which fits any frame size.
        mine = np.array([int(batch[f"{prefix}_frame_len"]), int(batch[f"{prefix}_valid"].any())])
        every = multihost_utils.process_allgather(mine)
        sizes = {int(f) for f, used in every if used}
        if len(sizes) > 1:
            raise RuntimeError(f"processes hold {prefix} frames of different sizes {sorted(sizes)}; use one frame "
                               "size per run")
        out[f"{prefix}_frame_len"] = np.int32(sizes.pop() if sizes else 0)
    if "loss_window" in batch:  # a wider window still holds every row's supervised positions
        windows = multihost_utils.process_allgather(np.array([int(batch["loss_window"])]))
        out["loss_window"] = np.int32(np.max(windows))
    for key, want in zip(keys, largest, strict=True):
        value = batch[key]
        pad = [(0, int(w) - d) for d, w in zip(value.shape, want, strict=False)]
        out[key] = np.pad(value, pad) if any(p for _, p in pad) else value
    return out


def agree_batch_list(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A fixed list of host batches (e.g. validation) that every process can step through together.

    Each process keeps the number of batches the process with the fewest has, and each batch is
    padded to the shapes every process agrees on, so the collectives in the step line up.
    """
    if jax.process_count() == 1:
        return list(batches)
    from jax.experimental import multihost_utils

    count = int(np.min(multihost_utils.process_allgather(np.array([len(batches)]))))
    return [agree_shapes(batch) for batch in batches[:count]]


def device_batch(batch: dict[str, Any], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """The numeric per-example arrays of a host batch as global arrays sharded over the batch axis.

    Each process passes its own rows; `make_array_from_process_local_data` assembles the global
    batch. position_ids carry the batch on axis 1.
    """
    out = {}
    rows = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if not isinstance(value, np.ndarray) or value.dtype == object or value.ndim == 0:
            continue
        axis = 1 if key == "position_ids" else 0
        if value.shape[axis] == rows:
            out[key] = shard_rows(value, mesh, rules, axis)
    return out


def shard_rows(value: np.ndarray, mesh: Mesh, rules, axis: int = 0) -> jax.Array:
    """This process's rows of a per-example array as a global array split over the batch axes."""
    spec = [None] * value.ndim
    spec[axis] = sharding.batch_sharding(mesh, 1, rules).spec[0]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)), value)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its first (batch) axis."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {shard.index[0].start or 0: np.asarray(shard.data) for shard in x.addressable_shards}
    return np.concatenate([shards[start] for start in sorted(shards)])


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % ways or global_batch % jax.process_count():
        raise InputError(f"data.batch_size {global_batch} must be divisible by data x fsdp = {ways} and by the "
                         f"{jax.process_count()} processes.")


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
    from tqdm import tqdm

    start_step = int(jax.device_get(state.step))
    peak = peak_flops(peak_flops_per_device)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    last_metric = None
    with Preemption() as preemption:
        while int(jax.device_get(state.step)) < total_steps:
            if preemption.requested:
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
            bar.set_postfix(loss=f"{step_metrics['loss']:.4f}")
            if saving:
                checkpointer.save(state, batches, config, model_config, metric=last_metric)
        checkpointer.save(state, batches, config, model_config, metric=last_metric, wait=True)
    bar.close()
    return state


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without wall-clock fields (what must repeat bit for bit across runs)."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}
