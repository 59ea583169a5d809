"""Renderer: depth against analytic ray hits, z-buffer order, car fronts, masks, boxes, overlays."""

import numpy as np
import pytest

from fourd_jax.data.sim import render
from fourd_jax.data.sim.scene import (
    CATEGORIES,
    FRONT_COLOR,
    MOTIONS,
    Scene,
    SceneConfig,
    SceneObject,
    camera_rotation,
    intrinsics_for,
    project,
    sample_scene,
    world_to_camera,
)
from fourd_jax.data.synth import SynthConfig
from fourd_jax.errors import InputError

RED = (205, 45, 40)
FLOOR = ((200, 190, 180), (110, 100, 90))


def make_scene(objects, position, yaw, pitch, roll=0.0, image_size=(63, 63), tile_size=1.0) -> Scene:
    """A one-frame scene; `objects` is a list of (shape, size, center, heading)."""
    pose = np.eye(4)
    pose[:3, :3] = camera_rotation(yaw, pitch, roll)
    pose[:3, 3] = position
    scene_objects = tuple(SceneObject(n, "thing", shape, "red", RED, size, "static")
                          for n, (shape, size, _, _) in enumerate(objects))
    centers = np.array([[center] for _, _, center, _ in objects], dtype=np.float64).reshape(-1, 1, 3)
    headings = np.array([[heading] for _, _, _, heading in objects], dtype=np.float64).reshape(-1, 1, 3)
    return Scene(seed=0, fps=2.0, image_size=image_size, intrinsics=intrinsics_for(image_size, 60.0),
                 cam_to_world=pose[None], camera_moves=(), objects=scene_objects, centers=centers,
                 headings=headings, floor_colors=FLOOR, tile_size=tile_size)


