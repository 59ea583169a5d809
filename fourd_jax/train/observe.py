"""What a run leaves behind: metrics.jsonl, TensorBoard events, manifest.json, and the FLOPs/MFU
estimate. Only process 0 writes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
from etils import epath
from tensorboardX import SummaryWriter

from fourd_jax.files import absolute, as_path, is_remote, local_copy, upload, write_text_atomic

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices (CPUs) need `train.peak_flops`.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
}
TIMING_KEYS = ("step_time", "tokens_per_s", "mfu", "elapsed")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "numpy", "fourd_jax")


class MetricsWriter:
    """One JSON object per step in WORKDIR/metrics.jsonl and the same scalars as TensorBoard events.

    A local workdir's file is appended to at every step. An object store (gs://) has no append: there
    the rows are kept in memory and the whole file is uploaded (one all-or-nothing object write) at each
    `flush`, which the loop calls before every checkpoint, so the rows up to a checkpoint are durable
    with it; TensorBoard events are written to a local directory and uploaded at the same times."""

    def __init__(self, workdir: str | os.PathLike, resume_from_step: int = 0):
        self.active = jax.process_index() == 0
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.remote = is_remote(workdir)
        if not self.active:
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()] if self.path.exists() else []
        # a resumed run drops lines past its checkpoint, so the file stays one history
        self.lines = [line for line in lines if json.loads(line)["step"] <= resume_from_step]
        if self.path.exists() or self.remote:
            write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))
        self.events = workdir / "tensorboard"
        self.local_events = Path(tempfile.mkdtemp(prefix="fourd_jax_events_")) if self.remote else self.events
        self.tensorboard = SummaryWriter(str(self.local_events), purge_step=resume_from_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        row = json.dumps({"step": step, **{k: (None if v is None else float(v)) for k, v in sorted(metrics.items())}})
        if self.remote:
            self.lines.append(row)
        else:
            with self.path.open("a") as f:
                f.write(row + "\n")
        for key, value in metrics.items():
            if value is not None:
                self.tensorboard.add_scalar(key, float(value), step)

    def flush(self) -> None:
        """Make every row written so far durable (a remote workdir's file and events are uploaded)."""
        if not self.active:
            return
        self.tensorboard.flush()
        if self.remote:
            write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))
            upload(self.local_events, self.events)

    def close(self) -> None:
        if self.active:
            self.tensorboard.close()
            self.flush()
            if self.remote:
                shutil.rmtree(self.local_events, ignore_errors=True)


def peak_flops(configured: float | None) -> float | None:
    if configured:
        return float(configured)
    return PEAK_FLOPS.get(jax.devices()[0].device_kind)


def decoder_flops_per_token(model_config: Any, seq_len: int, trainable: bool = True) -> float:
    """Forward (x1) or forward + backward (x3) FLOPs per token of the text decoder: 2 * params in
    matmuls plus attention scores and values."""
    t = model_config.text
    d, f, layers = t.hidden_size, t.intermediate_size, t.num_layers
    kv = t.num_kv_heads * t.head_dim
    matmul = layers * (2 * d * (d + 2 * kv) + 2 * d * d + 6 * d * f) + 2 * d * t.vocab_size
    attention = layers * 4 * seq_len * d  # QK^T and PV, averaged over causal positions x2
    return (3 if trainable else 1) * (matmul + attention)


def vision_flops_per_patch(model_config: Any, attention_len: int | None = None) -> float:
    """Forward FLOPs per patch of the (frozen) vision tower. `attention_len`: the patches each one
    attends to (default: Qwen2.5-VL's window; Qwen3-VL attends over its whole frame, h * w)."""
    v = model_config.vision
    e, m = v.hidden_size, v.intermediate_size
    merged = e * v.spatial_merge_size**2
    span = v.window_len if attention_len is None else attention_len
    per_block = 2 * e * 3 * e + 2 * e * e + 6 * e * m + 4 * span * e  # qkv, proj, MLP, scores and values
    merger = (2 * merged * merged + 2 * merged * v.out_hidden_size) / v.spatial_merge_size**2
    mergers = 1 + getattr(v, "num_deepstack", 0)  # each Qwen3-VL DeepStack feature has its own merger
    return 2 * v.patch_dim * e + v.depth * per_block + mergers * merger


def file_digest(paths: list[Path]) -> dict[str, str]:
    """The SHA-256 of each file by its path (a remote file's is read from its staged copy, which the
    records reader uses too)."""
    out = {}
    for path in paths:
        h = hashlib.sha256()
        with local_copy(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[str(path)] = h.hexdigest()
    return out


def write_manifest(workdir: str | os.PathLike, config: dict, data_dir: str | os.PathLike, data_digest: dict[str, str],
                   mesh: Any) -> epath.Path:
    """What a reproducibility study needs to rerun: versions, config, seed, the records directory
    and its files' SHA-256 (`file_digest`), devices. Written atomically."""
    path = as_path(workdir) / "manifest.json"
    if jax.process_index() != 0:
        return path
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    manifest = {
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
        "config": config, "seed": config.get("seed"), "data": str(absolute(data_dir)),
        "data_files": data_digest,
        "mesh_shape": dict(mesh.shape), "process_count": jax.process_count(),
        "devices": sorted({d.device_kind for d in jax.devices()}), "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
