"""`sdjax plan`: AOT-compiles the real train step for a TPU topology (libtpu on this CPU host) or CPU devices."""

import contextlib
import io
import os
import subprocess
import sys

import jax
import pytest

from sdjax import cli
from sdjax import models as models_lib
from sdjax import plan as plan_lib
from sdjax import roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def plan_config(tiny_config):  # 16 px, as tiny_config: 32 px took the TPU compiles 167 s instead of 94
    tiny_config.train.eval_every = tiny_config.train.sample_every = 0
    return tiny_config


def _with_batch(config, batch_size):
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    return config


def test_tpu_plan_memory_and_flops_grow_with_batch(plan_config):
    # Not batch 1: at tiny batches the TPU compiler's padding and workspace, not activations, set the temps.
    small = plan_lib.plan_step(_with_batch(plan_config, 32), "v5e:2x2")
    large = plan_lib.plan_step(_with_batch(plan_config, 512), "v5e:2x2")
    assert small.num_devices == 4 and small.batch_per_device == 8 and large.batch_per_device == 128
    assert small.fits and large.fits
    assert small.capacity_bytes == 16 * 2**30  # a v5e chip's HBM
    assert large.temp_bytes > small.temp_bytes
    assert large.total_bytes > small.total_bytes
    assert large.flops_per_device > 8 * small.flops_per_device
    assert large.roofline_step_s > small.roofline_step_s > 0
    assert small.argument_bytes > 0 and small.images_per_s_per_device > 0


def test_batch_far_beyond_hbm_reports_does_not_fit(plan_config):
    plan_config.data.resolution = 128
    plan = plan_lib.plan_step(_with_batch(plan_config, 4 * 4096), "v5e:2x2")
    assert not plan.fits
    assert plan.error is not None or plan.total_bytes > plan.capacity_bytes
    assert "NO: does not fit" in plan_lib.format_table([plan])


def _fake_compiles(monkeypatch, total_bytes, capacity_bytes=float(2**20), refusals_have_totals=True):
    """plan_step replaced by a memory model total_bytes(per-device batch); returns the batches compiled.
    `refusals_have_totals=False`: a batch that does not fit has no figures, as when XLA refuses it."""
    compiled = []

    def plan_step(config, topology, cache_dir=None):
        batch = config.train.batch_size // 4
        compiled.append(batch)
        total = total_bytes(batch)
        fits = total <= capacity_bytes
        return plan_lib.Plan(topology=topology, num_devices=4, batch_per_device=batch,
                             global_batch=config.train.batch_size, fits=fits,
                             total_bytes=total if fits or refusals_have_totals else None,
                             capacity_bytes=capacity_bytes)

    monkeypatch.setattr(plan_lib, "plan_step", plan_step)
    return compiled


# Doubling then bisection would compile 1, 2, 4, 8, 16, 32, 64 and then about log2 of the last gap (7-11).
@pytest.mark.parametrize("total_bytes, most_compiles", [
    (lambda b: 100_000 + 30_000 * b, 4),  # a line (answer 31): 1, 2, the crossing's neighbour, the crossing
    (lambda b: 100_000 + 20_000 * b + 900 * b * b, 8),  # bent (answer 23)
    (lambda b: 100_000 + 30_000 * b + (40_000 if b % 8 else 0), 4),  # padding steps (answer 30)
    (lambda b: 300_000 + 8_000 * b, 3),  # past the limit of 64: 1, 2, 64
])
def test_max_batch_search_finds_the_largest_fitting_batch_in_few_compiles(plan_config, monkeypatch, total_bytes,
                                                                          most_compiles):
    compiled = _fake_compiles(monkeypatch, total_bytes)
    best, plans = plan_lib.max_batch_per_device(plan_config, "v5e:2x2", None, limit=64)
    expected = max(b for b in range(1, 65) if total_bytes(b) <= 2**20)
    assert best == expected and [p.batch_per_device for p in plans] == compiled
    assert len(compiled) <= most_compiles, compiled


