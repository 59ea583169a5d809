"""The one place that maps logical axis names to the (data, fsdp, tensor) device mesh.

Layers name their parameter and activation axes (`embed`, `heads`, `vision_mlp`, ...); a rules
table here says which mesh axis, if any, splits each name. Checks refuse a rules table that
misses a name the model uses (Flax would silently replicate it) or splits an axis unevenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding

from fourd_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Parameters: FSDP over the model width, tensor parallelism over heads / MLP / vocab.
# Activations: the batch over (data, fsdp).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_patch", None),
    ("vision_pos", None),  # rows of Qwen3-VL's learned position table (resampled per grid)
    ("vision_qkv", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_merge", "fsdp"),
    ("vision_merge_out", "tensor"),
)


class ShardingError(InputError):
    """A mesh or rules table that cannot place the model."""


def resolve_rules(overrides: Sequence[Sequence[Any]] = ()) -> Rules:
    """The rules table of a run: DEFAULT_RULES with the (logical name, mesh axes) pairs of a
    config's `mesh.rules` replacing their defaults (mesh axes: None, one axis or a tuple of axes)."""
    table = dict(DEFAULT_RULES)
    for entry in overrides:
        if len(entry) != 2:
            raise ShardingError(f"mesh.rules entry {tuple(entry)!r} must be a (logical name, mesh axes) pair.")
        name, axes = entry
        if name not in table:
            raise ShardingError(f"mesh.rules names logical axis {name!r}, which the model does not use; "
                                f"known names: {', '.join(table)}.")
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
        if unknown:
            raise ShardingError(f"mesh.rules maps {name!r} to {unknown[0]!r}, which is not a mesh axis "
                                f"({', '.join(MESH_AXES)}).")
        table[name] = axes
    return tuple(table.items())


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (Linen logical sharding rejects Explicit ones).

    One entry of mesh_shape may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ShardingError(f"mesh_shape {tuple(mesh_shape)} must have 3 entries for axes {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"mesh_shape {tuple(mesh_shape)} must hold positive sizes and at most one -1.")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ShardingError(
                f"mesh_shape {tuple(mesh_shape)} cannot fill {len(devices)} devices: "
                f"{len(devices)} is not divisible by {rest}."
            )
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ShardingError(
            f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices but {len(devices)} are available."
        )
    auto = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # A logical axis that is no product of physical axes (8 over a 4x4x4 TPU slice): let the device
        # order split a physical axis, as MaxText does for such meshes.
        grid = mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical names for a boxed (LogicallyPartitioned) pytree."""
    return nn.get_partition_spec(boxed_tree)


def check_rules(boxed_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Raise when a parameter uses a logical name absent from `rules` or splits unevenly."""
    known = {name for name, _ in rules}
    specs = traverse_util.flatten_dict(logical_specs(boxed_tree))
    shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed_tree))
    mapping = dict(rules)
    for key, spec in specs.items():
        name = "/".join(key)
        shape = shapes[key].shape
        for dim, logical in enumerate(spec):
            if logical is None:
                continue
            if logical not in known:
                raise ShardingError(
                    f"Parameter '{name}' uses logical axis '{logical}', which the rules table does not map."
                )
            axes = mapping[logical]
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if shape[dim] % size:
                raise ShardingError(
                    f"Parameter '{name}' axis {dim} ('{logical}', size {shape[dim]}) does not divide "
                    f"evenly over mesh axes {axes} of size {size}; change mesh_shape or the rules."
                )


def param_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings (unboxed tree) for a boxed parameter tree, after `check_rules`."""
    check_rules(boxed_tree, mesh, rules)
    return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def replicated_fraction(params: Any) -> float:
    """Fraction of parameter bytes that sit whole on every device (fully replicated)."""
    total = replicated = 0
    for leaf in jax.tree_util.tree_leaves(params):
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        if leaf.sharding.is_fully_replicated:
            replicated += nbytes
    return replicated / max(total, 1)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding for an array whose leading axis is the batch."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def like_params(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree holding param-shaped leaves (e.g. an optimizer state).

    A leaf whose key path ends with a parameter's path and has its shape takes that parameter's
    sharding (Adam moments live where their parameters live); anything else (step counters,
    masked-out placeholders) is replicated.
    """
    by_path = {tuple(k): v for k, v in traverse_util.flatten_dict(params_shardings).items()}
    longest = max((len(k) for k in by_path), default=0)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        names = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            names.insert(0, str(entry.key))
        for start in range(max(0, len(names) - longest), len(names)):
            sharding = by_path.get(tuple(names[start:]))
            if sharding is not None:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def place(tree: Any, shardings: Any) -> Any:
    """`tree` (arrays with the same values on every process, e.g. parameters each process loaded
    from disk) as global arrays laid out by `shardings`. One process: `jax.device_put`. Several:
    each process builds its own shards from its copy (`device_put` would have to move data between
    hosts, which the CPU backend cannot)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(value: Any, where: Any) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)
