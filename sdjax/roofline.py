"""What a step can do on a chip: the published figures of each chip (HBM, peak bf16 FLOP/s, HBM bandwidth),
XLA's cost analysis of a compiled step, and the roofline (the step is no faster than its FLOPs at peak compute
or its bytes at peak bandwidth). `sdjax plan` judges a step compiled for a TPU topology by it; `sdjax train`
reports its measured step time against it (WORKDIR/speed.json).
"""

from __future__ import annotations

import dataclasses

from sdjax import hlo_text

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (Google Cloud TPU docs, NVIDIA datasheets: dense, no sparsity): HBM, peak
    bf16 FLOP/s, HBM bandwidth; and the `device.device_kind` prefixes JAX reports for the chip."""
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    device_kinds: tuple[str, ...] = ()
    platform: str = "tpu"


GB = 1e9
CHIPS = {
    "v4": ChipSpec(32 * GiB, 275e12, 1228e9, ("TPU v4",)),
    "v5e": ChipSpec(16 * GiB, 197e12, 819e9, ("TPU v5 lite", "TPU v5e")),
    "v5p": ChipSpec(95 * GiB, 459e12, 2765e9, ("TPU v5p", "TPU v5")),
    "v6e": ChipSpec(32 * GiB, 918e12, 1640e9, ("TPU v6 lite", "TPU v6e")),
    # GPUs, for `--topology local` and the trainer's roofline report (SXM parts)
    "a100": ChipSpec(80 * GB, 312e12, 2039e9, ("NVIDIA A100",), "gpu"),
    "h100": ChipSpec(80 * GB, 989e12, 3350e9, ("NVIDIA H100",), "gpu"),
    "h200": ChipSpec(141 * GB, 989e12, 4800e9, ("NVIDIA H200",), "gpu"),
}


def local_device_spec(device) -> ChipSpec | None:
    """The published figures of a present device, from its `device_kind` (None for CPUs and unknown chips);
    its HBM is what the runtime reports as usable when it says. CHIPS's order matters: "TPU v5 lite" (v5e)
    is tried before "TPU v5" (v5p)."""
    for spec in CHIPS.values():
        if any(device.device_kind.startswith(kind) for kind in spec.device_kinds):
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and stats.get("bytes_limit"):
                return dataclasses.replace(spec, hbm_bytes=float(stats["bytes_limit"]))
            return spec
    return None


def _cost_analysis(stage) -> tuple[float | None, float | None]:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        return None, None
    return float(cost.get("flops", 0.0)) or None, float(cost.get("bytes accessed", 0.0)) or None


@dataclasses.dataclass(frozen=True)
class StepCost:
    flops: float | None  # per device
    bytes_accessed: float | None  # per device
    loops: hlo_text.LoopCosts  # the loop repeats: their FLOPs are included above, their bytes are not


def step_cost(lowered, compiled, devices) -> StepCost:
    """FLOPs and bytes accessed per device of a step `lowered` and then `compiled` for `devices`, from XLA's
    cost analysis of the compiled program, plus what that analysis leaves out of loops: it counts a `while`
    body once, so a step with scanned layers (`model.scan_layers`) gets its bodies' repeats added from the
    compiled program's text (sdjax/hlo_text.py: matmul/convolution FLOPs). The bodies' bytes stay XLA's count
    of one trip (a floor): the text's estimate of the rest (`loops.extra_bytes`) over-reads (SD 1.5's VAE encode
    in 6 chunks: 3.5x what the same encode costs unchunked), so it is reported, not added.

    On GPUs the FLOPs come from the program as written instead (the lowered one, global, split evenly over the
    devices): XLA:GPU's analysis of the compiled program counts nothing inside the cuDNN and cuBLAS calls its
    convolutions and matmuls become (the SD 1.5 step, batch 8, on one H200: 0.87 TFLOP compiled, 24.9 TFLOP
    as written; the CPU and TPU compilers count them). cuDNN's flash attention is a call in the program as
    written too, so with `model.attention=auto` the figure leaves out the self-attention (by its arithmetic,
    about 3 of SD 1.5's 24.9 TFLOP at batch 8): a floor, and with scanned layers a lower one."""
    flops, bytes_accessed = _cost_analysis(compiled)
    loops = hlo_text.LoopCosts(0, 0.0, 0.0)
    if hasattr(compiled, "as_text"):
        loops = hlo_text.uncounted_loop_costs(compiled.as_text())
    if flops is not None and loops.loops:
        flops += loops.extra_flops
    if devices[0].platform == "gpu":
        flops_as_written, _ = _cost_analysis(lowered)
        flops = flops_as_written / len(devices) if flops_as_written else flops
    return StepCost(flops, bytes_accessed, loops)


def executable_cost(lowered, compiled, devices) -> tuple[float | None, float | None]:
    """(FLOPs, bytes accessed) per device of a compiled step: `step_cost`'s."""
    cost = step_cost(lowered, compiled, devices)
    return cost.flops, cost.bytes_accessed


def roofline_step_s(flops: float, bytes_accessed: float | None, spec: ChipSpec) -> float:
    """The step can be no faster than its FLOPs at peak compute or its bytes at peak HBM bandwidth."""
    return max(flops / spec.peak_bf16_flops, (bytes_accessed or 0.0) / spec.hbm_bytes_per_s)


def measured_against_roofline(step_time_s: float, flops: float | None, bytes_accessed: float | None,
                              device) -> dict:
    """What the trainer reports after a run: its measured steady-state step time beside the roofline of the
    executable it ran, on this device's published figures (none for CPUs: no roofline, no fraction)."""
    report = {"device_kind": device.device_kind, "step_time_s": step_time_s, "flops_per_device": flops}
    if flops:
        report["achieved_tflops_per_device"] = flops / step_time_s / 1e12
    spec = local_device_spec(device)
    if spec and flops:
        report["roofline_step_s"] = roofline_step_s(flops, bytes_accessed, spec)
        report["roofline_fraction"] = report["roofline_step_s"] / step_time_s
    return report


def describe_speed(report: dict) -> str:
    """The log line of a `measured_against_roofline` report."""
    device_kind = report["device_kind"]
    text = f"Measured {report['step_time_s']:.3f} s/step"
    if report.get("achieved_tflops_per_device") is not None:
        text += f" ({report['achieved_tflops_per_device']:.3g} TFLOP/s per device)"
    if "roofline_fraction" in report:
        return text + (f"; the roofline on {device_kind} is {report['roofline_step_s']:.3g} s/step: "
                       f"{100 * report['roofline_fraction']:.2g}% of it.")
    return text + f"; no published peak figures for {device_kind!r}, so no roofline (sdjax/roofline.py CHIPS)."
