"""The device mesh and every sharding rule, in one place.

Axes: `data` (pure data parallel: params replicated) and `fsdp` (data parallel too, but params and optimizer
state are split along it). The batch is split over both. Switching DP <-> FSDP is a config change
(`mesh.fsdp`), never an edit to the model or the step.

The fsdp rule is by shape, so it covers every array of the state alike (UNet, frozen VAE and text encoder,
optimizer moments, Adafactor's factored vectors): arrays of at least `mesh.fsdp_min_size` elements are split
along their largest dimension that the fsdp axis divides (every such array of SD 1.5 for fsdp up to 64);
smaller ones, whose gather would cost more than they save, stay replicated. Room for a `tensor` (model
parallel) axis: it would be a third MESH_AXES entry, kept out of BATCH_AXES, with a rule by parameter name
(attention heads, MLP hidden) that claims one dimension before `fsdp_spec` picks among the others.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sdjax.config import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved; raises ConfigError if they cannot tile `num_devices`."""
    sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}", size, "expected a positive axis size or -1 (fill)")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[1]}", -1, "only one mesh axis may be -1")
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    if free:
        if num_devices % fixed:
            culprit = next(axis for axis, size in sizes.items() if size not in (-1, 1))
            raise ConfigError(f"mesh.{culprit}", sizes[culprit], f"the fixed mesh axes ({fixed} devices) do not "
                                                                 f"divide the {num_devices} devices present")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError("mesh", dict(sizes), f"the axis sizes multiply to {fixed}, but {num_devices} devices "
                                               "are present (set one axis to -1 to fill)")
    return sizes


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    # jax.make_mesh orders devices by the physical topology (ICI rings on TPU) when it knows it.
    # Auto axes: shardings are given at the jit boundary and XLA propagates them inside the models.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Splits the largest dimension divisible by the fsdp axis; small or indivisible arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_size: int):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state) by the fsdp rule."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), tree)


def host_to_global(host_batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy slice of a batch -> one global jax.Array per field, split over the data-parallel
    devices (the processes' slices side by side, in process order). Every process calls it together."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def global_batches(host_batches, sharding: NamedSharding):
    """Global batches from a sequence of host-sized batches that every process reads whole (held-out data):
    global batch i is host batches i * P .. i * P + P - 1, of which process p contributes i * P + p. Only
    whole global batches: len(host_batches) // P of them."""
    count, index = jax.process_count(), jax.process_index()
    for i in range(len(host_batches) // count):
        yield host_to_global(host_batches[i * count + index], sharding)
