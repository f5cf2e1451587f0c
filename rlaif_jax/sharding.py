"""One device mesh with axes (data, fsdp, tensor), and the table that maps logical axis names to it.

Model code names only logical axes (`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, layers`).
A rules table, a tuple of `(logical_name, mesh_axis | tuple of mesh axes | None)` pairs that comes from the
config, turns those names into `PartitionSpec`s. Activations are constrained with `constrain(x, axes)`, which
reads the mesh set by `jax.set_mesh` (a no-op when none is set, so the same model code runs unsharded).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# batch over data x fsdp (FSDP is data parallel for activations), weights' embed dim over fsdp,
# Megatron-style tensor parallelism on heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
)

_active_rules: list[tuple[tuple[str, Any], ...]] = [DEFAULT_RULES]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types, so shardings propagate from logical constraints.

    A size of -1 for `data` takes whatever devices the other two axes leave.
    """
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
            f"but {len(devices)} are available; change config.mesh so the product matches"
        )
    return jax.make_mesh(
        (data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def mesh_from_config(mesh_cfg) -> tuple[Mesh, list[tuple[str, Any]]]:
    """The mesh and the logical-axis rules of a `config.mesh` section."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), [tuple(r) for r in mesh_cfg.rules]


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Makes `rules` the logical->mesh table for `constrain` and `logical_to_spec` inside the block."""
    _active_rules.append(tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in rules))
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> tuple[tuple[str, Any], ...]:
    return _active_rules[-1]


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
    return () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _mesh_axes_for(name: str | None, rules) -> Any:
    if name is None:
        return None
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise KeyError(f"logical axis {name!r} has no entry in the sharding rules; add ({name!r}, ...) to them")


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None, rules=None) -> P:
    """Logical axis names -> PartitionSpec. With `shape` and `mesh_shape`, a mesh axis that does not divide
    its dimension, or that an earlier dimension already uses, is dropped (that dimension stays replicated)."""
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = _as_tuple(_mesh_axes_for(name, rules))
        if not mesh_axes:
            spec.append(None)
            continue
        kept = []
        for ax in mesh_axes:
            if ax in used:
                continue
            if shape is not None and mesh_shape is not None:
                size = int(np.prod([mesh_shape[a] for a in kept + [ax]]))
                if shape[i] % size:
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def partitioned_mesh():
    """The (abstract) mesh set by `jax.set_mesh` that XLA partitions the program over, or None: no mesh is set,
    or the code runs inside a `jax.shard_map` manual over all its axes (each device then holds its own shard and
    there is nothing left to constrain: `train_step.accumulate_gradients` under `data_parallel_axis`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.are_all_axes_manual else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without a partitioned mesh."""
    mesh = partitioned_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_shards() -> int:
    """How many ways the mesh set by `jax.set_mesh` splits the logical "batch" axis (1 without a mesh)."""
    mesh = partitioned_mesh()
    if mesh is None:
        return 1
    return int(np.prod([dict(mesh.shape)[a] for a in _as_tuple(_mesh_axes_for("batch", current_rules()))]))


def data_parallel_axis() -> tuple[str, int] | None:
    """(name, size) of the mesh axis that splits the logical "batch" when it is the mesh's only axis of size > 1:
    the program is then plain data parallelism, so gradients may be summed on each device first and across
    devices once (`train_step.accumulate_gradients`). None otherwise: no mesh, one device, inside a shard_map
    already, or the axis also shards something other than the batch (the rules' FSDP axis shards the weights),
    or another axis shards anything (tensor parallelism).

    Why not also beside FSDP / tensor axes (a shard_map manual over the data axis alone): XLA 0.10's SPMD
    partitioner aborts on the embedding's gather in such a partially manual region (a CHECK failure in
    ExpandDeviceGroupsWithIota, seen on a (data=2, fsdp=2, tensor=2) mesh), so those meshes keep XLA's own
    schedule, which reduces once per micro-batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return None
    rules = current_rules()
    batch_axes = [a for a in _as_tuple(_mesh_axes_for("batch", rules)) if mesh.shape[a] > 1]
    if len(batch_axes) != 1 or any(n > 1 for a, n in mesh.shape.items() if a != batch_axes[0]):
        return None
    axis = batch_axes[0]
    if any(axis in _as_tuple(mesh_axes) for name, mesh_axes in rules if name != "batch"):
        return None  # it shards weights too (FSDP): they must stay sharded, not be replicated per device
    return axis, mesh.shape[axis]


def constrain_moved(x: jax.Array, axes: Sequence[str | None], from_dim: int, to_dim: int) -> jax.Array:
    """`constrain` by logical names, except that the mesh axes of dimension `from_dim` shard `to_dim` instead
    (after its own): the same memory per device, cut along another dimension. A no-op when no mesh is set."""
    mesh = partitioned_mesh()
    if mesh is None:
        return x
    spec = list(logical_to_spec(axes, x.shape, dict(mesh.shape)))
    moved = _as_tuple(spec[to_dim]) + _as_tuple(spec[from_dim])
    if x.shape[to_dim] % int(np.prod([mesh.shape[a] for a in moved])):
        return jax.lax.with_sharding_constraint(x, P(*spec))  # does not divide: leave the layout as it was
    spec[from_dim], spec[to_dim] = None, (moved[0] if len(moved) == 1 else moved) if moved else None
    return jax.lax.with_sharding_constraint(x, P(*spec))


def is_axes(x: Any) -> bool:
    """Leaf test for pytrees of logical-axis tuples."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, logical_tree: Any, shape_tree: Any, rules=None) -> Any:
    """NamedShardings for a pytree, from its logical axes and shapes (arrays or ShapeDtypeStructs)."""
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh_shape, rules)),
        logical_tree, shape_tree, is_leaf=is_axes,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding for a (batch, ...) array: the batch dim over the rules' batch axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules=rules))


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The same whole array, held by every process (rows rendered on the host), -> a global array: each device
    takes its own slice. (`data.to_global` is the other way in: each process passes only its own rows.)"""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def gather_to_host(x) -> np.ndarray:
    """A global array (or this process's rows of one) -> the whole array as numpy, on every process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_sharded(mesh: Mesh, params: Any, min_size: int = 2**14) -> list[str]:
    """Names of parameters with at least `min_size` elements that end up fully replicated on a mesh of more
    than one device (MaxText-style guard: large replicated weights waste memory at scale)."""
    if mesh.size == 1:
        return []
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if x.size >= min_size and x.sharding.is_fully_replicated:
            bad.append(jax.tree_util.keystr(path))
    return bad
