"""`fourd-jax data targets`: write DIFT imagery targets into records, computed once.

During DIFT the vision tower is frozen, so the targets of a record's imagery images (each image's
merged tokens averaged in latent_size chunks) never change: computing them once with the
checkpoint the run starts from and storing them as `imagery_targets` saves the imagery tower's
forward in every step (`loss.imagery_targets="precomputed"`). Frames and images are copied as
stored (no re-encoding); file names and splits are kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fourd_jax.data import records
from fourd_jax.data.features import FeatureConfig, imagery_patches
from fourd_jax.model.imagery import imagery_targets


def write_imagery_targets(src: str | Path, out: str | Path, model: Any, params: Any, config: FeatureConfig) -> int:
    """Copy the records under `src` to `out` with `imagery_targets` added; returns how many got targets."""
    src, out = Path(src), Path(out)
    written = 0
    for file in records.files(src):
        samples = []
        for sample in records.read(file, decode_images=False):
            if sample["imagery"]:
                images = [records.decode_image(data) for data in sample["imagery"]]
                patches, grids = imagery_patches(images, model.config.vision, config)
                sample["imagery_targets"] = np.asarray(
                    imagery_targets(model, params, patches, grids, config.latent_size), np.float32)
                written += 1
            samples.append(sample)
        records.write(out / file.relative_to(src) if src.is_dir() else out / file.name, samples)
    if src.is_dir() and (src / "manifest.json").exists():
        shutil.copy(src / "manifest.json", out / "manifest.json")
    return written
