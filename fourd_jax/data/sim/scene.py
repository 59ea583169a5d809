"""Procedural 4D scenes: objects with exact trajectories seen by a moving pinhole camera.

Conventions (also in docs/DATA.md):
- World: right-handed, metres, z up; the ground is the plane z = 0.
- Camera: OpenCV axes (x right, y down, z forward); `cam_to_world[t]` maps camera coordinates to
  world coordinates; `intrinsics` is K in pixels with pixel centres at (u + 0.5, v + 0.5).
- Objects: `centers[n, t]` is the world centre of object n's bounding volume at frame t;
  `headings[n, t]` its forward direction, a unit vector (horizontal for ground objects).
- Camera movements (SPEC 3.6), all relative to the camera's pose at the first frame:
  Pan Left/Right turn the view about the world z axis, Tilt Up/Down raise or lower it, Roll
  Clockwise/Counter-Clockwise rotate it about the optical axis (clockwise as seen from behind
  the camera), Dolly In/Out move along the viewing direction projected onto the ground, Truck
  Left/Right move along the camera's horizontal right axis, Pedestal Up/Down move along world z.

Everything is a pure function of a `numpy.random.Generator`, so a seed fixes a scene exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fourd_jax.data.taxonomy import CAMERA_MOVES, MOVE_EFFECT
from fourd_jax.errors import InputError

ROTATION_PARAMS = ("yaw", "pitch", "roll")  # MOVE_EFFECT parameters in degrees; the others in metres
MIN_CAMERA_HEIGHT = 0.8  # metres; camera heights start in [1.8, 3.0]

# Categories: shape and (length along heading, width, height) ranges in metres.
# A "car" is a box whose front face is painted, so its facing direction is visible.
CATEGORIES = {
    "cube": ("box", (0.5, 0.9), None, None),
    "crate": ("box", (0.6, 1.0), (0.4, 0.7), (0.4, 0.7)),
    "ball": ("sphere", (0.4, 0.8), None, None),
    "balloon": ("sphere", (0.4, 0.6), None, None),
    "barrel": ("cylinder", (0.4, 0.7), None, (0.6, 1.0)),
    "pillar": ("cylinder", (0.3, 0.4), None, (1.2, 1.8)),
    "toy car": ("car", (0.9, 1.3), (0.5, 0.7), (0.4, 0.6)),
    "robot": ("car", (0.5, 0.7), (0.5, 0.7), (0.8, 1.1)),
}
FLYING = ("balloon",)
COLORS = {
    "red": (205, 45, 40), "green": (50, 160, 70), "blue": (45, 85, 200), "yellow": (225, 200, 50),
    "purple": (140, 70, 170), "orange": (235, 130, 40), "cyan": (50, 185, 200), "pink": (225, 120, 170),
    "brown": (130, 85, 50), "white": (235, 235, 235),
}
FRONT_COLOR = (25, 25, 25)  # the painted front face of cars and robots

# Speed profiles of moving objects (ground movers); "turning" keeps a constant speed.
MOTIONS = ("constant", "accelerating", "decelerating", "accel_decel", "decel_accel", "varying", "turning")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: what it looks like and how it moves (its trajectory is in `Scene`)."""

    object_id: int
    category: str
    shape: str  # box | sphere | cylinder | car
    color_name: str
    color: tuple[int, int, int]
    size: tuple[float, float, float]  # (length along heading, width, height)
    motion: str  # "static", "flying" or one of MOTIONS

    @property
    def name(self) -> str:
        return f"{self.color_name} {self.category}"

    @property
    def has_front(self) -> bool:
        return self.shape == "car"


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Ranges a scene is drawn from."""

    num_frames: int = 16
    fps: float = 2.0
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    horizontal_fov_deg: float = 60.0
    min_objects: int = 2
    max_objects: int = 6
    static_probability: float = 0.35
    flying_probability: float = 0.1
    speed_range: tuple[float, float] = (0.25, 0.7)  # m/s
    camera_moving_probability: float = 0.85
    max_camera_moves: int = 3
    # The moves a camera may make (a subset of CAMERA_MOVES); each scene combines up to
    # max_camera_moves of them on different parameters.
    camera_moves: tuple[str, ...] = CAMERA_MOVES
    rotation_range_deg: tuple[float, float] = (15.0, 35.0)
    translation_range: tuple[float, float] = (0.8, 2.0)  # metres
    arena_half_size: float = 2.5  # objects start within [-a, a]^2

    def __post_init__(self) -> None:
        problems = []
        if self.num_frames < 2:
            problems.append(f"num_frames {self.num_frames} must be at least 2 (a video shows motion)")
        if self.fps <= 0:
            problems.append(f"fps {self.fps} must be positive")
        if min(self.image_size) < 1:
            problems.append(f"image_size {self.image_size} must be positive")
        if not 1 <= self.min_objects <= self.max_objects <= len(COLORS):
            problems.append(f"objects per scene [{self.min_objects}, {self.max_objects}] must lie within "
                            f"[1, {len(COLORS)}] (each object has its own colour)")
        for name in ("static_probability", "flying_probability", "camera_moving_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} {getattr(self, name)} must be within [0, 1]")
        unknown = [m for m in self.camera_moves if m not in CAMERA_MOVES]
        if unknown or not self.camera_moves:
            problems.append(f"camera_moves {list(self.camera_moves)} must be a non-empty subset of "
                            f"{list(CAMERA_MOVES)}")
        elif not 1 <= self.max_camera_moves <= len({MOVE_EFFECT[m][0] for m in self.camera_moves}):
            problems.append(f"max_camera_moves {self.max_camera_moves} must lie within [1, the "
                            f"{len({MOVE_EFFECT[m][0] for m in self.camera_moves})} parameters camera_moves move]")
        if problems:
            raise InputError("Invalid scene config: " + "; ".join(problems) + ".")


@dataclasses.dataclass(frozen=True)
class Scene:
    """A complete scene: everything needed to render it and to answer questions about it."""

    seed: int
    fps: float
    image_size: tuple[int, int]
    intrinsics: np.ndarray  # [3, 3]
    cam_to_world: np.ndarray  # [T, 4, 4]
    camera_moves: tuple[tuple[str, float], ...]  # ((move, magnitude in deg or m), ...)
    objects: tuple[SceneObject, ...]
    centers: np.ndarray  # [N, T, 3]
    headings: np.ndarray  # [N, T, 3]
    floor_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    tile_size: float  # metres

    @property
    def num_frames(self) -> int:
        return self.cam_to_world.shape[0]

    @property
    def timestamps(self) -> np.ndarray:
        return np.arange(self.num_frames) / self.fps

    @property
    def camera_centers(self) -> np.ndarray:
        return self.cam_to_world[:, :3, 3]


def camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation [3, 3] (columns: camera x right, y down, z forward) from angles in
    radians: yaw about world z (0 looks along +x), pitch up from the ground plane, roll clockwise
    about the optical axis as seen from behind."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right0 = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down0 = np.cross(forward, right0)
    right = np.cos(roll) * right0 + np.sin(roll) * down0
    down = -np.sin(roll) * right0 + np.cos(roll) * down0
    return np.stack([right, down, forward], axis=1)


def intrinsics_for(image_size: tuple[int, int], horizontal_fov_deg: float) -> np.ndarray:
    h, w = image_size
    f = (w / 2) / np.tan(np.radians(horizontal_fov_deg) / 2)
    return np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])


def sample_camera_moves(rng: np.random.Generator, config: SceneConfig) -> tuple[tuple[str, float], ...]:
    """0 to max_camera_moves moves of config.camera_moves on different parameters (never a move
    with its opposite)."""
    if rng.random() >= config.camera_moving_probability:
        return ()
    count = int(rng.integers(1, config.max_camera_moves + 1))
    params = rng.permutation(sorted({MOVE_EFFECT[m][0] for m in config.camera_moves}))[:count]
    moves = []
    for param in params:
        options = sorted(m for m in config.camera_moves if MOVE_EFFECT[m][0] == param)
        move = options[int(rng.integers(len(options)))]
        lo, hi = config.rotation_range_deg if param in ROTATION_PARAMS else config.translation_range
        moves.append((move, round(float(rng.uniform(lo, hi)), 3)))
    return tuple(sorted(moves, key=lambda m: CAMERA_MOVES.index(m[0])))


def camera_path(
    moves: tuple[tuple[str, float], ...], position: np.ndarray, yaw: float, pitch: float, num_frames: int
) -> np.ndarray:
    """cam_to_world [T, 4, 4]: each move applied linearly in time from the first pose."""
    s = np.linspace(0.0, 1.0, num_frames)
    delta = {p: 0.0 for p in ("yaw", "pitch", "roll", "forward", "right", "up")}
    for move, magnitude in moves:
        param, sign = MOVE_EFFECT[move]
        delta[param] += sign * magnitude
    forward_h = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right_h = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    for t in range(num_frames):
        poses[t, :3, :3] = camera_rotation(
            yaw + np.radians(delta["yaw"]) * s[t], pitch + np.radians(delta["pitch"]) * s[t],
            np.radians(delta["roll"]) * s[t])
        poses[t, :3, 3] = (position + s[t] * (delta["forward"] * forward_h + delta["right"] * right_h)
                           + np.array([0.0, 0.0, delta["up"] * s[t]]))
    return poses


def speed_profile(motion: str, speed: float, tau: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Speed (m/s) at normalised times tau in [0, 1] for a named profile."""
    if motion in ("constant", "turning", "flying"):
        return np.full_like(tau, speed)
    if motion == "accelerating":
        return speed * (0.3 + 1.7 * tau)
    if motion == "decelerating":
        stop = rng.uniform(0.55, 0.8)
        return speed * 1.6 * np.clip(1.0 - tau / stop, 0.0, None)
    if motion == "accel_decel":
        return speed * (0.2 + 1.6 * (1.0 - np.abs(2.0 * tau - 1.0)))
    if motion == "decel_accel":
        return speed * (0.2 + 1.6 * np.abs(2.0 * tau - 1.0))
    if motion == "varying":
        periods = rng.uniform(2.0, 3.0)
        return speed * (1.0 + 0.75 * np.sin(2.0 * np.pi * periods * tau + rng.uniform(0, 2 * np.pi)))
    raise ValueError(f"unknown motion {motion!r}")