def test_max_batch_search_bisects_when_xla_flattens_the_curve_near_the_limit(plan_config, monkeypatch):
    # As SD 1.5 with FSDP on v5e: memory grows per image until XLA starts rematerialising near the limit,
    # then hardly at all (5, 6 and 11 images/chip: 14.13, 14.48, 14.61 GiB of 16), and refusals come with no
    # totals. The line through the flat part points far past the answer; stepping down from a refused batch
    # one at a time compiled 65, 64, ..., 59 there.
    capacity = 2**20

    def total_bytes(b):
        return capacity * (0.70 + 0.04 * b if b <= 5 else 0.90 + 0.002 * (b - 5) if b <= 20 else 2.0)

    compiled = _fake_compiles(monkeypatch, total_bytes, refusals_have_totals=False)
    messages = []
    best, _ = plan_lib.max_batch_per_device(plan_config, "v5e:2x2", None, limit=64, progress=messages.append)
    assert best == 20
    assert len(compiled) <= 11, compiled  # 1, 2, 8, 13, 56, 55, then bisection; stepping down: 40 compiles
    # Each compile is announced, then its outcome (a real model's search runs for hours).
    assert len(messages) == 2 * len(compiled)
    assert messages[0].startswith("compiling 1 per device") and messages[1].startswith("1 per device: fits")


def test_max_batch_search_against_a_smaller_capacity(plan_config, monkeypatch):
    _fake_compiles(monkeypatch, lambda b: 100_000 + 30_000 * b)
    best, plans = plan_lib.max_batch_per_device(plan_config, "v5e:2x2", None, capacity_bytes=400_000)
    assert best == 10 and all(p.capacity_bytes == 400_000 for p in plans)
    assert {p.batch_per_device: p.fits for p in plans}[11] is False


def test_max_batch_search_starts_from_a_batch_in_the_cache(plan_config, monkeypatch, tmp_path):
    def total_bytes(b):
        return 100_000 + 30_000 * b  # answer 31

    # An earlier `sdjax plan` at 16 per device, cached: state 100_000 bytes, 30_000 per image.
    seen = plan_lib.Plan(topology="v5e:2x2", num_devices=4, global_batch=64, batch_per_device=16, fits=True,
                         capacity_bytes=float(2**20), argument_bytes=100_000, output_bytes=0, alias_bytes=0,
                         temp_bytes=480_000, total_bytes=total_bytes(16))
    plan_lib._save(seen, plan_lib._cache_path(_with_batch(plan_config, 64), "v5e:2x2", str(tmp_path)))
    compiled = _fake_compiles(monkeypatch, total_bytes)
    best, plans = plan_lib.max_batch_per_device(plan_config, "v5e:2x2", str(tmp_path), limit=64)
    assert best == 31
    assert compiled == [32, 31]  # the line from its fixed bytes through 16: just above, then the crossing
    assert [p.batch_per_device for p in plans] == [16, 32, 31]


def test_a_cached_plan_with_stale_loop_counts_is_compiled_again(plan_config, tmp_path):
    plan_config.model.scan_layers = True
    path = plan_lib._cache_path(plan_config, "v5e:2x2", str(tmp_path))

    def cache(**fields):
        plan_lib._save(plan_lib.Plan(topology="v5e:2x2", num_devices=4, global_batch=8, batch_per_device=2,
                                     fits=True, **fields), path)
        return plan_lib.cached_plan(plan_config, "v5e:2x2", str(tmp_path))

    assert cache(loops=0) is None  # scanned, cached before loops were counted
    assert cache(loops=4, loop_flops=2e12, loop_counting=1) is None  # counted every convolution window position
    assert cache(loops=4, loop_flops=1e12, loop_counting=plan_lib.LOOP_COUNTING).loop_flops == 1e12


