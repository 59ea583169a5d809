"""Keys re-derived from geometry, independently of fourd_jax.data.qa's code, for the question tests.

Every function reads only a scene's geometry (`cam_to_world` [T, 4, 4], `centers` / `headings`
[N, T, 3], `objects[i].object_id`, `num_frames`) and, for DSR, which entities, frames and agent
time a question is about (its `meta`). `RecordScene` gives a stored record that shape, so the
same checks run on the simulator's in-memory scenes and on the records read back from disk.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np

from fourd_jax.data.qa.dsr_describe import describe_directions, describe_magnitudes, describe_speed_comparison


@dataclasses.dataclass
class RecordScene:
    """The stored geometry of a decoded record, in the attributes the checks below read."""

    record: dict

    @property
    def cam_to_world(self):
        return self.record["cam_to_world"].astype(np.float64)

    @property
    def centers(self):
        return self.record["object_centers"].astype(np.float64)

    @property
    def headings(self):
        return self.record["object_headings"].astype(np.float64)

    @property
    def objects(self):
        return [SimpleNamespace(object_id=i) for i in self.record["object_ids"]]

    @property
    def num_frames(self):
        return len(self.record["frames"])


SPEED_OF_MOTION = {
    "constant": "Maintaining a Constant Speed", "turning": "Maintaining a Constant Speed",
    "flying": "Maintaining a Constant Speed", "accelerating": "Speeding Up", "decelerating": "Slowing Down",
    "accel_decel": "First Speeding Up, Then Slowing Down", "decel_accel": "First Slowing Down, Then Speeding Up",
    "varying": "Moving at Varying Speeds",
}


def moves_from_poses(poses: np.ndarray) -> set[str]:
    """Camera moves recovered from the first and last pose only (not from the scene's labels)."""
    (r0, _, f0), (r1, _, f1) = (poses[0, :3, :3].T, poses[-1, :3, :3].T)
    found = set()
    yaw = np.degrees(np.arctan2(f1[1], f1[0]) - np.arctan2(f0[1], f0[0]))
    yaw = (yaw + 180) % 360 - 180
    pitch = np.degrees(np.arcsin(f1[2]) - np.arcsin(f0[2]))

    def roll(r, f):
        level_right = np.array([f[1], -f[0], 0.0]) / np.hypot(f[0], f[1])
        level_down = np.cross(f, level_right)
        return np.degrees(np.arctan2(r @ level_down, r @ level_right))

    turn = roll(r1, f1) - roll(r0, f0)
    delta = poses[-1, :3, 3] - poses[0, :3, 3]
    ahead = np.array([f0[0], f0[1], 0.0]) / np.hypot(f0[0], f0[1])
    side = np.array([ahead[1], -ahead[0], 0.0])
    for value, threshold, positive, negative in (
        (yaw, 5, "Pan Left", "Pan Right"), (pitch, 5, "Tilt Up", "Tilt Down"),
        (turn, 5, "Roll Clockwise", "Roll Counter-Clockwise"), (delta @ ahead, 0.3, "Dolly In", "Dolly Out"),
        (delta @ side, 0.3, "Truck Right", "Truck Left"), (delta[2], 0.3, "Pedestal Up", "Pedestal Down"),
    ):
        if abs(value) > threshold:
            found.add(positive if value > 0 else negative)
    return found


def independent_direction(scene, obj):
    pose = scene.cam_to_world[0]
    right, down, forward = pose[:3, 0], pose[:3, 1], pose[:3, 2]
    d = scene.centers[obj, -1] - scene.centers[obj, 0]
    x, up, z = d @ right, -(d @ down), d @ forward
    if np.linalg.norm(d) < 0.05:
        return "Stationary"
    if abs(z) > 1.2 * max(abs(x), abs(up)):
        return "Moving Away from Camera" if z > 0 else "Moving Toward Camera"
    words = []
    if min(abs(x), abs(up)) >= 0.6 * max(abs(x), abs(up)):
        words = ["Left" if x < 0 else "Right", "Up" if up > 0 else "Down"]
        return "Moving " + "-".join(words)
    return "Moving " + (("Left" if x < 0 else "Right") if abs(x) > abs(up) else ("Up" if up > 0 else "Down"))


def distance_key_holds(scene, obj, key):
    """Whether the camera-distance series of object index `obj` fits the 4DThinker class `key`."""
    d = [np.linalg.norm(scene.centers[obj, t] - scene.cam_to_world[t, :3, 3]) for t in range(scene.num_frames)]
    if key == "Getting Closer to Camera":
        return d[-1] < d[0]
    if key == "Getting Farther from Camera":
        return d[-1] > d[0]
    if key == "Maintaining Roughly the Same Distance":
        return max(d) - min(d) <= 0.05 * np.mean(d)
    extreme = int(np.argmin(d) if "Closer, Then" in key else np.argmax(d))
    return 0 < extreme < len(d) - 1


# DSR


def _object_index(scene, ref):
    return [o.object_id for o in scene.objects].index(ref)


def _position(scene, ref, t):
    return scene.cam_to_world[t, :3, 3] if ref == "camera" else scene.centers[_object_index(scene, ref), t]


def _facing(scene, ref, t):
    """Camera: the optical axis; object: its heading laid flat, unit length."""
    if ref == "camera":
        return scene.cam_to_world[t, :3, 2]
    heading = scene.headings[_object_index(scene, ref), t]
    flat = np.array([heading[0], heading[1], 0.0])
    return flat / np.linalg.norm(flat)


def _agent_rows(scene, ref, t):
    """Rows forward, left, up of the agent at frame t (world coordinates), and its origin."""
    if ref == "camera":
        pose = scene.cam_to_world[t]
        right, down, optical = pose[:3, 0], pose[:3, 1], pose[:3, 2]
        return np.array([optical, -right, -down]), pose[:3, 3]
    forward = _facing(scene, ref, t)
    left = np.array([-forward[1], forward[0], 0.0])  # up x forward with up = +z
    return np.array([forward, left, [0.0, 0.0, 1.0]]), _position(scene, ref, t)


def _seen(scene, agent, pose_frame, ref, t):
    """Where the agent, posed as at `pose_frame`, sees the entity `ref` at frame t."""
    rows, origin = _agent_rows(scene, agent, pose_frame)
    return rows @ (_position(scene, ref, t) - origin)


def _speeds(scene, meta, ref):
    frames = meta["frames"]
    if meta["agent_mode"] == "absolute":  # a fixed pose keeps lengths: world speeds
        points = [_position(scene, ref, f) for f in frames]
    else:
        points = [_seen(scene, meta["agent"], f, ref, f) for f in frames]
    return [float(np.linalg.norm(q - p)) for p, q in zip(points[:-1], points[1:], strict=True)]


def expected_key(scene, qa):
    meta = qa.meta
    measure = qa.subtask.removeprefix("abs_").removeprefix("rel_")
    agent, frames, slots = meta["agent"], meta["frames"], meta["slots"]
    absolute = qa.subtask.startswith("abs_") or qa.subtask == "non_temp"
    assert (meta["agent_mode"] == "absolute") == absolute

    def pose(f):
        return meta["agent_frame"] if absolute else f

    def rotate(vector, f):
        return _agent_rows(scene, agent, pose(f))[0] @ vector

    if measure == "dis":
        return describe_magnitudes([np.linalg.norm(_position(scene, slots[0], f) - _position(scene, slots[1], f))
                                    for f in frames])
    if measure in ("dir", "non_temp"):
        return describe_directions(np.array([
            rotate(_position(scene, slots[0], f) - _position(scene, slots[1], f), f) for f in frames]))
    if measure == "ori":
        return describe_directions(np.array([rotate(_facing(scene, slots[0], f), f) for f in frames]))
    if measure == "spd":
        return describe_magnitudes(_speeds(scene, meta, slots[0]))
    if measure == "spd_comp":
        return describe_speed_comparison(_speeds(scene, meta, slots[0]), _speeds(scene, meta, slots[1]))
    assert measure == "dir_pred"
    t_count = scene.num_frames
    if absolute:
        step = rotate(_position(scene, slots[0], t_count - 1) - _position(scene, slots[0], t_count - 3), None)
    else:
        step = (_seen(scene, agent, t_count - 1, slots[0], t_count - 1)
                - _seen(scene, agent, t_count - 3, slots[0], t_count - 3))
    return describe_directions(step[None])
