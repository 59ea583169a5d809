"""The 4D record: one question about one video, with the geometry behind its answer.

Records are msgpack maps stored one per entry in ArrayRecord files. Frames and imagery images
are PNG-encoded (lossless, so a decoded record is exactly what was rendered); numeric arrays are
stored raw with dtype and shape. The schema is versioned; docs/DATA.md documents every field
and the coordinate conventions.

    for sample in records.read("data/train"):   # a file or a directory of *.array_record
        sample["frames"]  # uint8 [T, H, W, 3]
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from fourd_jax import files as files_lib
from fourd_jax.data.taxonomy import LETTERS
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


_SCALARS = {"str": (str,), "int": (int,), "float": (int, float)}


def _check_kind(key: str, kind: str, value: Any) -> None:
    """The field holds a value of its schema kind (list items included; arrays by rank)."""
    if kind in _SCALARS:
        ok = isinstance(value, _SCALARS[kind]) and not isinstance(value, bool)
    elif kind == "images" and isinstance(value, np.ndarray):  # decoded frames, uint8 [T, H, W, 3]
        ok = value.ndim == 4
    elif kind in ("strs", "ints", "images"):
        item = {"strs": (str,), "ints": (int, np.integer), "images": (bytes, np.ndarray)}[kind]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool)
                                                      for v in value)
    elif kind.startswith("array:"):
        ok = np.ndim(value) == int(kind.split(":")[2])
    else:
        return
    if not ok:
        raise RecordError(f"field '{key}' holds {type(value).__name__} {_preview(value)}, not a {kind} value")


def _preview(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_shape(key: str, shape: tuple[int, ...], allowed: list[tuple[int, ...]]) -> None:
    if tuple(shape) not in allowed:
        raise RecordError(f"field '{key}' has shape {tuple(shape)}, expected "
                          + " or ".join(str(a) for a in allowed))


def _check(sample: dict[str, Any]) -> None:
    missing = [k for k, (_, required) in FIELDS.items() if required and k not in sample]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise RecordError(f"missing field '{missing[0]}'{more}")
    extra = sorted(set(sample) - set(FIELDS))
    if extra:
        raise RecordError(f"unknown field '{extra[0]}'")
    for key, value in sample.items():
        _check_kind(key, FIELDS[key][0], value)
    n_frames, n_objects = len(sample["frames"]), len(sample["object_ids"])
    _check_shape("timestamps", np.shape(sample["timestamps"]), [(n_frames,)])
    _check_shape("intrinsics", np.shape(sample["intrinsics"]), [(3, 3), (0, 0)])
    _check_shape("cam_to_world", np.shape(sample["cam_to_world"]), [(n_frames, 4, 4), (0, 4, 4)])
    for key in ("object_centers", "object_headings"):
        _check_shape(key, np.shape(sample[key]), [(n_objects, n_frames, 3), (0, 0, 3)])
    for key in ("object_categories", "object_names"):
        if len(sample[key]) != n_objects:
            raise RecordError(f"field '{key}' names {len(sample[key])} objects, 'object_ids' has {n_objects}")
    if len(sample["options"]) != 4:
        raise RecordError(f"field 'options' must hold 4 options, not {len(sample['options'])}")
    if sample["answer"] not in LETTERS or len(sample["answer"]) != 1:
        raise RecordError(f"field 'answer' must be one of A-D, not {sample['answer']!r}")
    if sample["trace"].count("<output_image>") != len(sample["imagery"]):
        raise RecordError(
            f"field 'trace' has {sample['trace'].count('<output_image>')} <output_image> markers but "
            f"'imagery' holds {len(sample['imagery'])} images"
        )
    if "imagery_targets" in sample and len(sample["imagery_targets"]) != len(sample["imagery"]):
        raise RecordError(f"field 'imagery_targets' holds {len(sample['imagery_targets'])} targets for "
                          f"{len(sample['imagery'])} imagery images")
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
        sizes = sorted({frame.shape for frame in sample["frames"]})
        if len(sizes) > 1:
            raise RecordError(f"field 'frames' mixes frame sizes {sizes[0]} and {sizes[1]}")
        sample["frames"] = np.stack(sample["frames"]) if sample["frames"] else np.zeros((0, 0, 0, 3), np.uint8)
    return sample


def write(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples to one ArrayRecord file atomically (temporary name, then rename). The writer takes
    local files only: a remote `path` is written to a local temporary file, then uploaded whole."""
    if files_lib.is_remote(path):
        with tempfile.TemporaryDirectory() as local:
            count = write(Path(local) / files_lib.as_path(path).name, samples)
            files_lib.upload(Path(local) / files_lib.as_path(path).name, path)
        return count
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for sample in samples:
            writer.write(encode(sample))
            count += 1
    except BaseException:  # nothing half-written is left behind
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return count


def files(path: str | os.PathLike) -> list[Path]:
    """The ArrayRecord files at `path` (a file, or a directory searched recursively), sorted; a remote
    `path` gives remote files (epath), which `open_reader` stages locally."""
    path = files_lib.as_path(path) if files_lib.is_remote(path) else Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is neither a record file nor a directory.")
    found = sorted(p for p in files_lib.find(path, f"*{SUFFIX}") if not p.name.startswith("."))
    if not found:
        raise InputError(f"{path} holds no {SUFFIX} files.")
    return found


def open_reader(file: str | os.PathLike) -> Any:
    """An ArrayRecordReader for `file`, or RecordError when the file is not a whole ArrayRecord file
    (the reader would otherwise report a truncated file as holding no records). The C++ reader opens
    local files only (given a gs:// URL it hangs), so a remote file is read from its staged copy."""
    local = files_lib.local_copy(file)
    try:
        reader = ArrayRecordReader(str(local))
    except Exception as e:  # noqa: BLE001 - the bindings raise RuntimeError / ValueError variants
        raise RecordError(f"{file} cannot be opened as an ArrayRecord file ({e}).") from None
    try:  # a cut file may still open: its last record is where the cut shows
        whole = reader.ok() and (reader.num_records() == 0 or len(reader.read([reader.num_records() - 1])) == 1)
    except Exception:  # noqa: BLE001 - Riegeli reports damage as RuntimeError with its own detail
        whole = False
    if not whole:
        with contextlib.suppress(Exception):  # closing a damaged reader re-raises its damage
            reader.close()
        raise RecordError(f"{file} is not a readable ArrayRecord file (truncated or corrupt).")
    return reader


def count(path: str | os.PathLike) -> int:
    """How many records the files under `path` hold (each file checked to be whole)."""
    total = 0
    for file in files(path):
        reader = open_reader(file)
        try:
            total += reader.num_records()
        finally:
            reader.close()
    return total


def read_raw(path: str | os.PathLike) -> Iterator[tuple[Path, int, bytes]]:
    """(file, index, bytes) for every record under `path`."""
    for file in files(path):
        reader = open_reader(file)
        try:
            for index in range(reader.num_records()):
                try:
                    data = reader.read([index])[0]
                except Exception as e:  # noqa: BLE001 - damage inside the file
                    raise RecordError(f"{file} record {index} cannot be read ({e}).") from None
                yield file, index, data
        finally:
            reader.close()


def read(path: str | os.PathLike, decode_images: bool = True) -> Iterator[dict[str, Any]]:
    """Every record under `path`, decoded; a bad record raises naming its file and index."""
    for file, index, data in read_raw(path):
        try:
            yield decode(data, decode_images)
        except RecordError as e:
            raise RecordError(f"{file} record {index}: {e}.") from None
