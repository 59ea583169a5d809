"""The 4D record: one question about one video, with the geometry behind its answer.

Records are msgpack maps stored one per entry in ArrayRecord files. Frames and imagery images
are PNG-encoded (lossless, so a decoded record is exactly what was rendered); numeric arrays are
stored raw with dtype and shape. The schema is versioned; docs/DATA.md documents every field
and the coordinate conventions.

    for sample in records.read("data/train"):   # a file or a directory of *.array_record
        sample["frames"]  # uint8 [T, H, W, 3]
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from fourd_jax.errors import InputError

SCHEMA_VERSION = 1
SUFFIX = ".array_record"

# field -> (kind, required). Kinds: str, int, float, strs (list of str), ints, images (list of
# uint8 [H, W, 3]), array:<dtype>:<rank> (numpy), json (any msgpack-able value).
FIELDS: dict[str, tuple[str, bool]] = {
    "schema_version": ("int", True),
    "sample_id": ("str", True),
    "source": ("str", True),  # "sim", "4dthinker", "dsr", "vlm4d"
    "family": ("str", True),  # "dsr", "4dthinker", "mllm4d", "vlm4d"
    "subtask": ("str", True),
    "frames": ("images", True),  # uint8 [T, H, W, 3] when decoded
    "fps": ("float", True),
    "timestamps": ("array:float32:1", True),  # [T] seconds
    "shown_frames": ("ints", True),  # frame indices given to the model
    "question": ("str", True),
    "options": ("strs", True),  # 4 option texts, without the "A. " prefix
    "answer": ("str", True),  # the key letter
    "trace": ("str", True),  # reasoning trace with <output_image> markers ("" if none)
    "imagery": ("images", True),  # one image per <output_image> marker
    "intrinsics": ("array:float32:2", True),  # [3, 3], or [0, 0] when unknown
    "cam_to_world": ("array:float32:3", True),  # [T, 4, 4], or [0, 4, 4] when unknown
    "object_ids": ("ints", True),
    "object_categories": ("strs", True),
    "object_names": ("strs", True),  # e.g. "red ball"
    "object_centers": ("array:float32:3", True),  # [N, T, 3]
    "object_headings": ("array:float32:3", True),  # [N, T, 3]
    "target_objects": ("ints", True),  # ids the question is about
    "scene_seed": ("int", False),
    "camera_moves": ("json", False),  # [[move, magnitude], ...]
    "meta": ("json", False),  # anything else a generator or importer wants to keep
    # DIFT targets precomputed by one model's frozen vision tower (`fourd-jax data targets`):
    # [num imagery images, latent_size, hidden]
    "imagery_targets": ("array:float32:3", False),
}


class RecordError(InputError):
    """A record that cannot be decoded or does not follow the schema."""


def encode_image(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image (deterministic for equal input)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RecordError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _check(sample: dict[str, Any]) -> None:
    missing = [k for k, (_, required) in FIELDS.items() if required and k not in sample]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise RecordError(f"missing field '{missing[0]}'{more}")
    extra = sorted(set(sample) - set(FIELDS))
    if extra:
        raise RecordError(f"unknown field '{extra[0]}'")
    if len(sample["options"]) != 4:
        raise RecordError(f"field 'options' must hold 4 options, not {len(sample['options'])}")
    if sample["answer"] not in "ABCD" or len(sample["answer"]) != 1:
        raise RecordError(f"field 'answer' must be one of A-D, not {sample['answer']!r}")
    if sample["trace"].count("<output_image>") != len(sample["imagery"]):
        raise RecordError(
            f"field 'trace' has {sample['trace'].count('<output_image>')} <output_image> markers but "
            f"'imagery' holds {len(sample['imagery'])} images"
        )
    if "imagery_targets" in sample and len(sample["imagery_targets"]) != len(sample["imagery"]):
        raise RecordError(f"field 'imagery_targets' holds {len(sample['imagery_targets'])} targets for "
                          f"{len(sample['imagery'])} imagery images")
    n_frames = len(sample["frames"])
    if any(not 0 <= i < n_frames for i in sample["shown_frames"]):
        raise RecordError(f"field 'shown_frames' indexes outside the {n_frames} frames")


def encode(sample: dict[str, Any]) -> bytes:
    """Serialise one sample (decoded form) after checking it against the schema."""
    sample = dict(sample)
    sample.setdefault("schema_version", SCHEMA_VERSION)
    _check(sample)
    packed = {}
    for key, (kind, _) in FIELDS.items():
        if key not in sample:
            continue
        value = sample[key]
        if kind == "images":  # already-encoded PNG bytes pass through (frames shared by many records)
            value = [img if isinstance(img, bytes) else encode_image(img) for img in value]
        elif kind.startswith("array:"):
            _, dtype, rank = kind.split(":")
            arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
            if arr.ndim != int(rank):
                raise RecordError(f"field '{key}' must have rank {rank}, got shape {arr.shape}")
            value = {"shape": list(arr.shape), "data": arr.tobytes()}
        elif kind in ("ints", "strs"):
            value = [int(v) for v in value] if kind == "ints" else [str(v) for v in value]
        elif kind in ("int", "float", "str"):
            value = {"int": int, "float": float, "str": str}[kind](value)
        packed[key] = value
    return msgpack.packb(packed, use_bin_type=True)


def decode(data: bytes, decode_images: bool = True) -> dict[str, Any]:
    """Parse one record; images stay PNG bytes unless `decode_images`. Raises RecordError."""
    try:
        packed = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for corrupt input
        raise RecordError(f"not a msgpack record ({type(e).__name__})") from None
    if not isinstance(packed, dict):
        raise RecordError("not a record map")
    version = packed.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"schema_version {version!r} is not the supported {SCHEMA_VERSION}")
    sample: dict[str, Any] = {}
    for key, value in packed.items():
        if key not in FIELDS:
            raise RecordError(f"unknown field '{key}'")
        kind = FIELDS[key][0]
        try:
            if kind == "images":
                value = [decode_image(v) for v in value] if decode_images else list(value)
            elif kind.startswith("array:"):
                dtype = kind.split(":")[1]
                value = np.frombuffer(value["data"], dtype=dtype).reshape(value["shape"]).copy()
        except Exception as e:  # noqa: BLE001 - PIL / numpy errors on corrupt payloads
            raise RecordError(f"field '{key}' cannot be decoded ({type(e).__name__}: {e})") from None
        sample[key] = value
    _check(sample)
    if decode_images:
        sample["frames"] = np.stack(sample["frames"]) if sample["frames"] else np.zeros((0, 0, 0, 3), np.uint8)
    return sample


def write(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples to one ArrayRecord file atomically (temporary name, then rename)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for sample in samples:
            writer.write(encode(sample))
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count


def files(path: str | os.PathLike) -> list[Path]:
    """The ArrayRecord files at `path` (a file, or a directory searched recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is neither a record file nor a directory.")
    found = sorted(p for p in path.rglob(f"*{SUFFIX}") if not p.name.startswith("."))
    if not found:
        raise InputError(f"{path} holds no {SUFFIX} files.")
    return found


def read_raw(path: str | os.PathLike) -> Iterator[tuple[Path, int, bytes]]:
    """(file, index, bytes) for every record under `path`."""
    from array_record.python.array_record_module import ArrayRecordReader

    for file in files(path):
        reader = ArrayRecordReader(str(file))
        try:
            for index in range(reader.num_records()):
                yield file, index, reader.read([index])[0]
        finally:
            reader.close()


def read(path: str | os.PathLike, decode_images: bool = True) -> Iterator[dict[str, Any]]:
    """Every record under `path`, decoded; a bad record raises naming its file and index."""
    for file, index, data in read_raw(path):
        try:
            yield decode(data, decode_images)
        except RecordError as e:
            raise RecordError(f"{file} record {index}: {e}.") from None
