"""Importers of released 4D video QA datasets (4DThinker, DSR Suite, VLM4D) into 4D records.

Each importer is a generator of samples in the decoded record form (`records.encode` accepts
them); `import_to_records` writes one ArrayRecord file and reports what it read, wrote and
skipped. Released data carries no geometry, so the geometry fields hold the schema's "unknown"
shapes, and `family` equals `source`.

Layouts read. A ".json" file may hold one JSON value or JSON lines (one object per line);
a ".parquet" file (DSR-Bench is released as one) is read with pyarrow.
- 4DThinker (SPEC 3.6): SFT rows `id, text_input, text_output, image_input, image_output` and
  RL rows `Question, A..D, Correct` with `frame_paths` or `video_path`, mixed in one file.
- DSR raw QA (SPEC 4): QA dicts `{"Type", "Question", "A".."D", "Correct"}`, either as a JSON
  object mapping a video path to its QA dicts (a list, or one dict), or as rows that each name
  their media in `frame_paths`, `video_path` or `video` (checked in that order).
- DSR-Bench: rows `videoID, question, options, answer, type`; `videoID` names a file under the
  video root, given with or without its extension (tried: .mp4, .webm, .mkv, .avi, .mov).
- VLM4D (SPEC 5): rows `id, video, question_type, question, choices, answer`. As released,
  `video` is a Hugging Face URL; it is read from its path after `/resolve/<revision>/` under
  the video root (other URLs: from their whole path). Nothing is downloaded.

Media: relative paths resolve against `root` (default: the data file's directory). Videos are
decoded at `fps` (`decode_video`); frame lists are taken as released, at 1 fps. Either is cut to
`max_frames` evenly spaced frames. DSR and DSR-Bench videos instead give `max_frames` (32)
frames sampled uniformly over the whole clip, times rounded to 0.1 s, as DSR Suite samples them
(SPEC 4); their `*_dir_pred` questions show all but the last two sampled frames, as synthetic
records do (a row with fewer than 3 frames is bad). Frames of one sample that differ in size are
resized (PIL bilinear) to the first frame's size; imagery images keep their own sizes (each is
its own image to the model).

A bad row (a missing field, unreadable media, an answer that is not one of A-D, imagery that
does not match its markers) is skipped and counted, or raises `InputError` naming the file and
row: a sample is never written half right. Rows are numbered from 1: the line in a JSON lines
file, otherwise the position in reading order (for the DSR mapping layout, over all QA dicts).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from fourd_jax.data import records
from fourd_jax.data.qa.common import LETTERS
from fourd_jax.data.qa.dsr import ALL_SUBTASKS as DSR_SUBTASKS
from fourd_jax.data.qa.fourdthinker import DIRECTIONS as OBJECT_DIRECTIONS
from fourd_jax.data.qa.fourdthinker import DISTANCES as OBJECT_DISTANCES
from fourd_jax.data.qa.fourdthinker import SPEEDS as OBJECT_SPEEDS
from fourd_jax.data.sim.scene import CAMERA_MOVES
from fourd_jax.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
DEFAULT_MAX_FRAMES = {"4dthinker": 50, "dsr": 32, "dsr_bench": 32, "vlm4d": 32}

# Why a row was skipped: the keys of ImportStats.skipped.
MISSING_FIELD = "missing field"
BAD_FIELD = "bad field"
BAD_OPTIONS = "bad options"
BAD_ANSWER = "bad answer"
IMAGERY_COUNT = "imagery count mismatch"
UNREADABLE_MEDIA = "unreadable media"
TOO_FEW_FRAMES = "too few frames"
INVALID_JSON = "invalid json"

# Frame times are multiples of the stream's time base, converted to float; a frame meant to sit
# exactly on a sampling instant may land a hair before it.
_TIME_TOLERANCE = 1e-4
_OPTION_LINE = re.compile(r"^\s*([A-D])[.)]\s*(.*?)\s*$")
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTER_FIRST = re.compile(r"^([A-D])(?:\s*[.):]\s*|\s+|$)(.*)$", re.DOTALL)


class _BadRow(Exception):
    """A row that cannot become a correct sample; `reason` is the category counted in ImportStats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# --- statistics ---------------------------------------------------------------------------------


