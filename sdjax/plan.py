"""`sdjax plan`: will this config fit, and how fast should it run, on a given accelerator topology?

The real train step (same models, mesh, shardings and optimizer as `sdjax train`) is compiled ahead of time
from `jax.ShapeDtypeStruct`s — no weights are materialised — for the target devices:
  * a TPU topology (`v5e:2x2`, `v5p:2x2x1`, ...) via libtpu's compiler, which runs on a CPU host;
  * `cpu:N` (N emulated CPU devices) or `local` (the devices present).
With `num_slices` > 1, several slices of the TPU topology joined by the data-center network (multislice): the
mesh is then the hybrid one `sdjax train` builds there (data over the slices, fsdp inside one; sdjax/mesh.py),
and the plan counts the step's cross-slice (DCN) collectives in the compiled program.
XLA's memory analysis gives per-device bytes; its cost analysis gives FLOPs and bytes accessed, which against
the chip's peak bf16 FLOP/s and HBM bandwidth give a roofline step time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import hlo_text as hlo_lib
from sdjax import libtpu_host
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import run_config
from sdjax import training_setup
from sdjax import validation
from sdjax.models import tpu_attention
from sdjax.roofline import CHIPS, GiB, ChipSpec, local_device_spec, roofline_step_s, step_cost


@dataclasses.dataclass
class Plan:
    topology: str
    num_devices: int
    batch_per_device: int
    global_batch: int
    fits: bool
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    total_bytes: int | None = None
    capacity_bytes: float | None = None
    flops_per_device: float | None = None
    bytes_accessed_per_device: float | None = None
    roofline_step_s: float | None = None
    images_per_s_per_device: float | None = None
    compile_s: float | None = None
    error: str | None = None
    num_slices: int = 1
    mesh: dict | None = None  # axis -> size
    # Cross-slice collectives of the compiled step: kind ("all-reduce", ...) -> [count, bytes per device].
    dcn_collectives: dict | None = None
    # Splash attention kernel calls in the compiled step, and the FLOPs and bytes counted for them
    # (tpu_attention.compiled_kernel_costs), included in flops_per_device and bytes_accessed_per_device.
    attention_kernel_calls: int = 0
    attention_kernel_flops: float | None = None
    attention_kernel_bytes: float | None = None
    # Loops in the compiled step that run more than once (scanned layers), and their bodies' repeats, which
    # XLA's cost analysis counts once (sdjax/hlo_text.py): the FLOPs are included in flops_per_device, the
    # bytes (an estimate that over-reads) are not in bytes_accessed_per_device.
    loops: int = 0
    loop_flops: float | None = None
    loop_bytes: float | None = None
    loop_counting: int = 0  # LOOP_COUNTING when the loops were counted
    xla_optimization_level: str = ""  # train.xla_optimization_level the step was compiled at ("": the default)


# The version of hlo_text's counting that `loop_flops` came from: 1 counted every window position of a
# convolution (TPU programs' batched matmuls are convolutions over padding: a scanned SDXL step's loops came
# out 2x); 2 counts the positions that read real input, as XLA does. A cached plan with loops counted by an
# older version is compiled again.
LOOP_COUNTING = 2


def _chip_name(topology: str) -> str | None:
    generation = topology.split(":")[0].lower()
    return generation if generation in CHIPS and CHIPS[generation].platform == "tpu" else None


def target_devices(topology: str, num_slices: int = 1) -> list:
    """The devices to compile for: a TPU topology description (`num_slices` slices of it), emulated CPU
    devices, or the local ones."""
    # On a host with jax[tpu] but no TPU chip: the slice compiled for (any, for a CPU or local plan).
    generation = _chip_name(topology)
    libtpu_host.quiet_start_up(_accelerator_type(topology) if generation else libtpu_host.NO_TPU_ACCELERATOR_TYPE)
    if num_slices < 1 or (num_slices > 1 and generation is None):
        raise ValueError(f"--num_slices {num_slices}: expected 1, or several slices of a TPU topology "
                         f"(not --topology {topology})")
    if topology == "local":
        return jax.devices()
    if topology.startswith("cpu:"):
        count = int(topology.split(":")[1])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ValueError(f"--topology {topology}: only {len(devices)} CPU devices; set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={count} before starting.")
        return devices[:count]
    if generation is None:
        tpus = sorted(name for name, spec in CHIPS.items() if spec.platform == "tpu")
        raise ValueError(f"--topology {topology!r}: expected one of {tpus} as 'v5e:2x2', or 'cpu:N', "
                         "or 'local'.")
    # libtpu is used here as a compiler only: let it coexist with other processes that load it, and keep
    # its complaints about the missing TPU hardware off the console.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 num_slices=num_slices).devices)
    except Exception as e:  # libtpu missing or a bad topology string
        raise ValueError(f"--topology {topology!r}: cannot get TPU devices ({e}). Install the TPU compiler with "
                         "pip install 'sdjax[tpu]'.") from None


def _accelerator_type(topology: str) -> str:
    """Cloud TPU's name for a slice of this topology: v5e and v6e count chips, v4 and v5p TensorCores (2 per
    chip): v5e:2x2 -> v5litepod-4, v5p:2x2x1 -> v5p-8."""
    generation = _chip_name(topology)
    chips = _num_chips(topology)
    return {"v4": f"v4-{2 * chips}", "v5e": f"v5litepod-{chips}", "v5p": f"v5p-{2 * chips}",
            "v6e": f"v6e-{chips}"}[generation]


def _num_chips(topology: str) -> int:
    return math.prod(int(d) for d in re.findall(r"\d+", topology.split(":")[1]))


def _device_spec(topology: str, devices: list, num_slices: int = 1) -> ChipSpec | None:
    """Per-device figures: the chip's, divided among its cores when each core is its own device."""
    if topology == "local":
        return local_device_spec(devices[0])
    chip = _chip_name(topology)
    if chip is None:
        return None
    per_chip = max(len(devices) // (_num_chips(topology) * num_slices), 1)
    spec = CHIPS[chip]
    return ChipSpec(spec.hbm_bytes / per_chip, spec.peak_bf16_flops / per_chip, spec.hbm_bytes_per_s / per_chip)


# Changes when the same config compiles to another step (2: `auto` runs splash attention on TPU; 3:
# model.scan_layers scans runs of same-shaped UNet layers; 4: activations pinned to the batch split,
# sdjax/models/batch_sharding.py; 5: the upsampler's repeat pinned too), so plans cached before are not reused.
STEP_VERSION = 5


def _cache_key(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1) -> str:
    key = {"config": config.to_json_best_effort(sort_keys=True), "topology": topology, "jax": jax.__version__,
           "step": STEP_VERSION}
    if num_slices > 1:  # one slice: the key of the plans cached before multislice
        key["num_slices"] = num_slices
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(config: ml_collections.ConfigDict, topology: str, cache_dir: str | None,
                num_slices: int = 1) -> str | None:
    return os.path.join(cache_dir, _cache_key(config, topology, num_slices) + ".json") if cache_dir else None


def _load(cache_path: str | None, config: ml_collections.ConfigDict) -> Plan | None:
    """The cached plan, unless its FLOPs are stale: a scanned step's cached before loops were counted (a loop
    body's once), or one whose loops an older version of the counting counted."""
    if not cache_path or not os.path.isfile(cache_path):
        return None
    with open(cache_path) as f:
        plan = Plan(**json.load(f))
    if plan.fits and config.model.get("scan_layers", False) and not plan.loops:
        return None
    if plan.loops and plan.loop_counting < LOOP_COUNTING:
        return None
    return plan


def cached_plan(config: ml_collections.ConfigDict, topology: str, cache_dir: str | None,
                num_slices: int = 1) -> Plan | None:
    """The plan of this config on this topology if an earlier `plan_step` cached it (no compile), and its
    FLOPs are not stale (`_load`)."""
    return _load(_cache_path(config, topology, cache_dir, num_slices), config)


def plan_step(config: ml_collections.ConfigDict, topology: str, cache_dir: str | None = None,
              num_slices: int = 1) -> Plan:
    """Compiles the train step for `topology` (`num_slices` of it) at `config.train.batch_size` and reads
    XLA's analyses."""
    devices = target_devices(topology, num_slices)
    run_config.resolve(config)
    validation.validate(config, len(devices), num_slices=mesh_lib.device_slices(devices))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    cache_path = _cache_path(config, topology, cache_dir, num_slices)
    cached = _load(cache_path, config)
    if cached is not None:
        return cached

    models = models_lib.build_models(config)
    validation.validate_against_models(config, models)
    setup = training_setup.build(config, devices, models=models)
    spec = _device_spec(topology, devices, num_slices)
    plan = Plan(topology=topology, num_devices=len(devices), global_batch=config.train.batch_size,
                batch_per_device=config.train.batch_size // len(devices), fits=False,
                capacity_bytes=spec.hbm_bytes if spec else None, num_slices=num_slices,
                mesh=dict(setup.mesh.shape),
                xla_optimization_level=config.train.get("xla_optimization_level", ""))
    start = time.perf_counter()
    try:
        lowered, compiled = setup.compile(planned_batch(setup), jax.eval_shape(lambda: jax.random.key(0)))
    except Exception as e:  # XLA refuses programs that exceed HBM: report it as "does not fit"
        plan.compile_s = time.perf_counter() - start
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
            raise
        plan.error = " ".join(message.split())[:600]
        _save(plan, cache_path)
        return plan
    plan.compile_s = time.perf_counter() - start

    memory = compiled.memory_analysis()
    plan.argument_bytes = int(memory.argument_size_in_bytes)
    plan.output_bytes = int(memory.output_size_in_bytes)
    plan.temp_bytes = int(memory.temp_size_in_bytes)
    plan.alias_bytes = int(memory.alias_size_in_bytes)
    # Donated state aliases its outputs: count those bytes once.
    plan.total_bytes = plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes
    plan.fits = plan.capacity_bytes is None or plan.total_bytes <= plan.capacity_bytes
    if num_slices > 1:
        plan.dcn_collectives = dcn_collectives(compiled.as_text(), mesh_lib.slice_of_devices(setup.mesh).ravel())

    cost = step_cost(lowered, compiled, devices)
    plan.flops_per_device, plan.bytes_accessed_per_device = cost.flops, cost.bytes_accessed
    if cost.loops.loops:
        plan.loops, plan.loop_flops, plan.loop_bytes = cost.loops.loops, cost.loops.extra_flops, cost.loops.extra_bytes
        plan.loop_counting = LOOP_COUNTING
    # XLA's cost analysis counts nothing inside a custom call: the attention kernels' are added analytically.
    calls, kernel_flops, kernel_bytes = tpu_attention.compiled_kernel_costs(compiled.as_text())
    if calls:
        plan.attention_kernel_calls, plan.attention_kernel_flops, plan.attention_kernel_bytes = \
            calls, kernel_flops, kernel_bytes
        plan.flops_per_device = (plan.flops_per_device or 0.0) + kernel_flops
        plan.bytes_accessed_per_device = (plan.bytes_accessed_per_device or 0.0) + kernel_bytes
    if spec and plan.flops_per_device:
        plan.roofline_step_s = roofline_step_s(plan.flops_per_device, plan.bytes_accessed_per_device, spec)
        plan.images_per_s_per_device = plan.batch_per_device / plan.roofline_step_s
    _save(plan, cache_path)
    return plan


def planned_batch(setup: training_setup.TrainingSetup) -> dict:
    """ShapeDtypeStructs of the global batch `sdjax train` feeds this config's step: images, or from a latent
    cache (data.latent_cache) the VAE posterior's moments instead of pixels, and with data.cache_text_states
    the chosen captions' text states instead of token ids (sdjax/data/latent_cache.py): a UNet-only step."""
    batch = setup.abstract_batch()
    config, models = setup.config, setup.models
    if not config.data.latent_cache:
        return batch
    b, sharding = config.train.batch_size, setup.batch_sharding
    side = config.data.resolution // models.vae_scale_factor
    moments = jax.ShapeDtypeStruct((b, side, side, models.latent_channels), jnp.float32, sharding=sharding)
    del batch["pixel_values"]
    batch.update(latent_mean=moments, latent_std=moments)
    if config.data.get("cache_text_states"):
        dtype = models_lib.compute_dtype(config.train.precision)  # cached in the dtype the step computes them in
        del batch["input_ids"]
        batch["encoder_hidden_states"] = jax.ShapeDtypeStruct(
            (b, config.data.max_length, models.unet.cross_attention_dim), dtype, sharding=sharding)
        if models.sdxl:
            batch["text_embeds"] = jax.ShapeDtypeStruct((b, models.text_encoder_2_config.projection_dim), dtype,
                                                        sharding=sharding)
    return batch


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")
# libtpu compiles a multislice program per slice: its cross-slice collectives are host transfers to the
# megascale (DCN) runtime, a send and a recv each, named by the attributes below.
_MEGASCALE_SEND = re.compile(r"=\s*\(?(.*?)\ssend\(.*_xla_megascale_transfer_type=\"(\w+)\"")


def _replica_groups(line: str) -> list[list[int]] | None:
    """An HLO collective's replica groups: listed ({{0,1},{2,3}}) or as an iota ([2,2]<=[2,2]T(1,0))."""
    listed = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    if listed:
        return [[int(i) for i in group.split(",") if i] for group in re.findall(r"\{([\d,]*)\}", listed.group(1))]
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if not iota:
        return None
    shape, dims = [[int(d) for d in g.split(",")] for g in iota.groups()[:2]]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
        ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()


def dcn_collectives(hlo_text: str, slice_of_device: np.ndarray) -> dict[str, list[int]]:
    """The collectives of a compiled program that cross slices: kind -> [count, bytes each device sends],
    ("all-reduce", "all-gather", ...). Counted from libtpu's megascale transfers where it lowered them so,
    else from collectives whose replica groups (global device ids, in the mesh's device order:
    `slice_of_device[i]` is device i's slice) hold devices of several slices."""
    found: dict[str, list[int]] = {}

    def add(kind: str, nbytes: int) -> None:
        entry = found.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    for line in hlo_text.splitlines():
        send = _MEGASCALE_SEND.search(line) if "_xla_megascale_transfer_type" in line else None
        if send:
            # (the payload, a u32 context, a token): the payload's bytes
            payload = hlo_lib.ARRAY.search(send.group(1))
            add(send.group(2).lower().replace("_", "-"), hlo_lib.array_bytes(payload.group(0)) if payload else 0)
            continue
        collective = _COLLECTIVE.search(line)
        if collective:
            groups = _replica_groups(line)
            if groups and any(len({int(slice_of_device[i]) for i in group}) > 1 for group in groups):
                add(collective.group(2), hlo_lib.array_bytes(collective.group(1)))
    return found


def _save(plan: Plan, cache_path: str | None) -> None:
    if cache_path:
        with open(cache_path, "w") as f:
            json.dump(dataclasses.asdict(plan), f)


def max_batch_per_device(config: ml_collections.ConfigDict, topology: str, cache_dir: str | None,
                         limit: int = 256, capacity_bytes: float | None = None,
                         progress=None, num_slices: int = 1) -> tuple[int, list[Plan]]:
    """The largest per-device batch whose step fits the device's HBM (or `capacity_bytes`, e.g. to leave
    headroom); returns it and every plan compiled (or read from the cache) on the way.

    A step's memory grows about linearly with the batch (the state is fixed, activations are per image), so
    after batches 1 and 2 it compiles the batch just above where the line through the two largest batches
    that fit reaches the capacity (above: a batch that does not fit fails in about a minute, one that fits
    compiles in full, 6-10 minutes for SD 1.5 on a 2-core host), then interpolates between the largest batch
    that fits and the smallest that does not (regula falsi). On a line that is 4 compiles (1, 2, the
    crossing's neighbour, the crossing), where doubling then bisection takes about 2 log2(answer); where
    XLA's padding and rematerialisation bend the line it still closes in, and where they flatten it so much
    that it points past a batch already refused, it bisects. Without a capacity (CPU devices) it doubles up
    to `limit`.

    Batches already in `cache_dir` (earlier plans and searches of the same config) start the search, so an
    interrupted search continues where it stopped, and one `sdjax plan --config.train.batch_size=N` that
    fits is enough to start from N: the line then runs from the step's fixed bytes at batch 0 (its
    arguments and outputs, less the donated ones) through N. `progress(message)`, if given, hears of each
    compile as it starts and ends (a real model's search runs for hours)."""
    num_devices = len(target_devices(topology, num_slices))
    slices = {"num_slices": num_slices} if num_slices > 1 else {}
    tried: list[Plan] = []
    totals: dict[int, int] = {}  # per-device batch -> total bytes, of the compiles that have one

    def with_batch(per_device: int) -> ml_collections.ConfigDict:
        trial = config.copy_and_resolve_references()
        trial.train.batch_size = per_device * num_devices
        return trial

    def record(plan: Plan) -> bool:
        plan = with_capacity(plan, capacity_bytes)
        tried.append(plan)
        if plan.total_bytes is not None:
            totals[plan.batch_per_device] = plan.total_bytes
        return plan.fits

    def crossing(a: int, b: int) -> int | None:
        """Where the line through the totals of batches a < b reaches the capacity."""
        capacity = tried[0].capacity_bytes
        if capacity is None or a not in totals or b not in totals or totals[b] <= totals[a]:
            return None
        return a + int((capacity - totals[a]) * (b - a) // (totals[b] - totals[a]))

    fitting: list[int] = []
    refused: list[int] = []
    for per_device in range(1, limit + 1):
        cached = cached_plan(with_batch(per_device), topology, cache_dir, num_slices)
        if cached is not None:
            (fitting if record(cached) else refused).append(per_device)
    # The largest batch known to fit, the smallest above it known not to (or past the limit).
    low = max(fitting, default=0)
    high = min((b for b in refused if b > low), default=limit + 1)
    if len(fitting) == 1 and low > 1:  # one batch from the cache: its fixed bytes stand for batch 0
        plan = next(p for p in tried if p.batch_per_device == low)
        totals[0] = plan.argument_bytes + plan.output_bytes - plan.alias_bytes
        fitting.insert(0, 0)
    while high - low > 1:
        if len(fitting) < 2:
            probe = len(fitting) + 1
        elif high > limit:  # nothing failed yet: extrapolate (or double)
            predicted = crossing(fitting[-2], low)
            probe = 2 * low if predicted is None else predicted + 1
        else:
            # XLA's refusals have no totals: then the line through the fitting batches, unless it points at
            # or past a batch already refused (XLA rematerialised near the limit and flattened the curve:
            # stepping down from there would compile every batch in between), else bisection.
            predicted = crossing(low, high) or crossing(fitting[-2], low)
            probe = predicted if predicted is not None and predicted < high else (low + high) // 2
        probe = min(max(probe, low + 1), high - 1, limit)
        if progress:
            progress(f"compiling {probe} per device (largest that fits so far: {low or 'none'}; smallest "
                     f"refused: {high if high <= limit else 'none'})")
        fits = record(plan_step(with_batch(probe), topology, cache_dir, **slices))
        if progress:
            plan = tried[-1]
            memory = "" if plan.total_bytes is None else f", {plan.total_bytes / GiB:.2f} GiB"
            took = "" if plan.compile_s is None else f" ({plan.compile_s:.0f} s)"
            progress(f"{probe} per device: {'fits' if fits else 'does not fit'}{memory}{took}")
        if fits:
            low = probe
            fitting.append(probe)
        else:
            high = probe
    return low, tried


def with_capacity(plan: Plan, capacity_bytes: float | None) -> Plan:
    """`plan` judged against `capacity_bytes` per device instead of the chip's HBM (None: as it is)."""
    if capacity_bytes is None:
        return plan
    return dataclasses.replace(plan, capacity_bytes=capacity_bytes,
                               fits=plan.total_bytes is not None and plan.total_bytes <= capacity_bytes)


COLUMNS = ("topology", "batch/dev", "args GiB", "out GiB", "temp GiB", "total GiB", "HBM GiB/dev", "fits",
           "TFLOP/dev/step", "roofline s/step", "img/s/dev", "compile s")


def _row(plan: Plan) -> list[str]:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    def gib(value):
        return fmt(None if value is None else value / GiB, ".2f")

    topology = plan.topology if plan.num_slices == 1 else f"{plan.num_slices}x {plan.topology}"
    return [topology, str(plan.batch_per_device), gib(plan.argument_bytes), gib(plan.output_bytes),
            gib(plan.temp_bytes), gib(plan.total_bytes), gib(plan.capacity_bytes),
            "yes" if plan.fits else "NO: does not fit",
            fmt(None if plan.flops_per_device is None else plan.flops_per_device / 1e12, ".3f"),
            fmt(plan.roofline_step_s, ".3g"), fmt(plan.images_per_s_per_device, ".1f"), fmt(plan.compile_s, ".0f")]


def format_table(plans: list[Plan]) -> str:
    """A markdown table, one row per plan; compiler messages for plans that did not fit below it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(p)) + " |" for p in plans]
    lines += [f"\n{p.topology} batch/dev {p.batch_per_device}: {p.error}" for p in plans if p.error]
    lines += [f"\n{multislice_summary(p)}" for p in plans if p.num_slices > 1]
    lines += [f"\nbatch/dev {p.batch_per_device}: {attention_kernel_summary(p)}" for p in plans
              if p.attention_kernel_calls]
    lines += [f"\nbatch/dev {p.batch_per_device}: {loop_summary(p)}" for p in plans if p.loops]
    lines += [f"\nbatch/dev {p.batch_per_device}: compiled at XLA optimization level {p.xla_optimization_level} "
              "(train.xla_optimization_level): memory and speed are that level's, not the default's "
              "(docs/planning.md)." for p in plans if p.xla_optimization_level]
    return "\n".join(lines)


def loop_summary(plan: Plan) -> str:
    """Where the plan's FLOPs and bytes of repeated loop bodies (scanned layers) come from, in a line."""
    return (f"TFLOP/dev/step and the roofline include {plan.loop_flops / 1e12:.3f} TFLOP per device of "
            f"{plan.loops} loops' repeated bodies (scanned layers, micro-batches, VAE chunks), counted from the "
            "compiled program's text: XLA's cost analysis counts a loop body once (sdjax/hlo_text.py). Their bytes "
            f"are XLA's count of one trip, a floor (the text's estimate of the rest, {plan.loop_bytes / GiB:.2f} "
            "GiB, is not added: it over-reads).")


def attention_kernel_summary(plan: Plan) -> str:
    """Where the plan's FLOPs and bytes of the attention kernels come from, in a line."""
    return (f"TFLOP/dev/step and the roofline include {plan.attention_kernel_calls} splash attention kernel calls, "
            f"{plan.attention_kernel_flops / 1e12:.3f} TFLOP and {plan.attention_kernel_bytes / GiB:.2f} GiB "
            "per device, counted analytically (XLA's cost analysis does not see inside them; "
            "sdjax/models/tpu_attention.py compiled_kernel_costs); the rest is XLA's cost analysis.")


def multislice_summary(plan: Plan) -> str:
    """The slices, the mesh over them and the step's cross-slice (DCN) collectives, in a line."""
    per_slice = plan.num_devices // plan.num_slices
    mesh = plan.mesh or {}
    text = (f"{plan.num_slices}x {plan.topology} batch/dev {plan.batch_per_device}: {plan.num_slices} slices x "
            f"{per_slice} devices; mesh data={mesh.get('data', '?')} ({plan.num_slices} over DCN x "
            f"{mesh.get('data', 0) // plan.num_slices} per slice), fsdp={mesh.get('fsdp', '?')} inside each slice")
    if plan.dcn_collectives is None:
        return text + "; no compiled step to count its DCN collectives"
    kinds = ", ".join(f"{count} {kind} ({nbytes / 2**20:.2f} MiB)"
                      for kind, (count, nbytes) in sorted(plan.dcn_collectives.items()))
    return text + f"; cross-slice (DCN) collectives per step and device: {kinds or 'none'}"