def pixel_ray(scene: Scene, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """World origin and unit direction of the ray through the centre of pixel (row, col), in float64."""
    direction_cam = np.linalg.solve(scene.intrinsics, [col + 0.5, row + 0.5, 1.0])
    direction = scene.cam_to_world[0, :3, :3] @ direction_cam
    return scene.cam_to_world[0, :3, 3], direction / np.linalg.norm(direction)


def shaded(color, normal) -> np.ndarray:
    intensity = render.AMBIENT + render.DIFFUSE * max(0.0, float(np.dot(render.LIGHT_DIRECTION, normal)))
    return np.rint(np.asarray(color, np.float64) * intensity)


def test_sphere_depth_is_the_analytic_nearest_hit():
    center, radius = np.array([0.4, -0.2, 0.55]), 0.35
    scene = make_scene([("sphere", (2 * radius,) * 3, center, (1.0, 0.0, 0.0))],
                       position=(6.0, 0.9, 1.7), yaw=np.pi + 0.2, pitch=-0.15, roll=0.1, image_size=(64, 80))
    rgb, depth, instance = render.render_frame(scene, 0)
    (u, v), _ = project(scene, 0, center)
    row, col = int(v), int(u)
    origin, direction = pixel_ray(scene, row, col)
    offset = origin - center
    half_b = direction @ offset
    s = -half_b - np.sqrt(half_b**2 - (offset @ offset - radius**2))
    expected_z = world_to_camera(scene, 0, origin + s * direction)[2]
    assert depth.dtype == np.float32 and instance.dtype == np.int16 and rgb.dtype == np.uint8
    assert abs(depth[row, col] - expected_z) < 1e-3
    assert instance[row, col] == 1
    assert expected_z < world_to_camera(scene, 0, center)[2] - 0.3  # the front surface, not the centre


def test_ground_depth_colour_and_sky():
    scene = make_scene([], position=(0.3, -0.4, 2.0), yaw=0.4, pitch=-0.35, tile_size=0.5)
    rgb, depth, instance = render.render_frame(scene, 0)
    for row, col in [(60, 5), (50, 40), (45, 20)]:
        origin, direction = pixel_ray(scene, row, col)
        point = origin - origin[2] / direction[2] * direction
        assert abs(depth[row, col] - world_to_camera(scene, 0, point)[2]) < 1e-3
        assert instance[row, col] == render.GROUND_ID
        tile = np.floor(point[:2] / 0.5).astype(int)
        base = FLOOR[0] if tile.sum() % 2 == 0 else FLOOR[1]
        np.testing.assert_allclose(rgb[row, col], shaded(base, (0.0, 0.0, 1.0)), atol=1)
    # Above the horizon there is nothing: infinite depth, id -1, a sky colour between horizon and zenith.
    assert np.isinf(depth[0]).all() and (instance[0] == render.NOTHING_ID).all()
    assert (rgb[0] <= np.maximum(render.SKY_HORIZON, render.SKY_ZENITH)).all()
    assert (rgb[0] >= np.minimum(render.SKY_HORIZON, render.SKY_ZENITH)).all()
    assert np.isfinite(depth[instance >= 0]).all() and np.isinf(depth[instance < 0]).all()


# Camera 5 m from the origin on +x at the objects' mid height, looking along -x; with a 63 px image the
# centre pixel's ray is the optical axis, so the hit depth is 5 minus the object's extent towards +x.
@pytest.mark.parametrize("shape,size,heading,extent", [
    ("box", (1.0, 0.6, 0.8), (1.0, 0.0, 0.0), 0.5),
    ("box", (1.0, 0.6, 0.8), (0.0, -1.0, 0.0), 0.3),
    ("box", (1.0, 0.6, 0.8), (np.sqrt(0.5), np.sqrt(0.5), 0.0), 0.3 * np.sqrt(2.0)),
    ("car", (1.0, 0.6, 0.8), (0.0, 0.0, 1.0), 0.5),  # vertical heading: long axis falls back to +x
    ("cylinder", (0.6, 0.6, 1.4), (0.0, 1.0, 0.0), 0.3),
    ("sphere", (0.8, 0.8, 0.8), (0.0, 1.0, 0.0), 0.4),
])
def test_shape_depth_on_the_optical_axis(shape, size, heading, extent):
    scene = make_scene([(shape, size, (0.0, 0.0, 0.7), heading)], position=(5.0, 0.0, 0.7), yaw=np.pi, pitch=0.0)
    _, depth, instance = render.render_frame(scene, 0)
    assert abs(depth[31, 31] - (5.0 - extent)) < 1e-3
    assert instance[31, 31] == 1


def test_cylinder_cap_seen_from_above():
    scene = make_scene([("cylinder", (0.6, 0.6, 1.0), (0.0, 0.0, 0.5), (1.0, 0.0, 0.0))],
                       position=(0.0, 0.0, 4.0), yaw=0.0, pitch=-np.pi / 2)
    rgb, depth, instance = render.render_frame(scene, 0)
    assert abs(depth[31, 31] - 3.0) < 1e-3 and instance[31, 31] == 1
    np.testing.assert_allclose(rgb[31, 31], shaded(RED, (0.0, 0.0, 1.0)), atol=1)
    # The cap is a disc of radius 0.3 m at 3 m: about 0.3 / 3 * f pixels, and the ground shows around it.
    focal = scene.intrinsics[0, 0]
    assert abs(np.sqrt((instance == 1).sum() / np.pi) - 0.3 / 3.0 * focal) < 1.0
    assert instance[0, 0] == render.GROUND_ID


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_object_wins_the_pixel(near_first):
    near = ("sphere", (0.6, 0.6, 0.6), (2.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    far = ("box", (1.2, 1.2, 1.2), (-1.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    objects = [near, far] if near_first else [far, near]
    scene = make_scene(objects, position=(6.0, 0.0, 1.0), yaw=np.pi, pitch=0.0)
    _, depth, instance = render.render_frame(scene, 0)
    near_id = 1 if near_first else 2
    assert instance[31, 31] == near_id
    assert abs(depth[31, 31] - 3.7) < 1e-3
    assert (instance == 3 - near_id).sum() > 0  # the larger far box shows around the sphere


@pytest.mark.parametrize("facing_camera", [True, False])
def test_car_front_face_is_painted(facing_camera):
    heading = (1.0, 0.0, 0.0) if facing_camera else (-1.0, 0.0, 0.0)
    scene = make_scene([("car", (1.0, 0.6, 0.5), (0.0, 0.0, 0.25), heading)],
                       position=(4.0, 0.0, 0.3), yaw=np.pi, pitch=0.0)
    rgb, _, instance = render.render_frame(scene, 0)
    car = rgb[instance == 1]
    dark = (car <= max(FRONT_COLOR)).all(axis=1)
    if facing_camera:
        np.testing.assert_allclose(rgb[31, 31], shaded(FRONT_COLOR, (1.0, 0.0, 0.0)), atol=1)
        assert dark.mean() > 0.9
    else:
        np.testing.assert_allclose(rgb[31, 31], shaded(RED, (1.0, 0.0, 0.0)), atol=1)
        assert not dark.any()


def test_objects_behind_the_camera_are_invisible():
    objects = [
        ("sphere", (0.8, 0.8, 0.8), (-3.0, 0.0, 0.5), (1.0, 0.0, 0.0)),
        ("box", (1.0, 1.0, 1.0), (-4.0, 1.0, 0.5), (0.0, 1.0, 0.0)),
        ("cylinder", (0.6, 0.6, 1.0), (3.0, 0.0, 0.5), (1.0, 0.0, 0.0)),
    ]
    scene = make_scene(objects, position=(0.0, 0.0, 1.0), yaw=0.0, pitch=-0.2)
    rendered = render.render_scene(scene)
    masks = render.object_masks(rendered.instance, 3)
    boxes = render.bounding_boxes(rendered.instance, 3)
    assert not masks[0].any() and not masks[1].any() and masks[2].any()
    assert np.isnan(boxes[:2]).all() and np.isfinite(boxes[2]).all()


def test_bounding_boxes_and_masks_of_a_hand_made_map():
    instance = np.full((2, 6, 8), -1, dtype=np.int16)
    instance[0, 1:4, 2:6] = 1
    instance[0, 5, 0] = 1  # a stray pixel widens the box
    instance[1, 5, 7] = 2
    masks = render.object_masks(instance, 3)
    assert masks.shape == (3, 2, 6, 8) and masks.dtype == bool
    assert masks[0].sum() == 13 and masks[1].sum() == 1 and not masks[2].any()
    boxes = render.bounding_boxes(instance, 3)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 2, 4)
    np.testing.assert_array_equal(boxes[0, 0], [0, 1, 6, 6])
    np.testing.assert_array_equal(boxes[1, 1], [7, 5, 8, 6])
    assert np.isnan(boxes[0, 1]).all() and np.isnan(boxes[1, 0]).all() and np.isnan(boxes[2]).all()


def test_bounding_boxes_match_rendered_masks():
    scene = sample_scene(3)
    instance = render.render_scene(scene).instance[::5]
    n = len(scene.objects)
    boxes = render.bounding_boxes(instance, n)
    for obj in range(n):
        for t in range(instance.shape[0]):
            rows, cols = np.nonzero(instance[t] == obj + 1)
            if rows.size:
                np.testing.assert_array_equal(boxes[obj, t], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            else:
                assert np.isnan(boxes[obj, t]).all()
    assert np.isfinite(boxes).all(axis=-1).any()


def test_overlay_blends_inside_outlines_the_contour_and_leaves_the_rest():
    image = np.random.default_rng(0).integers(0, 256, size=(12, 14, 3), dtype=np.uint8)
    mask = np.zeros((12, 14), dtype=bool)
    mask[2:10, 2:12] = True
    mask[2:5, 2:5] = False  # a notch: (5, 5) touches it only diagonally, so it is not on the contour
    out = render.overlay_mask(image, mask)
    contour = np.zeros_like(mask)
    contour[[2, 9], :] = True
    contour[:, [2, 11]] = True
    contour[5, 2:5] = contour[2:5, 5] = True
    contour &= mask
    inside = mask & ~contour
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(render.mask_contour(mask), contour)
    assert inside[5, 5] and inside.sum() == 40
    expected = np.rint(0.6 * image[inside].astype(np.float64) + 0.4 * np.array([255.0, 0.0, 0.0]))
    np.testing.assert_array_equal(out[inside], expected)
    assert (out[contour] == [255, 0, 0]).all()
    np.testing.assert_array_equal(out[~mask], image[~mask])
    # A mask that fills the image is outlined along the image border.
    full = render.overlay_mask(image, np.ones((12, 14), bool))
    assert (full[0] == [255, 0, 0]).all() and (full[:, -1] == [255, 0, 0]).all()
    assert not (full[1:-1, 1:-1] == [255, 0, 0]).all(axis=-1).any()


def test_sampled_scene_renders_deterministically_with_documented_shapes():
    scene = sample_scene(7)
    first, second = render.render_scene(scene), render.render_scene(scene)
    t, (h, w), n = scene.num_frames, scene.image_size, len(scene.objects)
    assert first.rgb.shape == (t, h, w, 3) and first.rgb.dtype == np.uint8
    assert first.depth.shape == (t, h, w) and first.depth.dtype == np.float32
    assert first.instance.shape == (t, h, w) and first.instance.dtype == np.int16
    for a, b in [(first.rgb, second.rgb), (first.depth, second.depth), (first.instance, second.instance)]:
        np.testing.assert_array_equal(a, b)
    frame = render.render_frame(scene, t - 1)
    for a, b in zip(frame, (first.rgb[-1], first.depth[-1], first.instance[-1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(np.unique(first.instance)) <= set(range(-1, n + 1))
    assert (first.depth > 0).all()
    # The pixel under an object's centre sees that object's front surface or something nearer still.
    for obj in range(n):
        for frame_index in range(t):
            (u, v), z = project(scene, frame_index, scene.centers[obj, frame_index])
            if z > 0 and 0 <= u < w and 0 <= v < h:
                assert first.depth[frame_index, int(v), int(u)] < z
                if first.instance[frame_index, int(v), int(u)] != obj + 1:
                    assert first.instance[frame_index, int(v), int(u)] > 0


def test_bad_inputs_are_rejected():
    scene = sample_scene(0)
    with pytest.raises(InputError):
        render.render_frame(scene, scene.num_frames)
    with pytest.raises(InputError):
        render.overlay_mask(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), bool))


# ----------------------------------------------------------------------------- scenes


def test_sampled_scenes_follow_their_config_and_motions():
    config = SceneConfig(num_frames=12)
    fronts = motions = 0
    seen_motions = set()
    for seed in range(200):
        scene = sample_scene(seed, config)
        n = len(scene.objects)
        assert config.min_objects <= n <= config.max_objects
        assert len({o.color_name for o in scene.objects}) == n and len({o.name for o in scene.objects}) == n
        assert scene.centers.shape == scene.headings.shape == (n, 12, 3) and scene.cam_to_world.shape == (12, 4, 4)
        fronts += any(o.has_front for o in scene.objects)
        for k, obj in enumerate(scene.objects):
            assert obj.category in CATEGORIES and min(obj.size) > 0
            seen_motions.add(obj.motion)
            steps = np.diff(scene.centers[k], axis=0)
            lengths = np.linalg.norm(steps, axis=1)
            np.testing.assert_allclose(np.linalg.norm(scene.headings[k], axis=1), 1.0, atol=1e-6)
            if obj.motion == "static":
                assert lengths.max() == 0.0
                continue
            motions += 1
            if obj.motion != "flying":  # ground movers stay on the ground
                np.testing.assert_allclose(scene.centers[k, :, 2], scene.centers[k, 0, 2])
            # The heading follows the motion: it points along each step (a turning step's chord is
            # off the heading by half the step's turn).
            moving = lengths > 1e-6
            along = np.sum(steps[moving] / lengths[moving, None] * scene.headings[k, :-1][moving], axis=1)
            assert along.min() > 0.98, (seed, obj.motion, along.min())
            if obj.motion == "decelerating":  # decelerates to a stop before the end
                assert lengths[-1] < 1e-6 < lengths[0]
            if obj.motion == "accelerating":
                assert np.all(np.diff(lengths) > 0)
    assert seen_motions == {"static", "flying", *MOTIONS}
    assert fronts > 100 and motions > 300


@pytest.mark.parametrize("field, value, message", [
    ("num_frames", 1, "num_frames 1 must be at least 2"),
    ("fps", 0.0, "fps 0.0 must be positive"),
    ("max_objects", 40, r"objects per scene \[2, 40\] must lie within"),
    ("static_probability", 1.5, "static_probability 1.5 must be within"),
])
def test_bad_scene_configs_fail_in_one_sentence(field, value, message):
    with pytest.raises(InputError, match=message):
        SceneConfig(**{field: value})


def test_synth_refuses_dsr_questions_on_short_clips():
    with pytest.raises(InputError, match="DSR questions need at least 8 frames per scene, not 6"):
        SynthConfig(scene=SceneConfig(num_frames=6))
    SynthConfig(scene=SceneConfig(num_frames=6), families=("4dthinker",))