def test_max_batch_of_a_real_compile_on_cpu_devices_is_confirmed_by_its_neighbour(plan_config, tmp_path):
    plan_config.data.resolution = 32  # at 16 px the totals of batches 1-3 are off a line: one more compile
    two, three = (plan_lib.plan_step(_with_batch(plan_config, 8 * b), "cpu:8", str(tmp_path)) for b in (2, 3))
    assert three.total_bytes > two.total_bytes
    capacity = (two.total_bytes + three.total_bytes) / 2  # 2 per device fits, 3 does not
    best, plans = plan_lib.max_batch_per_device(plan_config, "cpu:8", str(tmp_path), capacity_bytes=capacity)
    assert best == 2
    assert [p.batch_per_device for p in plans] == [2, 3]  # no compile: both from the cache of those above
    assert not plans[-1].fits and plans[-1].capacity_bytes == capacity


def test_cli_plan_on_cpu_devices_prints_table_and_caches(tmp_path):
    argv = ["sdjax", "plan", "--config", "configs/demo.py", "--topology", "cpu:8", "--cache_dir", str(tmp_path),
            "--config.data.resolution=16", "--config.train.batch_size=8", "--config.train.xla_optimization_level=O1"]
    for attempt in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0
        table = out.getvalue()
        assert "| cpu:8 | 1 |" in table and "yes" in table, table
        assert "compiled at XLA optimization level O1" in table, table  # also from the cache
        assert len(os.listdir(tmp_path)) == 1  # one cached compile result, reused by the second call


def test_tpu_compiler_starts_without_error_messages_on_a_host_without_tpu():
    # A fresh process: libtpu prints its start-up complaints once, when it is first loaded.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    code = "from sdjax import plan; print(len(plan.target_devices('v5p:2x2x1')), plan._accelerator_type('v5p:2x2x1'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "v5p-8"]  # Cloud TPU counts v5p's TensorCores, 2 per chip
    assert "INVALID_ARGUMENT" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert plan_lib._accelerator_type("v5e:4x4") == "v5litepod-16"


def test_other_commands_start_without_libtpu_error_messages_on_a_host_without_tpu(tmp_path):
    # `sdjax train` with a bad config: it starts JAX's backends (libtpu too, where jax[tpu] is installed, as in
    # the test extra), then stops at the config check. As from a user's shell: no JAX_PLATFORMS=cpu (conftest's).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    proc = subprocess.run(
        [sys.executable, "-m", "sdjax.cli", "train", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
         f"--workdir={tmp_path}", "--config.train.batch_size=0"], env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode != 0 and "config.train.batch_size=0 is invalid" in proc.stderr, proc.stderr
    assert "INVALID_ARGUMENT" not in proc.stderr and "TPU_ACCELERATOR_TYPE" not in proc.stderr, proc.stderr


def test_unknown_topology_is_a_clear_error(plan_config):
    with pytest.raises(ValueError, match="expected one of"):
        plan_lib.plan_step(plan_config, "v9x:2x2")


# Published parameter counts: SD 1.5 UNet ~860M, VAE ~84M, CLIP ViT-L/14 text ~123M; SD 2.1 UNet ~866M,
# OpenCLIP ViT-H/14 text ~340M; SDXL UNet ~2.6B, OpenCLIP ViT-bigG/14 text with projection ~695M. Exact values
# are what diffusers/transformers build for these configs.
@pytest.mark.parametrize("name,expected", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sd21", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840}),
])
def test_real_configs_have_published_parameter_counts(name, expected):
    from tiny import load_config_file
    config = load_config_file(name)
    shapes = models_lib.param_shapes(models_lib.build_models(config), config)
    counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    assert counts == expected


class _FakeDevice:
    def __init__(self, device_kind, bytes_limit=None, platform="tpu"):
        self.device_kind, self._bytes_limit, self.platform = device_kind, bytes_limit, platform

    def memory_stats(self):
        return {"bytes_limit": self._bytes_limit} if self._bytes_limit else None