@dataclass
class ImportStats:
    """What an import did: rows read, samples written, and rows skipped per reason."""

    read: int = 0
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_problem: dict[str, str] = field(default_factory=dict)  # reason -> message of its first skipped row

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped row under `reason`, keeping the first message of each reason."""
        self.skipped[reason] += 1
        self.first_problem.setdefault(reason, message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line such as "read 10, written 8, skipped 2 (bad answer: 1, missing field: 1)"."""
        text = f"read {self.read}, written {self.written}, skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) + ")"
        return text


# --- media ----------------------------------------------------------------------------------------


def _check_sampling(fps: float, max_frames: int | None) -> None:
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, not {fps!r}.")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise InputError(f"max_frames must be a positive integer or None, not {max_frames!r}.")


def even_indices(count: int, max_frames: int | None) -> np.ndarray:
    """Indices of `max_frames` evenly spaced items out of `count` (all of them if not more),
    first and last included."""
    if max_frames is None or count <= max_frames:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, max_frames)).astype(np.int64)


def _same_size(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Frames stacked [T, H, W, 3]; any whose size differs from the first is resized to it."""
    height, width = frames[0].shape[:2]
    if all(f.shape[:2] == (height, width) for f in frames):
        return np.stack(frames)
    return np.stack([
        f if f.shape[:2] == (height, width)
        else np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR))
        for f in frames
    ])


def _read_video(path: Path, fps: float, max_frames: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`decode_video` with problems raised as _BadRow."""
    frames: list[np.ndarray] = []
    times: list[float] = []
    next_time = 0.0
    try:
        for elapsed, frame in _video_frames(path):
            if elapsed < next_time - _TIME_TOLERANCE:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(elapsed)
            # The next instant k / fps strictly after this frame: a slow video's frame may
            # cover several instants, but is taken once.
            next_time = (math.floor(elapsed * fps + _TIME_TOLERANCE) + 1) / fps
    except ValueError as e:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} cannot be decoded as a video ({type(e).__name__})") from None
    if not frames:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} holds no decodable video frames")
    keep = even_indices(len(frames), max_frames)
    return _same_size([frames[i] for i in keep]), np.asarray(times, np.float32)[keep]


