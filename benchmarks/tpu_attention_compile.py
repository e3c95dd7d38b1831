"""One self-attention layer's forward + backward compiled for one TPU chip with libtpu's compiler (runs on a
CPU host with jax[tpu]; no chip needed): XLA's memory analysis of the materialised kernel against splash
attention (sdjax/models/tpu_attention.py), with the fused and the separate dq backward kernel.

    python benchmarks/tpu_attention_compile.py                      # v5e, batch 4, 4096 tokens, 8 heads of 40
    python benchmarks/tpu_attention_compile.py --head-dim 64 --topology v6e:2x2

Temp bytes are the HBM the layer needs beyond its arguments and outputs: the materialised kernel's scores and
probabilities, splash's padded copies and (fused backward) partial dq per key block. Only HBM: at small sizes
(batch 1 here) XLA places splash's operands in the chip's VMEM and the temp bytes read ~0. The FLOPs column is XLA's
cost analysis, which does not see inside splash's Mosaic custom calls (tpu_attention.attention_cost's
analytic figure is printed next to it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x2", help="a TPU topology; one of its chips is compiled for")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    args = parser.parse_args()

    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from sdjax import plan
    from sdjax.models import attention, tpu_attention

    device = plan.target_devices(args.topology)[0]
    mesh = Mesh(np.array([device]).reshape(1, 1), ("data", "fsdp"))
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    abstract = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    scale = args.head_dim ** -0.5
    sizes = functools.partial(tpu_attention.block_sizes_for, args.tokens, args.tokens, args.head_dim)
    kernels = {
        "materialized": attention.materialized_kernel,
        "splash, fused backward": functools.partial(tpu_attention.splash_kernel, block_sizes=sizes()),
        "splash, separate dq kernel": functools.partial(tpu_attention.splash_kernel,
                                                        block_sizes=sizes(fused_backward=False)),
    }
    print(f"{args.topology} chip, bf16 {shape} (batch, tokens, heads, head dim), forward + backward")
    print("| kernel | compile s | temp MiB | XLA-counted GFLOP | analytic GFLOP |")
    print("|---|---|---|---|---|")
    for name, kernel in kernels.items():
        def forward_and_backward(q, k, v, kernel=kernel):
            out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, scale), q, k, v)
            return out, vjp(out)

        start = time.perf_counter()
        compiled = jax.jit(forward_and_backward).lower(abstract, abstract, abstract).compile()
        seconds = time.perf_counter() - start
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        counted = compiled.cost_analysis().get("flops", 0.0) / 1e9
        if name == "materialized":
            analytic = 6 * 2 * args.batch * args.heads * args.tokens ** 2 * args.head_dim / 1e9  # 2 fwd + 4 bwd matmuls
        else:
            fused = "fused" in name
            analytic = sum(tpu_attention.attention_cost(args.batch, args.heads, args.tokens, args.tokens,
                                                        args.head_dim, 2, backward, fused_backward=fused)[0]
                           for backward in (False, True)) / 1e9
        print(f"| {name} | {seconds:.1f} | {temp:.1f} | {counted:.1f} | {analytic:.1f} |")


if __name__ == "__main__":
    main()
