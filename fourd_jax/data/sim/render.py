"""Ray-cast renderer for procedural scenes: RGB, z-depth and instance maps, masks, boxes, overlays.

One ray per pixel goes through the pixel centre. Rays are deliberately left unnormalised: the
camera-frame direction of pixel (u, v) is K^-1 (u + 0.5, v + 0.5, 1), whose z component is 1, so
the ray parameter s of a hit *is* its z-depth along the optical axis, and no conversion is needed.

Every shape is a convex solid, so a ray meets it in one interval [near, far] of ray parameters
(a sphere by its quadratic, a box as the intersection of three slabs, a cylinder as an infinite
vertical cylinder intersected with a horizontal slab). The visible hit is the smaller positive end
of that interval; the nearest hit over the ground and all objects wins (a z-buffer).

Shading is Lambertian with one directional light plus ambient; the ground is a checkerboard of
`scene.tile_size` metre tiles so camera motion is visible; rays that hit nothing see a sky whose
colour depends only on the ray's elevation (so it stays put when the camera rolls or trucks).
Geometry runs in float32 per pixel around float64 per-object constants, which keeps depth accurate
to well under a millimetre at scene distances.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fourd_jax.data.sim.scene import FRONT_COLOR, Scene, SceneObject
from fourd_jax.errors import InputError

AMBIENT = 0.45
DIFFUSE = 0.55
# Unit vector pointing *towards* the light: high above, from one side, so box faces differ in shade.
LIGHT_DIRECTION = np.array([-0.35, 0.25, 0.9]) / np.linalg.norm([-0.35, 0.25, 0.9])
SKY_HORIZON = (205, 222, 240)
SKY_ZENITH = (95, 150, 220)
GROUND_ID = 0
NOTHING_ID = -1


@dataclasses.dataclass(frozen=True)
class RenderedScene:
    """All frames of a scene: `rgb` uint8 [T,H,W,3], `depth` float32 [T,H,W] (z-depth in metres,
    inf where nothing is hit), `instance` int16 [T,H,W] (-1 nothing, 0 ground, object_id + 1)."""

    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray


def render_frame(scene: Scene, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb uint8 [H,W,3], depth float32 [H,W], instance int16 [H,W]) of frame t."""
    _check_scene(scene)
    if not 0 <= t < scene.num_frames:
        raise InputError(f"Frame index t={t} is outside the scene's {scene.num_frames} frames.")
    return _render(scene, t, camera_rays(scene.intrinsics, scene.image_size))


def render_scene(scene: Scene) -> RenderedScene:
    """Every frame of `scene`, stacked along a leading time axis."""
    _check_scene(scene)
    rays = camera_rays(scene.intrinsics, scene.image_size)
    frames = [_render(scene, t, rays) for t in range(scene.num_frames)]
    rgb, depth, instance = (np.stack(parts) for parts in zip(*frames, strict=True))
    return RenderedScene(rgb=rgb, depth=depth, instance=instance)


