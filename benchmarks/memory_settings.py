"""Per-device memory of the train step under each memory setting (remat, FSDP, grad accumulation, optimizer),
from XLA's memory analysis of the compiled step (`sdjax plan`'s compile: nothing is run or allocated).

    python benchmarks/memory_settings.py --config configs/demo.py --topology cpu:8
    python benchmarks/memory_settings.py --config configs/demo.py --topology v5e:2x4   # libtpu's compiler
    python benchmarks/memory_settings.py --config configs/demo.py --topology cpu:8 --resolution 256 --batch_size 64

Prints a markdown table (MiB per device); docs/scaling.md has its output.
"""

from __future__ import annotations

import argparse
import os
import sys

# Emulated CPU devices for `cpu:N` must be requested before jax is imported.
for arg in sys.argv:
    if arg.startswith("cpu:"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={arg.split(':')[1]}")

from sdjax import config as config_lib  # noqa: E402
from sdjax import plan as plan_lib  # noqa: E402
from sdjax.config import ConfigError  # noqa: E402

MiB = 2**20
# (label, overrides): the baseline first, then one change at a time, then combined.
SETTINGS = [
    ("baseline", {}),
    ("remat=minimal", {"train.remat": "minimal"}),
    ("remat=full", {"train.remat": "full"}),
    ("grad_accum=4", {"train.grad_accum": 4}),
    ("fsdp=all", {"mesh.fsdp": -1, "mesh.data": 1}),
    ("fsdp=all, remat=full", {"mesh.fsdp": -1, "mesh.data": 1, "train.remat": "full"}),
    ("optimizer=adamw_bf16", {"optimizer.name": "adamw_bf16"}),
    ("optimizer=adafactor", {"optimizer.name": "adafactor"}),
    ("fsdp=all, remat=full, adafactor", {"mesh.fsdp": -1, "mesh.data": 1, "train.remat": "full",
                                         "optimizer.name": "adafactor"}),
    ("attention=memory_efficient", {"model.attention": "memory_efficient"}),
    ("attention=memory_efficient, remat=full", {"model.attention": "memory_efficient", "train.remat": "full"}),
]


def with_overrides(config, overrides: dict):
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--topology", default="cpu:8", help="as `sdjax plan --topology`")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--resolution", type=int, default=0, help="image side (default: the config's)")
    parser.add_argument("--cache_dir", default="", help="reuse `sdjax plan` compile results from here")
    parser.add_argument("--only", default="", help="row labels to run, separated by ; (default: all)")
    args = parser.parse_args()
    base = config_lib.load_config_file(args.config)
    base.model.attention = "default"  # the rows' attention unless they set it: diffusers' as written
    base.train.train_text_encoder = False  # UNet training, as the tables in docs/scaling.md were measured
    if args.batch_size:
        base.train.batch_size = args.batch_size
    if args.resolution:
        base.data.resolution = args.resolution
    print(f"{args.config}, {args.topology}, global batch {base.train.batch_size}, "
          f"{base.data.resolution}px, precision {base.train.precision}\n")
    print("| setting | state (args) MiB | temp MiB | total MiB | compile s |\n|---|---|---|---|---|")
    wanted = [label.strip() for label in args.only.split(";") if label.strip()]
    for label, overrides in SETTINGS:
        if wanted and label not in wanted:
            continue
        try:
            plan = plan_lib.plan_step(with_overrides(base, overrides), args.topology, args.cache_dir or None)
        except ConfigError as e:
            print(f"| {label} | {e} | | | |")
            continue
        if plan.error:
            print(f"| {label} | does not fit: {plan.error[:80]} | | | |")
            continue
        print(f"| {label} | {plan.argument_bytes / MiB:.1f} | {plan.temp_bytes / MiB:.1f} | "
              f"{plan.total_bytes / MiB:.1f} | {plan.compile_s:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
