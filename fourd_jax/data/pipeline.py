"""The Grain input pipeline: ArrayRecord 4D records -> fixed-shape training batches.

    source (ArrayRecord) -> seeded shuffle (per epoch) -> shard by JAX process -> decode ->
    featurize (processor, chat template, latent blocks, labels) -> collate into bucketed batches
    -> worker processes (optional)

Everything up to the batch runs in worker processes when `num_workers > 0`. The iterator's state
(`get_state` / `set_state`) restores the exact next batch. Bad records (corrupt bytes, missing
fields, undecodable images, too long) are dropped and counted in each batch's `num_skipped`
when `skip_bad_records` is true, or raise an error naming the file and record index.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags

from fourd_jax.data import records
from fourd_jax.data.batching import BadExample, collate
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.latent_tokens import latent_token_ids
from fourd_jax.errors import InputError
from fourd_jax.files import local_copy
from fourd_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8  # per JAX process
    seq_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    seed: int = 0
    num_epochs: int | None = 1  # None: repeat forever
    shuffle: bool = True
    num_workers: int = 0
    skip_bad_records: bool = True
    drop_remainder: bool = True
    left_pad: bool = False  # prompts for generation are left-padded (collate adds rope_deltas)
    packed_rows: int = 0  # per JAX process; > 0 packs each batch's examples into this many rows
    # Threads featurizing ahead inside each process, and how many examples they may buffer.
    # Grain's defaults (16 threads, 500 examples) hold gigabytes of video patches.
    read_threads: int = 2
    read_buffer: int = 16
    # Keep only records of these sub-tasks ("camera_motion", ...); () keeps every record. A stage can
    # then train on part of a dataset whose tokenizer was built on all of it (the demo's warm-up).
    subtasks: tuple[str, ...] = ()
    features: FeatureConfig = FeatureConfig()


class RecordSource:
    """Random access to the raw records of several ArrayRecord files, with their origin; with
    `subtasks`, to those of the named sub-tasks only (read once here, images left undecoded)."""

    def __init__(self, path: str | Path | Sequence[str | Path], subtasks: Sequence[str] = ()):
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.files = [f for p in paths for f in records.files(p)]  # as given (gs:// ones too), for messages
        counts = []
        for f in self.files:  # each file checked whole first: Grain's error would not name it
            reader = records.open_reader(f)
            counts.append(reader.num_records())
            reader.close()
        # Grain's ArrayRecord source reads local files: remote ones from the copies open_reader staged.
        self._source = grain.sources.ArrayRecordDataSource([str(local_copy(f)) for f in self.files])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        self._keep = list(range(len(self._source)))
        if subtasks and self._keep:
            wanted = set(subtasks)
            self._keep = [i for i in self._keep if self._kept_by(i, wanted)]
            if not self._keep:
                raise InputError(f"no record under {', '.join(map(str, paths))} is of the sub-tasks "
                                 f"{list(subtasks)} (data.subtasks).")

    def _kept_by(self, index: int, subtasks: set[str]) -> bool:
        """A record of one of `subtasks`, or one that cannot be read: the pipeline's bad-record
        handling then names it (strict) or counts it (skipping), as it does without a filter."""
        try:
            return records.decode(self._source[index], decode_images=False)["subtask"] in subtasks
        except records.RecordError:
            return True

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: int) -> bytes:
        return self._source[self._keep[index]]

    def origin(self, index: int) -> str:
        """'file record k' for an index into this source."""
        index = self._keep[index]
        f = bisect.bisect_right(self._starts, index) - 1
        return f"{self.files[f]} record {index - self._starts[f]}"


@dataclasses.dataclass(frozen=True)
class Featurize:
    """(global index, record bytes) -> features, or BadExample when skipping bad records."""

    source: RecordSource
    tokenizer: Any
    model_config: ModelConfig
    config: PipelineConfig

    def __call__(self, positioned: tuple[int, tuple[int, bytes]]) -> dict[str, Any] | BadExample:
        position, (index, data) = positioned
        try:
            example = featurize(records.decode(data), self.tokenizer, self.model_config, self.config.features)
            return {**example, "stream_position": position}
        except InputError as e:
            if not self.config.skip_bad_records:
                raise records.RecordError(f"{self.source.origin(index)}: {e}.") from None
            return BadExample(f"{self.source.origin(index)}: {e}")


def _with_index(index: int, data: bytes) -> tuple[int, bytes]:
    return index, data


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """(index in this process's shard, item) -> (position in the stream all processes share, item).

    The position names a row the same way whatever the process count (1 process reads positions
    0, 1, 2, ...; process p of P reads p, p + P, ...), so per-row randomness keyed by it does not
    depend on how the rows are split over processes, and eval puts answers back in file order.
    """

    shard_index: int
    shard_count: int

    def __call__(self, index: int, item: Any) -> tuple[int, Any]:
        return index * self.shard_count + self.shard_index, item


@dataclasses.dataclass(frozen=True)
class Collate:
    """Picklable batch function (worker processes receive the pipeline by pickling)."""

    model_config: ModelConfig
    config: PipelineConfig

    def __call__(self, examples):
        return collate(examples, self.config.batch_size, self.config.seq_buckets, self.model_config,
                       self.config.features.latent_size, left_pad=self.config.left_pad,
                       packed_rows=self.config.packed_rows)


def build_dataset(path: str | Path | Sequence[str | Path], tokenizer: Any, model_config: ModelConfig,
                  config: PipelineConfig = PipelineConfig()) -> grain.IterDataset:
    """The batched IterDataset for records under `path` (files or directories)."""
    latent_token_ids(tokenizer)  # one clear error up front for a tokenizer without latent tokens
    source = RecordSource(path, config.subtasks)
    ds = grain.MapDataset.source(source)
    ds = ds.map_with_index(_with_index)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    shard = grain.sharding.ShardByJaxProcess()
    ds = ds[shard.shard_index::shard.shard_count].map_with_index(StreamPosition(shard.shard_index, shard.shard_count))
    ds = ds.map(Featurize(source, tokenizer, model_config, config))
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer)
    batches = ds.to_iter_dataset(read).batch(config.batch_size, drop_remainder=config.drop_remainder,
                                         batch_fn=Collate(model_config, config))
    if config.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; unparsed ones raise there
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return batches