def test_local_devices_are_recognised_by_kind_with_the_runtime_hbm_when_reported():
    assert roofline.local_device_spec(_FakeDevice("TPU v5 lite")) == roofline.CHIPS["v5e"]
    assert roofline.local_device_spec(_FakeDevice("TPU v4")) == roofline.CHIPS["v4"]
    assert roofline.local_device_spec(_FakeDevice("TPU v5")) == roofline.CHIPS["v5p"]  # what libtpu calls a v5p
    h100 = roofline.local_device_spec(_FakeDevice("NVIDIA H100 80GB HBM3", bytes_limit=79 * 2**30))
    assert h100.peak_bf16_flops == roofline.CHIPS["h100"].peak_bf16_flops and h100.hbm_bytes == 79 * 2**30
    assert roofline.local_device_spec(_FakeDevice("cpu")) is None
    with pytest.raises(ValueError, match="expected one of"):  # GPUs are local devices, not TPU topologies
        plan_lib.target_devices("h100:2x2")


def test_measured_step_is_reported_against_the_roofline_of_the_device():
    v5e = roofline.CHIPS["v5e"]
    flops, bytes_accessed = 1e13, 1e9  # compute-bound on a v5e: 1e13 / 197e12 = 0.0508 s
    report = roofline.measured_against_roofline(0.1, flops, bytes_accessed, _FakeDevice("TPU v5 lite"))
    assert report["roofline_step_s"] == pytest.approx(flops / v5e.peak_bf16_flops)
    assert report["roofline_fraction"] == pytest.approx(flops / v5e.peak_bf16_flops / 0.1)
    assert report["achieved_tflops_per_device"] == pytest.approx(100.0)
    assert "51% of it" in roofline.describe_speed(report)
    memory_bound = roofline.measured_against_roofline(0.1, 1e12, 1e11, _FakeDevice("TPU v5 lite"))
    assert memory_bound["roofline_step_s"] == pytest.approx(1e11 / v5e.hbm_bytes_per_s)
    on_cpu = roofline.measured_against_roofline(0.1, flops, bytes_accessed, _FakeDevice("cpu"))
    assert "roofline_fraction" not in on_cpu and "no roofline" in roofline.describe_speed(on_cpu)


class _FakeStage:
    """A lowered or compiled step's cost analysis, as XLA reports it."""

    def __init__(self, flops, bytes_accessed):
        self._cost = [{"flops": flops, "bytes accessed": bytes_accessed}]

    def cost_analysis(self):
        return self._cost


def test_gpu_step_flops_are_counted_in_the_program_as_written():
    # XLA:GPU's compiled cost analysis leaves out the cuDNN/cuBLAS calls (a fraction of the FLOPs); the lowered
    # program is global: its FLOPs are split over the devices. Elsewhere the compiled analysis stands.
    lowered, compiled = _FakeStage(8e12, 9e11), _FakeStage(3e11, 1e11)
    gpus = [_FakeDevice("NVIDIA H200", platform="gpu")] * 4
    assert roofline.executable_cost(lowered, compiled, gpus) == (2e12, 1e11)
    assert roofline.executable_cost(lowered, compiled, [_FakeDevice("TPU v5 lite")] * 4) == (3e11, 1e11)
    # Where the compiler counts everything (CPU here), the two analyses agree: the lowered count is the
    # step's arithmetic, not an estimate of another kind.
    def conv_and_dot(x, kernel, w):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.numpy.tanh(y.reshape(y.shape[0], -1) @ w)

    shapes = [jax.ShapeDtypeStruct(s, "float32") for s in ((8, 16, 16, 32), (3, 3, 32, 32), (8192, 64))]
    lowered = jax.jit(jax.grad(lambda *a: conv_and_dot(*a).sum(), argnums=(1, 2))).lower(*shapes)
    on_cpu = roofline.executable_cost(lowered, lowered.compile(), jax.devices("cpu"))
    as_written = roofline.executable_cost(lowered, _FakeStage(0.0, 1.0), [_FakeDevice("gpu", platform="gpu")])
    assert on_cpu[0] > 2 * 8 * 16 * 16 * 9 * 32 * 32  # at least the forward convolution's multiply-adds
    assert as_written[0] == pytest.approx(on_cpu[0], rel=0.1)
