"""A TFDS builder over the same 4D records, so `tfds.data_source("fourd_records", ...)` reads them.

Each TFDS example carries the record's bytes unchanged (decode with `records.decode`) plus a few
plain-text fields for filtering. Only Tensor/Text features are used: TFDS image and video
features need TensorFlow, which this project does not install.

    builder = FourdRecords(records_dir="data/synth", data_dir="data/tfds")
    builder.download_and_prepare()
    source = tfds.data_source("fourd_records", data_dir="data/tfds")["train"]
    sample = records.decode(source[0]["record"])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fourd_jax.data import records

SPLITS = ("train", "val", "test")


class FourdRecords(tfds.core.GeneratorBasedBuilder):
    """Questions about procedural or imported 4D scenes (the fourd_jax record schema)."""

    VERSION = tfds.core.Version(f"{records.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{records.SCHEMA_VERSION}.0.0": "fourd_jax record schema version 1."}

    def __init__(self, *, records_dir: str | Path | None = None, **kwargs):
        self._records_dir = None if records_dir is None else Path(records_dir)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "record": tfds.features.Tensor(shape=(), dtype=np.object_),
            "sample_id": tfds.features.Text(),
            "family": tfds.features.Text(),
            "subtask": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        if self._records_dir is None:
            raise records.RecordError("FourdRecords needs records_dir= to build (the output of fourd-jax synth).")
        return {split: self._generate_examples(self._records_dir / split) for split in SPLITS
                if (self._records_dir / split).is_dir()}

    def _generate_examples(self, split_dir: Path):
        for file, index, data in records.read_raw(split_dir):
            sample = records.decode(data, decode_images=False)
            yield f"{file.name}:{index}", {"record": data, "sample_id": sample["sample_id"],
                                           "family": sample["family"], "subtask": sample["subtask"]}