def object_trajectory(
    obj: SceneObject, start: np.ndarray, yaw: float, speed: float, num_frames: int, fps: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(centers [T, 3], headings [T, 3]) by integrating the speed profile along the heading."""
    duration = (num_frames - 1) / fps
    steps = 8 * (num_frames - 1)  # fine integration, sampled at frame times
    tau = np.linspace(0.0, 1.0, steps + 1)
    dt = duration / steps
    if obj.motion == "static":
        heading = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        return np.tile(start, (num_frames, 1)), np.tile(heading, (num_frames, 1))
    if obj.motion == "flying":
        climb = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
        direction = np.array([np.cos(yaw), np.sin(yaw), climb])
        direction /= np.linalg.norm(direction)
        path = start + np.outer(tau * duration * speed, direction)
        headings = np.tile(direction, (steps + 1, 1))
    else:
        v = speed_profile(obj.motion, speed, tau, rng)
        turn_rate = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.5) if obj.motion == "turning" else 0.0
        yaws = yaw + turn_rate * tau * duration
        headings = np.stack([np.cos(yaws), np.sin(yaws), np.zeros_like(yaws)], axis=1)
        step = (v[:-1, None] + v[1:, None]) / 2 * dt * headings[:-1]
        path = start + np.concatenate([np.zeros((1, 3)), np.cumsum(step, axis=0)])
    idx = np.arange(num_frames) * 8
    return path[idx], headings[idx]


def sample_objects(rng: np.random.Generator, config: SceneConfig) -> list[SceneObject]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    colors = rng.permutation(sorted(COLORS))[:count]
    categories = sorted(CATEGORIES)
    objects = []
    for i, color in enumerate(colors):
        category = categories[int(rng.integers(len(categories)))]
        shape, length, width, height = CATEGORIES[category]
        lo_hi = lambda r: float(rng.uniform(*r))  # noqa: E731
        size_l = lo_hi(length)
        size = (size_l, lo_hi(width) if width else size_l, lo_hi(height) if height else size_l)
        if category in FLYING:
            motion = "flying"
        elif rng.random() < config.static_probability:
            motion = "static"
        else:
            motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        objects.append(SceneObject(i, category, shape, str(color), COLORS[str(color)],
                                   tuple(round(x, 3) for x in size), motion))
    return objects


def sample_scene(seed: int, config: SceneConfig = SceneConfig()) -> Scene:
    """A random scene, fully determined by `seed` and `config`."""
    rng = np.random.default_rng(seed)
    objects = sample_objects(rng, config)
    starts = _separated_starts(rng, len(objects), config.arena_half_size, min_gap=1.2)
    centers, headings = [], []
    for obj, (x, y) in zip(objects, starts, strict=True):
        z = obj.size[2] / 2 + (rng.uniform(0.8, 1.5) if obj.motion == "flying" else 0.0)
        yaw = float(rng.uniform(-np.pi, np.pi))
        speed = float(rng.uniform(*config.speed_range))
        c, h = object_trajectory(obj, np.array([x, y, z]), yaw, speed, config.num_frames, config.fps, rng)
        centers.append(c)
        headings.append(h)
    # Camera: 6-8 m from the arena centre, 1.8-3 m high, looking at the centre, slightly down.
    cam_yaw = float(rng.uniform(-np.pi, np.pi))
    distance, height = float(rng.uniform(6.0, 8.0)), float(rng.uniform(1.8, 3.0))
    position = np.array([-distance * np.cos(cam_yaw), -distance * np.sin(cam_yaw), height])
    pitch = -float(np.arctan2(height - 0.5, distance))
    # Pedestal Down never takes the camera below MIN_CAMERA_HEIGHT (it would look at the floor from under it).
    moves = tuple((m, min(v, round(height - MIN_CAMERA_HEIGHT, 3)) if m == "Pedestal Down" else v)
                  for m, v in sample_camera_moves(rng, config))
    floor = _floor_colors(rng)
    return Scene(
        seed=seed, fps=config.fps, image_size=config.image_size,
        intrinsics=_float32_exact(intrinsics_for(config.image_size, config.horizontal_fov_deg)),
        cam_to_world=_float32_exact(camera_path(moves, position, cam_yaw, pitch, config.num_frames)),
        camera_moves=moves, objects=tuple(objects), centers=_float32_exact(np.stack(centers)),
        headings=_float32_exact(np.stack(headings)), floor_colors=floor, tile_size=float(rng.choice([0.5, 1.0])),
    )


def _float32_exact(values: np.ndarray) -> np.ndarray:
    """float64 values that float32 holds exactly. Records store the geometry as float32; rendering
    and every answer use these same values, so the stored geometry reproduces each key exactly."""
    return np.asarray(values, np.float32).astype(np.float64)


def _separated_starts(rng: np.random.Generator, n: int, half: float, min_gap: float) -> np.ndarray:
    points: list[np.ndarray] = []
    while len(points) < n:
        p = rng.uniform(-half, half, size=2)
        if all(np.linalg.norm(p - q) >= min_gap for q in points):
            points.append(p)
    return np.array(points)


def _floor_colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    base = rng.integers(90, 150)
    tint = rng.integers(-15, 16, size=3)
    light = tuple(int(np.clip(base + 45 + t, 0, 255)) for t in tint)
    dark = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    return light, dark


def world_to_camera(scene: Scene, t: int, points: np.ndarray) -> np.ndarray:
    """World points [..., 3] in camera-t coordinates (OpenCV axes)."""
    pose = scene.cam_to_world[t]
    return (points - pose[:3, 3]) @ pose[:3, :3]


def project(scene: Scene, t: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [..., 2] and depth [...] of world points seen from frame t."""
    cam = world_to_camera(scene, t, points)
    uvw = cam @ scene.intrinsics.T
    return uvw[..., :2] / uvw[..., 2:3], cam[..., 2]
