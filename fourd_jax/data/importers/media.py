"""The frames and images of rows: PyAV video decoding, frame sampling, media paths, images.

Relative paths resolve against a root (by default the data file's directory); a URL maps to the
part after a Hugging Face `/resolve/<revision>/`, or else to its whole path, under that root
(nothing is downloaded). Videos are decoded at `fps` (`decode_video`); frame lists are taken as
released, at 1 fps. Either is cut to `max_frames` evenly spaced frames. With `uniform` (DSR and
DSR-Bench), videos instead give `max_frames` frames sampled uniformly over the whole clip, times
rounded to 0.1 s, as DSR Suite samples them (SPEC 4). Frames of one sample that differ in size
are resized (PIL bilinear) to the first frame's size; imagery images keep their own sizes (each
is its own image to the model). Problems are raised as `BadRow`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from fourd_jax.data.importers.rows import BAD_FIELD, MISSING_FIELD, UNREADABLE_MEDIA, BadRow
from fourd_jax.errors import InputError

# Frame times are multiples of the stream's time base, converted to float; a frame meant to sit
# exactly on a sampling instant may land a hair before it.
_TIME_TOLERANCE = 1e-4


def check_sampling(fps: float, max_frames: int | None) -> None:
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


def _undecodable(path: Path, error: Exception) -> BadRow:
    return BadRow(UNREADABLE_MEDIA, f"{path} cannot be decoded as a video ({type(error).__name__})")


def _read_video(path: Path, fps: float, max_frames: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`decode_video` with problems raised as BadRow."""
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
        raise _undecodable(path, e) from None
    if not frames:
        raise BadRow(UNREADABLE_MEDIA, f"{path} holds no decodable video frames")
    keep = even_indices(len(frames), max_frames)
    return _same_size([frames[i] for i in keep]), np.asarray(times, np.float32)[keep]


def _video_frames(path: Path) -> Iterator[tuple[float, Any]]:
    """(seconds since the first frame, av.VideoFrame) for every frame of the video at `path`, in
    decoding order; problems raised as BadRow."""
    import av  # local: heavy (FFmpeg bindings), and only videos need it

    if not path.is_file():
        raise BadRow(UNREADABLE_MEDIA, f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadRow(UNREADABLE_MEDIA, f"{path} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            start = None
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else (index / float(rate) if rate else None)
                if time is None:
                    raise BadRow(UNREADABLE_MEDIA, f"{path} frame {index} has no timestamp")
                start = time if start is None else start
                yield time - start, frame
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _undecodable(path, e) from None


def _read_video_uniform(path: Path, count: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """`count` frames sampled uniformly over the whole clip, as DSR Suite samples its 32 (SPEC 4).

    The frames kept are `even_indices(number of frames, count)` (all of them when the clip has no
    more than `count`: none is repeated); their times are rounded to 0.1 s. Two decoding passes:
    the first only counts frames, the second converts just the kept ones, so a long clip is never
    held in memory whole. Returns (frames, timestamps, sampling rate in frames per second).
    """
    times = [elapsed for elapsed, _ in _video_frames(path)]
    if not times:
        raise BadRow(UNREADABLE_MEDIA, f"{path} holds no decodable video frames")
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
        raise _undecodable(path, e) from None
    if len(frames) != len(wanted):
        raise BadRow(UNREADABLE_MEDIA, f"{path} gave {len(frames)} of its {len(wanted)} sampled frames when "
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
    check_sampling(fps, max_frames)
    try:
        return _read_video(Path(path), fps, max_frames)
    except BadRow as bad:
        raise InputError(f"{bad}.") from None


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BadRow(UNREADABLE_MEDIA, f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRow(UNREADABLE_MEDIA, f"{path} cannot be read as an image ({type(e).__name__})") from None


def _media_path(value: str) -> str:
    """The local relative path of a media reference: a URL maps to the part after a Hugging Face
    `/resolve/<revision>/`, or else to its whole path."""
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return value
    url_path = urlparse(value).path
    hub = re.search(r"/resolve/[^/]+/(.+)$", url_path)
    return hub.group(1) if hub else url_path.lstrip("/")


@dataclass
class Media:
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
            raise BadRow(BAD_FIELD, f"field '{key}' must be a non-empty path string")
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
            raise BadRow(BAD_FIELD, f"field '{key}' must be a non-empty list of paths")
        return [self.path(v, key) for v in values]

    def row_media(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float, str]:
        """Frames from the first of `frame_paths`, `video_path`, `video` in the row, and that key."""
        for key in ("frame_paths", "video_path", "video"):
            if row.get(key) is not None:
                if key == "frame_paths":
                    return (*self.frame_list(row[key], key), key)
                return (*self.video(self.path(row[key], key)), key)
        raise BadRow(MISSING_FIELD, "field 'video_path' (or 'frame_paths') is missing")