def _video_frames(path: Path) -> Iterator[tuple[float, Any]]:
    """(seconds since the first frame, av.VideoFrame) for every frame of the video at `path`, in
    decoding order; problems raised as _BadRow."""
    import av

    if not path.is_file():
        raise _BadRow(UNREADABLE_MEDIA, f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _BadRow(UNREADABLE_MEDIA, f"{path} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            start = None
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else (index / float(rate) if rate else None)
                if time is None:
                    raise _BadRow(UNREADABLE_MEDIA, f"{path} frame {index} has no timestamp")
                start = time if start is None else start
                yield time - start, frame
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} cannot be decoded as a video ({type(e).__name__})") from None


def _read_video_uniform(path: Path, count: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """`count` frames sampled uniformly over the whole clip, as DSR Suite samples its 32 (SPEC 4).

    The frames kept are `even_indices(number of frames, count)` (all of them when the clip has no
    more than `count`: none is repeated); their times are rounded to 0.1 s. Two decoding passes:
    the first only counts frames, the second converts just the kept ones, so a long clip is never
    held in memory whole. Returns (frames, timestamps, sampling rate in frames per second).
    """
    times = [elapsed for elapsed, _ in _video_frames(path)]
    if not times:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} holds no decodable video frames")
    keep = even_indices(len(times), count)
    wanted = set(keep.tolist())
    frames: dict[int, np.ndarray] = {}
    try:
        for index, (_, frame) in enumerate(_video_frames(path)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= keep[-1]:
                break
    except ValueError as e:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} cannot be decoded as a video ({type(e).__name__})") from None
    if len(frames) != len(wanted):
        raise _BadRow(UNREADABLE_MEDIA, f"{path} gave {len(frames)} of its {len(wanted)} sampled frames when "
                                        f"decoded again")
    picked = np.asarray(times, np.float64)[keep]
    span = float(picked[-1] - picked[0])
    rate = (len(keep) - 1) / span if len(keep) > 1 and span > 0 else 1.0
    return _same_size([frames[i] for i in keep]), np.round(picked, 1).astype(np.float32), rate


def decode_video(path: str | Path, fps: float = 1.0, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and their times in seconds [T] of the video at `path`.

    Frames are picked for `fps` by their presentation time (measured from the first frame): the
    first frame, then the first frame at or after each k / fps. If more than `max_frames` remain,
    `max_frames` evenly spaced ones are kept. Every picked frame is held in memory before that cut.
    A missing or undecodable file raises InputError naming it.
    """
    _check_sampling(fps, max_frames)
    try:
        return _read_video(Path(path), fps, max_frames)
    except _BadRow as bad:
        raise InputError(f"{bad}.") from None


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _BadRow(UNREADABLE_MEDIA, f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _BadRow(UNREADABLE_MEDIA, f"{path} cannot be read as an image ({type(e).__name__})") from None


def _media_path(value: str) -> str:
    """The local relative path of a media reference: a URL maps to the part after a Hugging Face
    `/resolve/<revision>/`, or else to its whole path."""
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return value
    url_path = urlparse(value).path
    hub = re.search(r"/resolve/[^/]+/(.+)$", url_path)
    return hub.group(1) if hub else url_path.lstrip("/")


@dataclass
class _Media:
    """Reads the frames and images of rows, relative to `root`; the last decoded video is kept,
    since rows about one video usually follow each other."""

    root: Path
    fps: float
    max_frames: int | None
    # True: videos give `max_frames` frames sampled uniformly over the clip (DSR Suite, SPEC 4)
    # instead of frames at `fps`.
    uniform: bool = False
    _last_video: tuple[Path, np.ndarray, np.ndarray, float] | None = None

    def path(self, value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _BadRow(BAD_FIELD, f"field '{key}' must be a non-empty path string")
        path = Path(_media_path(value.strip())).expanduser()
        return path if path.is_absolute() else self.root / path

    def video(self, path: Path) -> tuple[np.ndarray, np.ndarray, float]:
        """(frames, timestamps, fps) of a video file."""
        if self._last_video is None or self._last_video[0] != path:
            if self.uniform:
                frames, timestamps, rate = _read_video_uniform(path, self.max_frames)
            else:
                (frames, timestamps), rate = _read_video(path, self.fps, self.max_frames), self.fps
            # Samples of one video share these arrays: read-only, so no sample can change another.
            frames.flags.writeable = timestamps.flags.writeable = False
            self._last_video = (path, frames, timestamps, rate)
        return self._last_video[1], self._last_video[2], self._last_video[3]

    def frame_list(self, values: Any, key: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(frames, timestamps, fps) of a released frame list (1 fps), cut to max_frames."""
        paths = self.paths(values, key, allow_empty=False)
        keep = even_indices(len(paths), self.max_frames)
        frames = _same_size([_read_image(paths[i]) for i in keep])
        return frames, keep.astype(np.float32), 1.0

    def images(self, values: Any, key: str) -> list[np.ndarray]:
        return [_read_image(p) for p in self.paths(values, key, allow_empty=True)]

    def paths(self, values: Any, key: str, allow_empty: bool) -> list[Path]:
        if not isinstance(values, list) or (not values and not allow_empty):
            raise _BadRow(BAD_FIELD, f"field '{key}' must be a non-empty list of paths")
        return [self.path(v, key) for v in values]

    def row_media(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float, str]:
        """Frames from the first of `frame_paths`, `video_path`, `video` in the row, and that key."""
        for key in ("frame_paths", "video_path", "video"):
            if row.get(key) is not None:
                if key == "frame_paths":
                    return (*self.frame_list(row[key], key), key)
                return (*self.video(self.path(row[key], key)), key)
        raise _BadRow(MISSING_FIELD, "field 'video_path' (or 'frame_paths') is missing")


# --- fields ---------------------------------------------------------------------------------------


def _required(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise _BadRow(MISSING_FIELD, f"field '{key}' is missing")
    return row[key]


def _text(row: dict[str, Any], key: str) -> str:
    value = _required(row, key)
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(BAD_FIELD, f"field '{key}' must be a non-empty string")
    return value.strip()


def _normalised(text: str) -> str:
    """Text compared case- and spacing-insensitively, without a trailing full stop."""
    return " ".join(str(text).split()).rstrip(".").casefold()


def _option_text(value: Any, letter: str, key: str) -> str:
    """An option without its own "A. " prefix; a prefix with another letter means misordered options."""
    if value is None or isinstance(value, dict | list):
        raise _BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' must be text or a number")
    text = str(value).strip()
    prefixed = _OPTION_LINE.match(text)
    if prefixed:
        if prefixed.group(1) != letter:
            raise _BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' is prefixed {prefixed.group(1)!r}")
        text = prefixed.group(2)
    if not text:
        raise _BadRow(BAD_OPTIONS, f"option {letter} in field '{key}' is empty")
    return text


def _letter(value: Any, options: Sequence[str], key: str) -> str:
    """The answer letter of "D", "D. Pan Right" (the text must then match option D) or an option's text."""
    text = str(value).strip() if isinstance(value, str | int | float) else ""
    letter_first = _LETTER_FIRST.match(text)
    if letter_first:
        letter, rest = letter_first.groups()
        if not rest.strip() or _normalised(rest) == _normalised(options[LETTERS.index(letter)]):
            return letter
    matches = [L for L, option in zip(LETTERS, options, strict=True) if _normalised(option) == _normalised(text)]
    if len(matches) == 1:
        return matches[0]
    raise _BadRow(BAD_ANSWER, f"field '{key}' holds {value!r}, which is not one of A-D or of the options")


def _qa_options(row: dict[str, Any]) -> list[str]:
    """The four options of a row in the raw QA layout (fields A, B, C, D)."""
    return [_option_text(_required(row, letter), letter, letter) for letter in LETTERS]


def split_text_input(text_input: str) -> tuple[str, list[str], str]:
    """(question, four options, text after them) of a 4DThinker `text_input`: the question, then
    lines "A. ..." to "D. ..." (the last such block; blank lines may sit between them)."""
    lines = text_input.splitlines()
    found = None
    for start, line in enumerate(lines):
        first = _OPTION_LINE.match(line)
        if not first or first.group(1) != "A":
            continue
        options, end = [first.group(2)], start
        for j in range(start + 1, len(lines)):
            if len(options) == 4:
                break
            if not lines[j].strip():
                continue
            nxt = _OPTION_LINE.match(lines[j])
            if not nxt or nxt.group(1) != LETTERS[len(options)]:
                break
            options.append(nxt.group(2))
            end = j
        if len(options) == 4:
            found = (start, end, options)
    if found is None:
        raise _BadRow(BAD_OPTIONS, "field 'text_input' has no four option lines starting 'A.' to 'D.'")
    start, end, options = found
    question = "\n".join(lines[:start]).strip()
    if not question:
        raise _BadRow(BAD_FIELD, "field 'text_input' has no question before its options")
    if not all(options):
        raise _BadRow(BAD_OPTIONS, "field 'text_input' has an empty option")
    return question, options, "\n".join(lines[end + 1:]).strip()


def _is_camera_move_combination(option: str) -> bool:
    moves = {_normalised(m) for m in CAMERA_MOVES}
    parts = re.split(r",\s*|\s+and\s+", _normalised(option))
    return all(part in moves for part in parts)


def infer_subtask(question: str, options: Sequence[str]) -> str:
    """The 4DThinker question family: "camera_motion", "object_direction", "object_speed",
    "object_distance", or "unknown".

    Rule: if all four options come from one family's released vocabulary (SPEC 3.6; camera
    options may combine moves as "X, Y and Z"), that family. Otherwise by words in the question,
    in this order: "speed" -> speed; "distance" -> distance; "camera" followed by a word of
    motion ("move", "moving", "movement", "motion") -> camera; "direction" -> direction.
    """
    normalised = [_normalised(o) for o in options]
    for subtask, vocabulary in (("object_direction", OBJECT_DIRECTIONS), ("object_speed", OBJECT_SPEEDS),
                                ("object_distance", OBJECT_DISTANCES)):
        if all(o in {_normalised(v) for v in vocabulary} for o in normalised):
            return subtask
    if all(_is_camera_move_combination(o) for o in options):
        return "camera_motion"
    words = question.casefold()
    if "speed" in words:
        return "object_speed"
    if "distance" in words:
        return "object_distance"
    if re.search(r"\bcamera\b.*\b(move|moves|moving|movement|motion)\b", words, re.DOTALL):
        return "camera_motion"
    if "direction" in words:
        return "object_direction"
    return "unknown"


# --- samples --------------------------------------------------------------------------------------


def _sample(*, sample_id: str, source: str, subtask: str, question: str, options: list[str], answer: str,
            frames: np.ndarray, timestamps: np.ndarray, fps: float, meta: dict[str, Any], trace: str = "",
            imagery: Iterable[np.ndarray] = (), shown_frames: Sequence[int] | None = None) -> dict[str, Any]:
    """A complete record (decoded form) with geometry marked unknown; every frame is shown unless
    `shown_frames` says which."""
    return {
        "schema_version": records.SCHEMA_VERSION,
        "sample_id": sample_id,
        "source": source,
        "family": source,
        "subtask": subtask,
        "frames": frames,
        "fps": float(fps),
        "timestamps": np.asarray(timestamps, np.float32),
        "shown_frames": list(range(len(frames))) if shown_frames is None else list(shown_frames),
        "question": question,
        "options": list(options),
        "answer": answer,
        "trace": trace,
        "imagery": list(imagery),
        "intrinsics": np.zeros((0, 0), np.float32),
        "cam_to_world": np.zeros((0, 4, 4), np.float32),
        "object_ids": [],
        "object_categories": [],
        "object_names": [],
        "object_centers": np.zeros((0, 0, 3), np.float32),
        "object_headings": np.zeros((0, 0, 3), np.float32),
        "target_objects": [],
        "meta": meta,
    }


@dataclass(frozen=True)
class _Row:
    number: int
    data: Any
    problem: str | None = None  # why the row could not even be parsed


@dataclass(frozen=True)
class _Source:
    """Where rows come from: the data file (named in ids and messages) and the media reader."""

    path: Path
    media: _Media

    def sample_id(self, source: str, row: dict[str, Any], id_key: str | None, number: int) -> str:
        original = row.get(id_key) if id_key else None
        return f"{source}:{self.path.stem}:{original if original is not None else number}"

    def meta(self, row: dict[str, Any], id_key: str | None, number: int, **extra: Any) -> dict[str, Any]:
        meta = {"source_file": self.path.name, "row": number, **extra}
        if id_key and row.get(id_key) is not None:
            meta["original_id"] = row[id_key]
        return meta


def _read_rows(path: Path) -> list[_Row]:
    """The rows of a JSON, JSON lines or parquet file."""
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path} is parquet, which needs pyarrow (pip install pyarrow).") from None
        return [_Row(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as whole:
        return _json_lines(path, text, whole)
    return [_Row(i + 1, v) for i, v in enumerate(value)] if isinstance(value, list) else [_Row(1, value)]


def _json_lines(path: Path, text: str, whole: json.JSONDecodeError) -> list[_Row]:
    rows: list[_Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_Row(number, json.loads(line)))
        except json.JSONDecodeError as e:
            if not rows:  # not even the first line parses: the file is neither format
                raise InputError(f"{path} is neither JSON nor JSON lines ({whole.msg} at line {whole.lineno})."
                                 ) from None
            rows.append(_Row(number, None, f"the line is not valid JSON ({e.msg})"))
    if not rows:
        raise InputError(f"{path} holds no rows.")
    return rows


def _samples(path: Path, rows: Iterable[_Row], build: Callable[[dict[str, Any], int], dict[str, Any]],
             skip_bad_records: bool, stats: ImportStats | None) -> Iterator[dict[str, Any]]:
    """Build a sample from each row; a bad row is counted in `stats` and skipped, or raises
    InputError naming the file and row. A repeated sample id gets "@<row>" appended."""
    stats = stats if stats is not None else ImportStats()
    seen: set[str] = set()
    for row in rows:
        stats.read += 1
        try:
            if row.problem:
                raise _BadRow(INVALID_JSON, row.problem)
            if not isinstance(row.data, dict):
                raise _BadRow(BAD_FIELD, f"the row is a JSON {type(row.data).__name__}, not an object")
            sample = build(row.data, row.number)
        except _BadRow as bad:
            message = f"{path} row {row.number}: {bad}."
            if not skip_bad_records:
                raise InputError(message) from None
            stats.skip(bad.reason, message)
            continue
        if sample["sample_id"] in seen:
            sample["sample_id"] += f"@{row.number}"
        seen.add(sample["sample_id"])
        yield sample


def _start(path: str | Path, root: str | Path | None, fps: float, max_frames: int | None,
           uniform: bool = False) -> _Source:
    _check_sampling(fps, max_frames)
    path = Path(path)
    return _Source(path, _Media(Path(root) if root is not None else path.parent, fps, max_frames, uniform))


def shown_for(subtask: str, num_frames: int) -> list[int]:
    """The frames a question shows: all, except that `*_dir_pred` withholds the last two sampled
    frames (it asks where an entity goes from frame T-3 to T-1, SPEC 4), as synthetic records do."""
    if not subtask.endswith("_dir_pred"):
        return list(range(num_frames))
    if num_frames < 3:
        raise _BadRow(TOO_FEW_FRAMES, f"a {subtask} question withholds the last two sampled frames, so it needs "
                                      f"at least 3, but the media gives {num_frames}")
    return list(range(num_frames - 2))


# --- 4DThinker ------------------------------------------------------------------------------------


def _4dthinker_sft(src: _Source, row: dict[str, Any], number: int, layout: str = "sft") -> dict[str, Any]:
    question, options, suffix = split_text_input(_text(row, "text_input"))
    trace = _text(row, "text_output")
    answers = _ANSWER_SPAN.findall(trace)
    if not answers:
        raise _BadRow(BAD_ANSWER, "field 'text_output' has no <answer>...</answer>")
    answer = _letter(answers[-1], options, "text_output")
    markers = trace.count("<output_image>")
    image_output = row.get("image_output") or []
    if isinstance(image_output, list) and len(image_output) != markers:
        raise _BadRow(IMAGERY_COUNT, f"field 'text_output' has {markers} <output_image> markers but "
                                     f"'image_output' lists {len(image_output)} images")
    if row.get("image_input") is not None:  # the released layout: paths of the 1 fps frames
        frames, timestamps, fps = src.media.frame_list(row["image_input"], "image_input")
    elif any(row.get(k) is not None for k in ("video", "video_path", "frame_paths")):  # a video, as RL rows
        frames, timestamps, fps, _ = src.media.row_media(row)
    else:
        raise _BadRow(MISSING_FIELD, "field 'image_input' (or 'video') is missing")
    imagery = src.media.images(image_output, "image_output")
    meta = src.meta(row, "id", number, format=layout)
    if suffix:
        meta["text_after_options"] = suffix
    return _sample(sample_id=src.sample_id("4dthinker", row, "id", number), source="4dthinker",
                   subtask=infer_subtask(question, options), question=question, options=options, answer=answer,
                   frames=frames, timestamps=timestamps, fps=fps, trace=trace, imagery=imagery, meta=meta)


_PLACEHOLDER = re.compile(r"<(?:video|image)>\s*")


def _conversation_as_sft(row: dict[str, Any]) -> dict[str, Any]:
    """A `conversations` row ([{"from": "human", "value": "<video>..."}, {"from": "gpt", ...}]) in
    the SFT fields: the first human turn (media placeholders removed) is `text_input`, the first
    model turn after it `text_output`; media and imagery keys are kept."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _BadRow(BAD_FIELD, "field 'conversations' must be a list of {\"from\", \"value\"} turns")
    speakers = [str(t.get("from", t.get("role", ""))).lower() for t in turns]
    try:
        asked = next(i for i, who in enumerate(speakers) if who in ("human", "user"))
        answered = next(i for i in range(asked + 1, len(turns)) if speakers[i] in ("gpt", "assistant"))
    except StopIteration:
        raise _BadRow(BAD_FIELD, "field 'conversations' has no human turn followed by a gpt turn") from None
    text = lambda turn: turn.get("value", turn.get("content"))  # noqa: E731
    if not isinstance(text(turns[asked]), str) or not isinstance(text(turns[answered]), str):
        raise _BadRow(BAD_FIELD, "field 'conversations' has a turn whose value is not a string")
    return {**{k: v for k, v in row.items() if k != "conversations"},
            "text_input": _PLACEHOLDER.sub("", text(turns[asked])), "text_output": text(turns[answered])}


def _qa_row(src: _Source, row: dict[str, Any], number: int, source: str, subtask: str | None) -> dict[str, Any]:
    """A sample from the raw QA layout (4DThinker RL rows, DSR raw QA); subtask None: inferred."""
    question, options = _text(row, "Question"), _qa_options(row)
    answer = _letter(_required(row, "Correct"), options, "Correct")
    frames, timestamps, fps, media_key = src.media.row_media(row)
    meta = src.meta(row, "id", number, **{media_key: row[media_key]})
    if source == "4dthinker":
        meta["format"] = "rl"
    subtask = subtask or infer_subtask(question, options)
    return _sample(sample_id=src.sample_id(source, row, "id", number), source=source, subtask=subtask,
                   question=question, options=options, answer=answer, frames=frames, timestamps=timestamps, fps=fps,
                   meta=meta, shown_frames=shown_for(subtask, len(frames)))


def import_4dthinker(jsonl_path: str | Path, root: str | Path | None = None,
                     max_frames: int | None = DEFAULT_MAX_FRAMES["4dthinker"], *, fps: float = 1.0,
                     skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a 4DThinker JSON lines file of SFT rows (`text_input`, `text_output`, frames in
    `image_input` or a video in `video` / `video_path`, `image_output`), the same rows as
    `conversations` (human turn with `<video>`, gpt turn with the trace), and/or RL rows
    (`Question`, ...). SFT rows keep the trace and `image_output` as imagery.

    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = _start(jsonl_path, root, fps, max_frames)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        if "conversations" in row:
            return _4dthinker_sft(src, _conversation_as_sft(row), number, layout="conversations")
        if "text_input" in row:
            return _4dthinker_sft(src, row, number)
        if "Question" in row:
            return _qa_row(src, row, number, "4dthinker", None)
        raise _BadRow(MISSING_FIELD, "field 'text_input' (SFT) or 'Question' (RL) is missing")

    yield from _samples(src.path, _read_rows(src.path), build, skip_bad_records, stats)


# --- DSR ------------------------------------------------------------------------------------------


def _dsr_subtask(value: Any, key: str) -> str:
    if value not in DSR_SUBTASKS:
        raise _BadRow(BAD_FIELD, f"field '{key}' holds {value!r}, which is not one of the 13 DSR sub-tasks")
    return value


def _dsr_rows(rows: list[_Row]) -> list[_Row]:
    """Rows of a raw DSR file: a mapping layout (video path -> QA dicts) becomes one row per QA dict,
    with the video under `video` unless the QA dict names its own media."""
    if len(rows) != 1 or not isinstance(rows[0].data, dict) or "Question" in rows[0].data:
        return rows
    flat = []
    for video, qas in rows[0].data.items():
        for qa in qas if isinstance(qas, list) else [qas]:
            if isinstance(qa, dict) and not any(k in qa for k in ("frame_paths", "video_path", "video")):
                qa = {**qa, "video": video}
            flat.append(_Row(len(flat) + 1, qa))
    return flat


def import_dsr(json_path: str | Path, video_root: str | Path | None = None,
               max_frames: int | None = DEFAULT_MAX_FRAMES["dsr"], *, fps: float = 1.0,
               skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a raw DSR QA file (the two layouts in the module docstring); `Type` is the sub-task.

    Videos give `max_frames` (32) frames sampled uniformly over the clip, times rounded to 0.1 s
    (`fps` is not used for them); frame lists give `max_frames` evenly spaced frames. `*_dir_pred`
    questions show all but the last two of them (`shown_for`).
    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = _start(json_path, video_root, fps, max_frames, uniform=True)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        return _qa_row(src, row, number, "dsr", _dsr_subtask(_required(row, "Type"), "Type"))

    yield from _samples(src.path, _dsr_rows(_read_rows(src.path)), build, skip_bad_records, stats)


def _bench_options(value: Any) -> list[str]:
    if isinstance(value, str):  # table exports store the list as its JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadRow(BAD_OPTIONS, "field 'options' is text that is not a JSON list") from None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise _BadRow(BAD_OPTIONS, "field 'options' must be a list of 4 options")
    return [_option_text(v, letter, "options") for letter, v in zip(LETTERS, value, strict=True)]


def _bench_video(media: _Media, video_id: Any) -> Path:
    path = media.path(video_id, "videoID")
    if path.is_file():
        return path
    for suffix in VIDEO_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise _BadRow(UNREADABLE_MEDIA, f"no video file {path}[{'|'.join(VIDEO_SUFFIXES)}] exists for field 'videoID'")


def import_dsr_bench(path: str | Path, video_root: str | Path | None = None,
                     max_frames: int | None = DEFAULT_MAX_FRAMES["dsr_bench"], *, fps: float = 1.0,
                     skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from DSR-Bench rows (JSON, JSON lines or parquet); `type` is the sub-task.

    Each video gives `max_frames` (32) frames sampled uniformly over the clip, times rounded to
    0.1 s (`fps` is not used); `*_dir_pred` questions show all but the last two (`shown_for`).
    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = _start(path, video_root, fps, max_frames, uniform=True)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        question, options = _text(row, "question"), _bench_options(_required(row, "options"))
        answer = _letter(_required(row, "answer"), options, "answer")
        subtask = _dsr_subtask(_required(row, "type"), "type")
        frames, timestamps, fps_used = src.media.video(_bench_video(src.media, _required(row, "videoID")))
        return _sample(sample_id=src.sample_id("dsr", row, None, number), source="dsr", subtask=subtask,
                       question=question, options=options, answer=answer, frames=frames, timestamps=timestamps,
                       fps=fps_used, meta=src.meta(row, None, number, videoID=row["videoID"]),
                       shown_frames=shown_for(subtask, len(frames)))

    yield from _samples(src.path, _read_rows(src.path), build, skip_bad_records, stats)


# --- VLM4D ----------------------------------------------------------------------------------------


def _vlm4d_choices(value: Any) -> tuple[list[str], list[str]]:
    """(options, the raw choice texts as str()) of a VLM4D `choices` map with keys A-D."""
    if not isinstance(value, dict) or sorted(value) != list(LETTERS):
        raise _BadRow(BAD_OPTIONS, "field 'choices' must map exactly the keys A, B, C and D")
    raw = [str(value[letter]) for letter in LETTERS]
    return [_option_text(value[letter], letter, "choices") for letter in LETTERS], raw


def import_vlm4d(json_path: str | Path, video_root: str | Path | None = None,
                 max_frames: int | None = DEFAULT_MAX_FRAMES["vlm4d"], *, fps: float = 1.0,
                 skip_bad_records: bool = False, stats: ImportStats | None = None) -> Iterator[dict[str, Any]]:
    """Samples from a VLM4D QA file. The answer letter is the one choice whose text equals
    `answer` (both compared as str(), spaces at the ends ignored); none or several is a bad row.

    Bad rows raise InputError, or with `skip_bad_records` are skipped and counted in `stats`.
    """
    src = _start(json_path, video_root, fps, max_frames)

    def build(row: dict[str, Any], number: int) -> dict[str, Any]:
        question, subtask = _text(row, "question"), _text(row, "question_type")
        options, raw_choices = _vlm4d_choices(_required(row, "choices"))
        answer_text = str(_required(row, "answer")).strip()
        letters = [L for L, choice in zip(LETTERS, raw_choices, strict=True) if choice.strip() == answer_text]
        if len(letters) != 1:
            raise _BadRow(BAD_ANSWER, f"field 'answer' {answer_text!r} equals {len(letters)} of the choices, not one")
        frames, timestamps, fps_used = src.media.video(src.media.path(_required(row, "video"), "video"))
        meta = src.meta(row, "id", number, video=row["video"], answer_text=answer_text)
        return _sample(sample_id=src.sample_id("vlm4d", row, "id", number), source="vlm4d", subtask=subtask,
                       question=question, options=options, answer=letters[0], frames=frames,
                       timestamps=timestamps, fps=fps_used, meta=meta)

    yield from _samples(src.path, _read_rows(src.path), build, skip_bad_records, stats)


# --- writing --------------------------------------------------------------------------------------

IMPORTERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "4dthinker": import_4dthinker,
    "dsr": import_dsr,
    "dsr_bench": import_dsr_bench,
    "vlm4d": import_vlm4d,
}


def import_to_records(fmt: str, src: str | Path, out_path: str | Path, *, root: str | Path | None = None,
                      max_frames: int | None = None, fps: float = 1.0,
                      skip_bad_records: bool = True) -> ImportStats:
    """Import `src` in format `fmt` (a key of IMPORTERS) into one ArrayRecord file at `out_path`.

    `max_frames` None means the format's default (DEFAULT_MAX_FRAMES). Bad rows are skipped and
    counted, or with `skip_bad_records=False` raise InputError naming the file and row (the output
    file is then not created).
    """
    if fmt not in IMPORTERS:
        raise InputError(f"import format {fmt!r} is unknown; use one of {', '.join(IMPORTERS)}.")
    stats = ImportStats()
    samples = IMPORTERS[fmt](src, root, DEFAULT_MAX_FRAMES[fmt] if max_frames is None else max_frames, fps=fps,
                             skip_bad_records=skip_bad_records, stats=stats)
    stats.written = records.write(out_path, samples)
    return stats