def camera_rays(intrinsics: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Camera-frame ray directions [3, H*W] (float32, row-major pixels) through the pixel centres,
    scaled so that their z component is 1."""
    h, w = image_size
    v, u = np.mgrid[:h, :w]
    pixels = np.stack([u.ravel() + 0.5, v.ravel() + 0.5, np.ones(h * w)])
    return np.linalg.solve(intrinsics, pixels).astype(np.float32)


def object_masks(instance: np.ndarray, num_objects: int) -> np.ndarray:
    """Boolean masks [N, ...] of objects 0..N-1 from an instance map [...] (object n has id n + 1)."""
    ids = np.arange(1, num_objects + 1, dtype=instance.dtype).reshape((num_objects,) + (1,) * instance.ndim)
    return instance[None] == ids


def bounding_boxes(instance: np.ndarray, num_objects: int) -> np.ndarray:
    """Pixel boxes float32 [N, ..., 4] = (x1, y1, x2, y2) of each object in instance maps [..., H, W]
    (typically [T, H, W] -> [N, T, 4]): x1/y1 the first column/row it covers, x2/y2 one past the
    last; all four NaN where the object covers no pixel."""
    if instance.ndim < 2:
        raise InputError(f"Instance map has shape {instance.shape}; it needs at least two axes (H, W).")
    masks = object_masks(instance, num_objects)
    rows = masks.any(axis=-1)  # [N, ..., H]
    cols = masks.any(axis=-2)  # [N, ..., W]
    h, w = instance.shape[-2:]
    boxes = np.stack([
        cols.argmax(axis=-1), rows.argmax(axis=-1),
        w - cols[..., ::-1].argmax(axis=-1), h - rows[..., ::-1].argmax(axis=-1),
    ], axis=-1).astype(np.float32)
    boxes[~rows.any(axis=-1)] = np.nan
    return boxes


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of boolean masks [..., H, W]: mask pixels with a 4-neighbour outside the mask.
    Pixels beyond the image count as outside, so a mask touching the border is outlined there too."""
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)], constant_values=False)
    interior = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1] & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
    return mask & ~interior


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.4
) -> np.ndarray:
    """The imagery image: `image` uint8 [..., H, W, 3] with `mask` [..., H, W] blended towards `color`
    at `alpha` (rounded to the nearest integer) and the mask's contour painted solid `color`."""
    if image.dtype != np.uint8 or image.shape[-1:] != (3,) or image.shape[:-1] != mask.shape:
        raise InputError(
            f"overlay_mask needs a uint8 image [..., H, W, 3] and a mask [..., H, W]; got image "
            f"{image.dtype} {image.shape} and mask {mask.shape}.")
    mask = mask.astype(bool)
    color_array = np.asarray(color, dtype=np.float64)
    out = image.copy()
    blended = (1.0 - alpha) * image[mask].astype(np.float64) + alpha * color_array
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[mask_contour(mask)] = np.asarray(color, dtype=np.uint8)
    return out


def object_axes(heading: np.ndarray) -> np.ndarray:
    """Object-to-world rotation [3, 3] with columns (forward, left, up): forward is the horizontal
    part of `heading` (world +x when the heading is vertical or zero), up is world z."""
    forward = np.array([heading[0], heading[1], 0.0], dtype=np.float64)
    norm = np.linalg.norm(forward)
    forward = forward / norm if norm > 1e-9 else np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, 0.0, 1.0])
    return np.stack([forward, np.cross(up, forward), up], axis=1)


