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

Multislice (several TPU slices joined by the data-center network, DCN): the mesh is a hybrid one with the
same axes. `data` is split over the slices first (each data index lies inside one slice), so the only
collectives that cross DCN are the data-parallel gradient reductions; `fsdp`, whose gathers run in every
layer, stays inside a slice on ICI. `mesh.num_slices` (0: as many as the devices' `slice_index` values)
decides it; with one slice the mesh is `jax.make_mesh`'s, as without this.
"""

from __future__ import annotations

import collections
import functools

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
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


def device_slices(devices) -> int:
    """How many slices the devices are in: distinct `slice_index` values (1 for devices without one: CPU, GPU,
    and JAX versions that do not set it)."""
    return len({d.slice_index for d in devices if getattr(d, "slice_index", None) is not None}) or 1


def resolve_num_slices(config: ml_collections.ConfigDict, present: int) -> int:
    """`mesh.num_slices`, 0 resolved to the `present` slices of the devices."""
    configured = config.mesh.get("num_slices", 0)
    if not isinstance(configured, int) or configured < 0:
        raise ConfigError("mesh.num_slices", configured, "expected 0 (as many as the devices' slices) or a "
                                                         "positive number of slices")
    return configured or present


def slice_shapes(config: ml_collections.ConfigDict, num_devices: int,
                 num_slices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI, DCN) axis sizes: per slice, and across the `num_slices` slices (their products are the mesh's
    sizes). `data` goes over the slices, every other axis stays inside one; raises ConfigError (naming
    mesh.data or mesh.num_slices) when that cannot be."""
    sizes = mesh_shape(config, num_devices)
    if num_devices % num_slices:
        raise ConfigError("mesh.num_slices", num_slices, f"the {num_devices} devices do not split evenly "
                                                         f"into {num_slices} slices")
    if sizes["data"] % num_slices:
        raise ConfigError("mesh.data", config.mesh.data,
                          f"the data axis spans the {num_slices} slices (mesh.num_slices) over DCN, and fsdp stays "
                          f"inside a slice of {num_devices // num_slices} devices: mesh.data (here "
                          f"{sizes['data']}, mesh.fsdp {sizes['fsdp']}) must be a multiple of {num_slices}")
    dcn = {axis: num_slices if axis == "data" else 1 for axis in MESH_AXES}
    return {axis: sizes[axis] // dcn[axis] for axis in MESH_AXES}, dcn


def _slice_groups(devices, num_slices: int) -> tuple[str, list[list]]:
    """The devices grouped by slice ("slice_index"), or by process where devices have no slice index (GPU
    hosts, emulated CPU processes): the granules a hybrid mesh puts on DCN."""
    has_slices = getattr(devices[0], "slice_index", None) is not None
    attribute = "slice_index" if has_slices else "process_index"
    groups = collections.defaultdict(list)
    for device in devices:
        groups[getattr(device, attribute)].append(device)
    groups = [groups[key] for key in sorted(groups)]
    if len(groups) != num_slices:
        found = f"{len(groups)} slices" if has_slices else f"no slice index and {len(groups)} processes"
        raise ConfigError("mesh.num_slices", num_slices, f"the {len(devices)} devices have {found}; set 0 (as "
                                                         "many as the devices' slices) or that number")
    if len({len(group) for group in groups}) > 1:
        raise ConfigError("mesh.num_slices", num_slices, f"the slices hold unequal numbers of devices "
                                                         f"({[len(group) for group in groups]})")
    return attribute, groups


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    present = device_slices(devices)
    num_slices = resolve_num_slices(config, present)
    # Auto axes: shardings are given at the jit boundary and XLA propagates them inside the models.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if num_slices == 1 and present == 1:
        sizes = mesh_shape(config, len(devices))
        shape = tuple(sizes[axis] for axis in MESH_AXES)
        # jax.make_mesh orders devices by the physical topology (ICI rings on TPU) when it knows it.
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    ici, dcn = slice_shapes(config, len(devices), num_slices)
    attribute, _ = _slice_groups(devices, num_slices)
    # Each slice's devices in ICI order (as jax.make_mesh orders one slice), the slices' blocks side by side
    # along the DCN axes.
    device_array = mesh_utils.create_hybrid_device_mesh(
        [ici[axis] for axis in MESH_AXES], [dcn[axis] for axis in MESH_AXES], devices,
        process_is_granule=attribute == "process_index")
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def slice_of_devices(mesh: Mesh) -> np.ndarray:
    """The slice (or, without slice indices, the process) of each mesh position: an int array of the mesh's
    shape."""
    def granule(device):
        index = getattr(device, "slice_index", None)
        return device.process_index if index is None else index
    return np.vectorize(granule, otypes=[int])(mesh.devices)


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


def traced_on_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as JAX's abstract mesh, for `jax.jit`: layers that run a per-device kernel (TPU
    splash attention, sdjax/models/tpu_attention.py) read it to `shard_map` the kernel over the batch, since
    XLA cannot partition a custom call. (`jax.set_mesh` would do it from outside jit, for every caller of the
    compiled function; `use_abstract_mesh` inside the traced function keeps it with the function.)"""
    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return on_mesh
