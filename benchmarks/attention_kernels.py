"""One attention layer, forward and forward + backward, with each of sdjax's `model.attention` kernels and with
PyTorch's scaled_dot_product_attention, on this machine's default JAX device (one device: set no
--xla_force_host_platform_device_count).

    python benchmarks/attention_kernels.py                          # batch 8, 1024 tokens, 8 heads of 8 dims
    python benchmarks/attention_kernels.py --tokens 4096 --heads 8 --head-dim 40 --batch 2

The default shape is the demo-sized UNet's self-attention at 32x32 latents (benchmarks/train_step.py's
model); the kernels are sdjax/models/attention.py's, called on (batch, tokens, heads, head_dim) arrays.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_runners  # noqa: E402


def median_ms(run, repeats: int) -> float:
    return step_runners.time_steps(run, repeats)["median_step_s"] * 1e3


def jax_rows(shape, repeats: int) -> list[tuple[str, float, float]]:
    import jax
    import jax.numpy as jnp

    from sdjax.models import attention

    kernels = {"default (diffusers' layout)": attention.materialized_kernel,
               "dot_product (jax.nn.dot_product_attention)": attention.dot_product_kernel,
               "per_head": attention.per_head_kernel}
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
    scale = shape[-1] ** -0.5
    rows = []
    for name, kernel in kernels.items():
        forward = jax.jit(lambda q, k, v, kernel=kernel: kernel(q, k, v, scale))
        backward = jax.jit(jax.grad(lambda q, k, v, kernel=kernel: jnp.sum(kernel(q, k, v, scale) ** 2),
                                    argnums=(0, 1, 2)))
        rows.append((f"jax {name}", median_ms(lambda: jax.block_until_ready(forward(q, k, v)), repeats),
                     median_ms(lambda: jax.block_until_ready(backward(q, k, v)), repeats)))
    return rows


def torch_row(shape, repeats: int) -> tuple[str, float, float]:
    import torch

    batch, tokens, heads, head_dim = shape
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def backward():
        (torch.nn.functional.scaled_dot_product_attention(q, k, v) ** 2).sum().backward()

    return "torch scaled_dot_product_attention", median_ms(forward, repeats), median_ms(backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    rows = jax_rows(shape, args.repeats)
    if not args.no_torch:
        rows.append(torch_row(shape, args.repeats))
    print(f"float32, (batch, tokens, heads, head_dim) = {shape}, median of {args.repeats}\n")
    print("| kernel | forward ms | forward + backward ms |\n|---|---|---|")
    for name, forward, backward in rows:
        print(f"| {name} | {forward:.1f} | {backward:.1f} |")


if __name__ == "__main__":
    main()
