"""Multislice: the hybrid mesh (data over slices on DCN, fsdp inside a slice on ICI), its config checks, and a
2-slice ahead-of-time plan of the tiny config on this CPU host (libtpu's compiler, no TPU)."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from sdjax import cli
from sdjax import mesh as mesh_lib
from sdjax import plan as plan_lib
from sdjax import validation
from sdjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_slices():
    """8 TPU devices: 2 slices of a v5e 2x2 (4 chips each), described by libtpu on this host."""
    devices = plan_lib.target_devices("v5e:2x2", num_slices=2)
    assert [d.slice_index for d in devices] == [0] * 4 + [1] * 4
    return devices


def _with_mesh(config, data, fsdp, num_slices=0):
    config.mesh.data, config.mesh.fsdp, config.mesh.num_slices = data, fsdp, num_slices
    return config


@pytest.mark.parametrize("data, fsdp", [(2, 4), (-1, 4), (4, 2), (8, 1)])
def test_each_data_index_holds_devices_of_one_slice(tiny_config, two_slices, data, fsdp):
    mesh = mesh_lib.make_mesh(_with_mesh(tiny_config, data, fsdp), two_slices)
    assert mesh.axis_names == mesh_lib.MESH_AXES
    rows = mesh.shape["data"]
    assert dict(mesh.shape) == {"data": rows, "fsdp": 8 // rows}
    slices = mesh_lib.slice_of_devices(mesh)
    # The first half of the data rows is slice 0, the second slice 1: an fsdp group never leaves its slice,
    # and only the data axis crosses DCN.
    assert (slices == np.repeat([0, 1], rows // 2)[:, None]).all()
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in two_slices)
    if rows == 2:  # one row per slice: all 4 chips of that slice
        for row in range(2):
            assert {d.id for d in mesh.devices[row]} == {d.id for d in two_slices if d.slice_index == row}
    ici, dcn = mesh_lib.slice_shapes(tiny_config, 8, 2)
    assert dcn == {"data": 2, "fsdp": 1} and ici == {"data": rows // 2, "fsdp": 8 // rows}


def test_cpu_devices_are_one_slice_and_the_mesh_is_unchanged(tiny_config):
    devices = jax.devices()
    assert mesh_lib.device_slices(devices) == 1
    mesh = mesh_lib.make_mesh(_with_mesh(tiny_config, -1, 4), devices)
    expected = jax.make_mesh((2, 4), mesh_lib.MESH_AXES, devices=devices)
    assert mesh.shape == expected.shape
    assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.devices.flat]


@dataclasses.dataclass(frozen=True)
class _Device:  # a GPU host's device: no slice index; its process is the granule on DCN
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "stand-in"


def test_without_slice_indices_processes_are_the_slices(tiny_config):
    devices = [_Device(i, i // 4) for i in range(8)]
    mesh = mesh_lib.make_mesh(_with_mesh(tiny_config, -1, 4, num_slices=2), devices)
    assert (mesh_lib.slice_of_devices(mesh) == [[0] * 4, [1] * 4]).all()


@pytest.mark.parametrize("data, fsdp, num_slices, key, message", [
    (1, -1, 2, "mesh.data", "must be a multiple of 2"),  # fsdp over all 8 devices would cross slices
    (-1, 8, 2, "mesh.data", "inside a slice of 4 devices"),
    (-1, 1, 3, "mesh.num_slices", "do not split evenly into 3 slices"),
    (-1, 1, -1, "mesh.num_slices", "positive number of slices"),
])
def test_validation_names_the_mesh_keys(tiny_config, data, fsdp, num_slices, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        validation.validate(_with_mesh(tiny_config, data, fsdp, num_slices), 8)
    assert error.value.key == key


def test_validation_derives_the_slices_from_the_devices(tiny_config):
    _with_mesh(tiny_config, 1, -1)  # fine on one slice, not on two
    validation.validate(tiny_config, 8)
    with pytest.raises(ConfigError, match="mesh.data"):
        validation.validate(tiny_config, 8, num_slices=2)


def test_mesh_refuses_slices_the_devices_do_not_have(tiny_config, two_slices):
    with pytest.raises(ConfigError, match="no slice index and 1 processes") as error:
        mesh_lib.make_mesh(_with_mesh(tiny_config, -1, 4, num_slices=2), jax.devices())
    assert error.value.key == "mesh.num_slices"
    with pytest.raises(ConfigError, match="have 2 slices"):
        mesh_lib.make_mesh(_with_mesh(tiny_config, -1, 4, num_slices=1), two_slices)


def test_dcn_collectives_from_replica_groups():
    slices = np.array([0] * 4 + [1] * 4)
    across = ("%all-reduce.1 = (f32[8]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), channel_id=1, "
              "replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add")
    inside = "%all-gather.2 = f32[16]{0} all-gather(%c), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}"
    iota_across = "%reduce-scatter.3 = f32[2]{0} reduce-scatter(%d), replica_groups=[4,2]<=[2,4]T(1,0), dims={0}"
    found = plan_lib.dcn_collectives("\n".join([across, inside, iota_across]), slices)
    assert found == {"all-reduce": [1, 8 * 4 + 4 * 2], "reduce-scatter": [1, 2 * 4]}


@pytest.fixture(scope="module")
def two_slice_plan(tmp_path_factory):
    from tiny import tiny_config
    config = _with_mesh(tiny_config(), -1, 4)
    config.train.eval_every = config.train.sample_every = 0
    config.train.batch_size = 16
    cache_dir = str(tmp_path_factory.mktemp("plans"))
    return plan_lib.plan_step(config, "v5e:2x2", cache_dir, num_slices=2), config, cache_dir


def test_two_slice_plan_compiles_with_memory_and_dcn_collectives(two_slice_plan):
    plan, _, _ = two_slice_plan
    assert plan.num_slices == 2 and plan.num_devices == 8 and plan.mesh == {"data": 2, "fsdp": 4}
    assert plan.batch_per_device == 2
    assert plan.capacity_bytes == 16 * 2**30  # a v5e chip's HBM, each device a chip
    assert plan.fits and plan.total_bytes > plan.argument_bytes > 0 and plan.flops_per_device > 0
    # The gradients' data-parallel reduction crosses the slices: all-reduces over DCN, of at least the
    # UNet's trainable parameters' fsdp shard (fp32), and no more than the whole state per device.
    count, nbytes = plan.dcn_collectives["all-reduce"]
    assert count > 0 and 0 < nbytes <= plan.argument_bytes
    table = plan_lib.format_table([plan])
    assert "| 2x v5e:2x2 | 2 |" in table
    assert "2 slices x 4 devices; mesh data=2 (2 over DCN x 1 per slice), fsdp=4" in table
    assert "cross-slice (DCN) collectives per step and device:" in table and " all-reduce (" in table


def test_plan_command_takes_num_slices(two_slice_plan, monkeypatch, capsys):
    plan, config, cache_dir = two_slice_plan
    asked = []

    def plan_step(config, topology, cache_dir=None, num_slices=1):
        asked.append((topology, num_slices))
        return plan

    monkeypatch.setattr(plan_lib, "plan_step", plan_step)
    assert cli.main(["sdjax", "plan", f"--config={ROOT}/configs/demo.py", "--topology=v5e:2x2", "--num-slices=2",
                     "--cache_dir="]) == 0
    assert asked == [("v5e:2x2", 2)]
    assert "cross-slice (DCN) collectives" in capsys.readouterr().out
    # The cached plan is the 2-slice one, kept apart from a 1-slice plan of the same config.
    assert plan_lib.cached_plan(config, "v5e:2x2", cache_dir, num_slices=2) == plan
    assert plan_lib.cached_plan(config, "v5e:2x2", cache_dir) is None


def test_num_slices_needs_a_tpu_topology():
    with pytest.raises(ValueError, match="--num_slices 2"):
        plan_lib.target_devices("cpu:8", num_slices=2)