def lambert(colors: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Shaded uint8 colours [M, 3] of base colours [M, 3] (or [3]) on surfaces with unit normals [3, M]."""
    cosine = np.maximum(LIGHT_DIRECTION.astype(np.float32) @ normals, 0.0)
    intensity = AMBIENT + DIFFUSE * cosine
    return np.clip(np.rint(np.asarray(colors, np.float32) * intensity[:, None]), 0, 255).astype(np.uint8)


def _check_scene(scene: Scene) -> None:
    for n, obj in enumerate(scene.objects):
        if obj.object_id != n:
            raise InputError(f"Scene object {n} has object_id {obj.object_id}; ids must equal positions 0..N-1.")


def _render(scene: Scene, t: int, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = scene.image_size
    pose = scene.cam_to_world[t]
    origin = pose[:3, 3].astype(np.float64)
    directions = pose[:3, :3].astype(np.float32) @ rays  # world frame, still z-depth-scaled
    depth = _ground_hits(origin, directions)
    instance = np.where(np.isfinite(depth), GROUND_ID, NOTHING_ID).astype(np.int16)
    for n, obj in enumerate(scene.objects):
        hits = _object_hits(obj, scene.centers[n, t], scene.headings[n, t], origin, directions)
        closer = hits < depth
        depth = np.where(closer, hits, depth)
        instance[closer] = n + 1
    rgb = _colors(scene, t, origin, directions, depth, instance)
    return rgb.reshape(h, w, 3), depth.astype(np.float32, copy=False).reshape(h, w), instance.reshape(h, w)


def _nearest_positive(near: np.ndarray, far: np.ndarray) -> np.ndarray:
    """The ray parameter where a ray enters a solid it meets on [near, far]: near if in front of the
    camera, far if the camera is inside, inf if the solid is missed or behind (NaN counts as a miss)."""
    hit = np.where(near > 0, near, np.where(far > 0, far, np.inf))
    return np.where(near <= far, hit, np.inf).astype(np.float32)


def _ground_hits(origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (-origin[2] / directions[2]).astype(np.float32)
    return np.where(s > 0, s, np.float32(np.inf))


def _object_hits(
    obj: SceneObject, center: np.ndarray, heading: np.ndarray, origin: np.ndarray, directions: np.ndarray
) -> np.ndarray:
    """Ray parameter of each ray's visible hit on `obj` [P] (inf on a miss)."""
    relative = origin - center
    length, width, height = obj.size
    if obj.shape == "sphere":
        return _sphere_hits(relative, directions, length / 2)
    if obj.shape in ("box", "car"):
        axes = object_axes(heading)
        local = axes.T @ relative
        return _box_hits(local, axes.T.astype(np.float32) @ directions, np.array([length, width, height]) / 2)
    if obj.shape == "cylinder":
        return _cylinder_hits(relative, directions, length / 2, height / 2)
    raise InputError(f"Scene object {obj.object_id} has unknown shape {obj.shape!r}.")


def _sphere_hits(relative: np.ndarray, directions: np.ndarray, radius: float) -> np.ndarray:
    # Solved around the ray's closest approach to the centre rather than by the textbook quadratic,
    # whose discriminant loses float32 precision to cancellation near the silhouette.
    squared_length = np.einsum("ip,ip->p", directions, directions)
    relative = relative.astype(np.float32)
    closest = -(relative @ directions) / squared_length
    offset = relative[:, None] + closest * directions
    half_chord_squared = (np.float32(radius**2) - np.einsum("ip,ip->p", offset, offset)) / squared_length
    half_chord = np.sqrt(np.maximum(half_chord_squared, 0.0))
    hits = _nearest_positive(closest - half_chord, closest + half_chord)
    return np.where(half_chord_squared >= 0, hits, np.float32(np.inf))


def _slab(origin: float, directions: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Interval of ray parameters inside |origin + s * direction| <= half; a ray parallel to the slab
    gets (-inf, inf) inside it and an empty interval outside."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / directions
        t1 = (np.float32(-half - origin)) * inverse
        t2 = (np.float32(half - origin)) * inverse
    return np.fmin(t1, t2), np.fmax(t1, t2)


def _box_hits(local_origin: np.ndarray, local_directions: np.ndarray, half_extents: np.ndarray) -> np.ndarray:
    intervals = [_slab(local_origin[i], local_directions[i], half_extents[i]) for i in range(3)]
    near = np.fmax(np.fmax(intervals[0][0], intervals[1][0]), intervals[2][0])
    far = np.fmin(np.fmin(intervals[0][1], intervals[1][1]), intervals[2][1])
    return _nearest_positive(near, far)


def _cylinder_hits(relative: np.ndarray, directions: np.ndarray, radius: float, half_height: float) -> np.ndarray:
    # The infinite vertical cylinder is solved like the sphere, in the horizontal plane.
    dx, dy = directions[0], directions[1]
    horizontal_squared = dx * dx + dy * dy
    rx, ry = np.float32(relative[0]), np.float32(relative[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        closest = -(rx * dx + ry * dy) / horizontal_squared
        offset_x, offset_y = rx + closest * dx, ry + closest * dy
        half_chord_squared = (np.float32(radius**2) - offset_x * offset_x - offset_y * offset_y) / horizontal_squared
    half_chord = np.sqrt(np.maximum(half_chord_squared, 0.0))
    crosses = half_chord_squared >= 0
    side_near = np.where(crosses, closest - half_chord, np.inf)
    side_far = np.where(crosses, closest + half_chord, -np.inf)
    # A vertical ray is inside the infinite cylinder for all s or for none.
    vertical = horizontal_squared == 0
    inside_axis = np.float32(np.inf if relative[0] ** 2 + relative[1] ** 2 <= radius**2 else -np.inf)
    side_near = np.where(vertical, -inside_axis, side_near)
    side_far = np.where(vertical, inside_axis, side_far)
    cap_near, cap_far = _slab(relative[2], directions[2], half_height)
    return _nearest_positive(np.fmax(side_near, cap_near), np.fmin(side_far, cap_far))


def _colors(
    scene: Scene, t: int, origin: np.ndarray, directions: np.ndarray, depth: np.ndarray, instance: np.ndarray
) -> np.ndarray:
    """Shaded uint8 colours [P, 3] of every pixel from its hit and what it hit."""
    rgb = np.empty((instance.size, 3), dtype=np.uint8)
    sky = np.flatnonzero(instance == NOTHING_ID)
    rgb[sky] = _sky_colors(directions[:, sky])
    ground = np.flatnonzero(instance == GROUND_ID)
    rgb[ground] = _ground_colors(scene, _hit_points(origin, directions, depth, ground))
    for n, obj in enumerate(scene.objects):
        pixels = np.flatnonzero(instance == n + 1)
        if pixels.size:
            points = _hit_points(origin - scene.centers[n, t], directions, depth, pixels)
            rgb[pixels] = _object_colors(obj, scene.headings[n, t], points)
    return rgb


def _hit_points(origin: np.ndarray, directions: np.ndarray, depth: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Hit points [3, M] of the given pixels, relative to whatever `origin` is relative to."""
    return origin[:, None].astype(np.float32) + depth[pixels] * directions[:, pixels]


def _sky_colors(directions: np.ndarray) -> np.ndarray:
    elevation = directions[2] / np.linalg.norm(directions, axis=0)
    weight = np.clip(elevation, 0.0, 1.0)[:, None]
    sky = (1.0 - weight) * np.array(SKY_HORIZON, np.float32) + weight * np.array(SKY_ZENITH, np.float32)
    return np.rint(sky).astype(np.uint8)


def _ground_colors(scene: Scene, points: np.ndarray) -> np.ndarray:
    tiles = np.floor(points[:2] / np.float32(scene.tile_size)).astype(np.int64)
    light = (tiles[0] + tiles[1]) % 2 == 0
    base = np.where(light[:, None], np.array(scene.floor_colors[0]), np.array(scene.floor_colors[1]))
    up = np.zeros_like(points)
    up[2] = 1.0
    return lambert(base, up)


def _object_colors(obj: SceneObject, heading: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Shaded colours [M, 3] of surface points [3, M] given relative to the object's centre."""
    length, width, height = obj.size
    base = np.broadcast_to(np.asarray(obj.color, np.float32), (points.shape[1], 3))
    if obj.shape == "sphere":
        return lambert(base, points / np.linalg.norm(points, axis=0))
    if obj.shape == "cylinder":
        radial = np.hypot(points[0], points[1])
        on_cap = np.abs(points[2]) / (height / 2) >= radial / (length / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            side = np.stack([points[0] / radial, points[1] / radial, np.zeros_like(radial)])
        cap = np.stack([np.zeros_like(radial), np.zeros_like(radial), np.sign(points[2])])
        return lambert(base, np.where(on_cap, cap, side))
    # Box or car: the face is the axis along which the point sits closest, relatively, to the surface.
    axes = object_axes(heading).astype(np.float32)
    local = axes.T @ points
    ratios = np.abs(local) / np.array([length, width, height], np.float32)[:, None]
    face_axis = ratios.argmax(axis=0)
    face_sign = np.sign(local[face_axis, np.arange(local.shape[1])])
    normals = axes[:, face_axis] * face_sign
    if obj.has_front:
        front = (face_axis == 0) & (face_sign > 0)
        base = np.where(front[:, None], np.asarray(FRONT_COLOR, np.float32), base)
    return lambert(base, normals)
