"""Keeping activations split over the batch where the step is traced under a mesh.

The step is traced with its mesh as JAX's abstract mesh (sdjax.mesh.traced_on_mesh). Inputs are split over
the batch and, with FSDP, each weight over one of its dimensions; between them XLA's sharding propagation
chooses every activation's split. Left alone, it carried a weight's split into the activations it touched and
moved them back: SD 1.5's FSDP step (v5e:2x2, fsdp 4, 21 images a chip) had 556 all-to-alls, activations
switched between a split over the batch and one over channels or heads (the demo's UNet step: 203).
`shard_batch` pins an activation to the batch split, as MaxText's and MaxDiffusion's logical activation
constraints do; the layers call it on what they pass on (block and sub-block outputs, attention's projections,
the time embedding), which leaves FSDP's weight gathers and gradient reductions as the only collectives. In
that SD 1.5 step it took the memory from 15.46 to 12.60 GiB a chip and the roofline from 1.14 to 0.77 s
(docs/planning.md). Numerics do not change.

No mesh (one device, a CPU test), one batch shard, or a batch the shards do not divide (the VAE's encode
chunks, a sampler's odd batch): nothing is pinned.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

# The mesh axes the step shards the batch over: sdjax.mesh.BATCH_AXES, which models may not import (the
# import-linter layers in pyproject.toml); tests/test_tpu_attention.py checks they agree.
BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh) -> tuple[str, ...]:
    """Those of BATCH_AXES that `mesh` has."""
    return tuple(name for name in BATCH_AXES if name in mesh.axis_names)


def batch_shards() -> int:
    """How many shards the traced step's mesh splits the batch into (1 with no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(np.prod([mesh.shape[name] for name in batch_axes(mesh)]))


def shard_batch(x: jax.Array) -> jax.Array:
    """`x` (batch first) constrained to the batch split of the traced step's mesh; `x` itself where there is
    none or the batch does not divide over it."""
    shards = batch_shards()
    if shards == 1 or x.shape[0] % shards:
        return x
    axes = batch_axes(jax.sharding.get_abstract_mesh())
    return jax.lax.with_sharding_constraint(x, P(axes))
