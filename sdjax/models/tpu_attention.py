"""Splash (Pallas flash) attention on TPU for the UNet's self-attention, forward and backward.

The materialised kernel (attention.materialized_kernel) holds (batch * heads, queries, keys) scores in HBM, and
its backward pass holds the probabilities too: SD 1.5 at 512 px has 4096 tokens at its top level, so batch 4
with 8 heads is 4 * 8 * 4096^2 bf16 = 1 GiB of scores per layer. JAX's splash attention
(jax.experimental.pallas.ops.tpu.splash_attention) is flash attention as a Mosaic kernel: scores live a
(block_q, block_kv) tile at a time in VMEM, and the backward pass recomputes them from the forward pass's
log-sum-exp. `splash_kernel` adapts it to the UNet's kernel interface (attention.py: query, key, value as
(batch, length, heads, dim_head), a scale, the output as the query).

What splash needs that the UNet does not give it, and how it is made to fit:
- Layout (heads, length, dim) per example: the batch is vmapped (Pallas adds it to the kernel's grid).
- A head dim that is a multiple of 128 (the TPU lane width; SD 1.5's are 40, 80, 160): q, k, v are padded
  with zeros. Zero q and k columns add nothing to the scores; zero v columns give zero output columns, sliced
  off. Their gradients are sliced off too (dq, dk, dv of the padding are dropped by jnp.pad's transpose).
  Mosaic also compiles the unpadded head dims (40, 64, 80, 160, checked with libtpu 0.0.42.1) with the same
  HBM temp bytes, as TPU layouts tile the minor dim to 128 in HBM anyway; splash is written and tested for
  multiples of 128 and this was not run on a chip, so the padding stays until a TPU says otherwise.
- No softmax scale: the query is multiplied by `scale` first (the original head dim's scale, not the padded
  one's), so the scores are (scale * q) k^T as in the materialised kernel.
- Lengths that are multiples of the block sizes: queries and keys are padded with zeros; padded keys are
  masked out with a static mask (`_padded_key_mask`), padded queries are sliced off.

`attention` adds the mesh (shard_map over the batch); `compiled_kernel_costs` and `attention_cost` give the
FLOPs and bytes that XLA's cost analysis cannot see inside the kernel's custom calls. Which layers run it
(`model.attention`: `flash`, or `auto` on TPU) is attention.py's choice.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from sdjax import hlo_text as hlo_lib
import sdjax.models.batch_sharding as batch_sharding

LANES = 128  # a TPU vreg's lane count: splash's head dim and block sizes are multiples of it

# The largest block tried for queries and keys. Bigger blocks mean fewer grid steps (each has a fixed
# pipelining overhead) and longer matmuls for the MXU; the cost is VMEM: the forward kernel holds a
# (block_q, block_kv) float32 score tile (1 MiB at 512) plus double-buffered q, k, v and output blocks, and the
# backward kernel more. At 512 Mosaic compiles forward and backward for v5e (16 MiB default scoped VMEM) at
# head dims up to 256 (checked with libtpu 0.0.42.1: 4096 tokens at head dim 160, padded to 256). 512 is also
# MaxDiffusion's default flash block size.
MAX_BLOCK = 512



def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block_for(length: int, max_block: int = MAX_BLOCK) -> int:
    """The block for a sequence: the largest multiple of 128 up to `max_block` (MAX_BLOCK, or
    `model.flash_block_size`) that divides the length rounded up to 128. So the padding is never more than 127 tokens (4096 -> 512 blocks; 576 tokens, SD 2.x's 768 px at
    its second level, -> 640 in 128 blocks rather than 1024 in 512 blocks, 78% more work)."""
    padded = _round_up(length, LANES)
    return next(b for b in range(min(max_block, padded), 0, -LANES) if padded % b == 0)


def block_sizes_for(q_len: int, kv_len: int, head_dim: int, *, fused_backward: bool = True,
                    max_block: int = MAX_BLOCK) -> splash.BlockSizes:
    """Splash's block sizes for these (unpadded) lengths: `_block_for` each, the same for the backward pass.

    `fused_backward`: dq computed in the dk/dv kernel (one recomputation of the scores in the backward pass, 5
    matmuls of (queries, keys, head_dim); the separate dq kernel recomputes them again: 7). The fused kernel
    writes one partial dq per key block, (kv_len / block_kv) x the query's size in HBM, summed afterwards, in
    the input dtype (so in bf16 the partials are rounded before the sum). Compiled for v5e, forward + backward,
    batch 4, 8 heads, bf16 (benchmarks/tpu_attention_compile.py): 4096 tokens, head dim 40, temp 386 MiB fused,
    162 MiB separate (materialised: 2112 MiB); 9216 tokens (SD 2.x at 768 px), head dim 64: 1729 MiB fused.
    Fused by default for its 28% fewer FLOPs; pass False where the HBM matters more. The head dim does not change the
    choice at SD's sizes (<= 256 after padding), it is taken so that callers need not change when it does."""
    del head_dim
    block_q, block_kv = _block_for(q_len, max_block), _block_for(kv_len, max_block)
    backward = {"block_q_dkv": block_q, "block_kv_dkv": block_kv, "block_kv_dkv_compute": block_kv}
    if not fused_backward:
        backward.update(block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                             use_fused_bwd_kernel=fused_backward, **backward)


@functools.lru_cache(maxsize=32)
def _padded_key_mask(heads: int, q_len: int, kv_len: int, kv_valid: int) -> mask_lib.MultiHeadMask:
    """Every query sees the first `kv_valid` keys. Splash keeps the mask as block sparsity: full blocks run
    unmasked, and only the key blocks with padding hold a partial mask (one block, as every query block's is
    the same and splash stores each distinct block once); so it is cheaper than segment ids, which splash
    compares in every block. Without padding it is a FullMask: no mask data at all."""
    if kv_valid == kv_len:
        head_mask = mask_lib.FullMask((q_len, kv_len))
    else:
        dense = np.zeros((q_len, kv_len), dtype=np.bool_)
        dense[:, :kv_valid] = True
        head_mask = mask_lib.NumpyMask(dense)
    return mask_lib.MultiHeadMask([head_mask] * heads)


def _pad(x: jax.Array, length: int, dim: int) -> jax.Array:  # (batch, len, heads, d): zeros up to length, dim
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])))


def _heads_first(x: jax.Array) -> jax.Array:  # (batch, len, heads, d) <-> (batch, heads, len, d)
    return jnp.swapaxes(x, 1, 2)


def splash_kernel(query, key, value, scale, *, block_sizes: splash.BlockSizes | None = None,
                  interpret: bool = False, max_block: int = MAX_BLOCK):
    """Splash attention in the UNet kernels' interface: (batch, length, heads, dim_head) in and out, any
    lengths and head dim (padded as the module docstring says), in the input dtype (bf16 or f32; the kernel's
    softmax statistics and accumulators are f32 either way). Differentiable: splash's custom VJP, flash
    attention's backward pass.

    `block_sizes`: splash's, for the padded lengths (default `block_sizes_for` up to `max_block`). `interpret`: run the kernel
    with Pallas' interpreter (any backend, e.g. CPU in the tests) instead of compiling it with Mosaic (TPU)."""
    _, q_len, heads, dim = query.shape
    kv_len = key.shape[1]
    if block_sizes is None:
        block_sizes = block_sizes_for(q_len, kv_len, dim, max_block=max_block)
    q_padded = _round_up(q_len, block_sizes.block_q)
    kv_padded = _round_up(kv_len, block_sizes.block_kv)
    dim_padded = _round_up(dim, LANES)
    kernel = splash.make_splash_mha(_padded_key_mask(heads, q_padded, kv_padded, kv_len), block_sizes=block_sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    q, k, v = (_heads_first(_pad(x, length, dim_padded)) for x, length in
               ((query * jnp.asarray(scale, query.dtype), q_padded), (key, kv_padded), (value, kv_padded)))
    out = jax.vmap(kernel)(q, k, v)  # (batch, heads, q_padded, dim_padded)
    return _heads_first(out)[:, :q_len, :, :dim]


def attention(query, key, value, scale, *, block_sizes: splash.BlockSizes | None = None,
              interpret: bool | None = None, max_block: int = MAX_BLOCK):
    """`splash_kernel` where the step runs: under `jax.set_mesh(mesh)` (a non-empty abstract mesh), each device
    runs the kernel on its own batch shard (`jax.shard_map`; the batch is sharded over ("data", "fsdp"), heads
    and lengths are whole on every device), since a Mosaic custom call cannot be partitioned by XLA's SPMD
    partitioner; with no mesh, the kernel is called directly.

    `interpret` by default: Mosaic's kernel where the step is lowered for TPU, Pallas' interpreter elsewhere
    (CPU, where Mosaic cannot compile it). Chosen when lowering (`jax.lax.platform_dependent`), not by
    `jax.default_backend()`: `sdjax plan` on a CPU host compiles for a TPU topology and needs Mosaic's kernel.

    Raises ValueError when the mesh's batch axes do not divide the batch."""
    def splash_on(interpret: bool):
        return functools.partial(splash_kernel, scale=scale, block_sizes=block_sizes, interpret=interpret,
                                 max_block=max_block)

    if interpret is None:
        def run(query, key, value):
            return jax.lax.platform_dependent(query, key, value, tpu=splash_on(False), default=splash_on(True))
    else:
        run = splash_on(interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(query, key, value)
    axes, shards = batch_sharding.batch_axes(mesh), batch_sharding.batch_shards()
    if query.shape[0] % shards:
        raise ValueError(f"splash attention: batch {query.shape[0]} does not divide over the mesh's {axes} "
                         f"axes ({shards} shards); use a batch that is a multiple of {shards}.")
    spec = P(axes, None, None, None)
    # check_vma=False: splash declares its outputs without `manual_axis_type` (how they vary over the mesh's
    # manual axes), which shard_map's type check requires (jax 0.10.2 and 0.12 both refuse it).
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        query, key, value)


def attention_cost(batch: int, heads: int, q_len: int, kv_len: int, dim_head: int, dtype_bytes: int,
                   backward: bool, *, fused_backward: bool = True) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of `splash_kernel` at its default block sizes, for the planner to add: XLA's cost
    analysis counts nothing inside the kernel's custom call, and splash's pallas_call takes no pl.CostEstimate
    from its callers (jax 0.10 - 0.12).

    Counted as the kernel computes it: at the padded lengths and head dim (a multiple of 128: the MXU does
    that work). Forward: two matmuls, q k^T and p v, 2 * 2 * B * H * Lq * Lk * D FLOPs (softmax's exp and
    sums, O(B H Lq Lk), are left out). Backward (`backward`: the backward pass alone): the scores recomputed
    from the saved log-sum-exp (q k^T), dp = do v^T, dv = p^T do, dk = ds^T q, dq = ds k: 5 matmuls, 2.5x the
    forward, with the fused kernel; the separate dq kernel recomputes q k^T and do v^T again: 7, 3.5x.

    Bytes: flash attention's lower bound, each tensor read or written once (B * H * L * D elements): forward,
    q, k, v read and the output written; backward, q, k, v, out, d_out read and dq, dk, dv written, plus the
    fused kernel's partial dq per key block written and read back (the separate dq kernel instead reads q and
    d_out a second time). The kernels reread k and v once per query block; that is left out."""
    q_len, kv_len = (_round_up(n, _block_for(n)) for n in (q_len, kv_len))
    dim = _round_up(dim_head, LANES)
    matmul = 2.0 * batch * heads * q_len * kv_len * dim
    q_bytes = batch * heads * q_len * dim * dtype_bytes
    kv_bytes = batch * heads * kv_len * dim * dtype_bytes
    if not backward:
        return 2 * matmul, 2 * q_bytes + 2 * kv_bytes
    if fused_backward:
        kv_blocks = kv_len // _block_for(kv_len)
        return 5 * matmul, (3 + 1 + 2 * kv_blocks) * q_bytes + 4 * kv_bytes
    return 7 * matmul, 6 * q_bytes + 4 * kv_bytes


# A splash kernel call in a compiled step's HLO: its instruction is named after the kernel (splash_mha_fwd,
# splash_mha_fwd_residuals, splash_mha_dkv[_no_residuals], splash_mha_dq) and its outputs are listed inline.
_SPLASH_CALL = re.compile(r"%splash_mha_(fwd|dkv|dq)\w*")
_ARRAY = re.compile(r"(bf16|f16|f32)\[([\d,]+)\]")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


def compiled_kernel_costs(hlo_text: str) -> tuple[int, float, float]:
    """(calls, FLOPs, HBM bytes) per device of the splash kernels in a compiled program's HLO text, for the
    planner to add to XLA's cost analysis (which counts nothing inside a custom call). Read off the compiled
    program, so a remat's recomputed forward and the per-device shapes under shard_map are counted as they run.

    Per call, at the padded shapes the kernel runs: B * H (batch and heads; XLA drops a batch of 1), L and D
    from its (..., length, dim) output: the forward's first (the attention output), the backward kernels'
    last (dv, dq). Self-attention, L keys for L queries, as sdjax sends it. Forward q k^T and p v: 4 B H L^2 D
    FLOPs; the dk/dv kernel recomputes q k^T and forms d_out v^T, p^T d_out and ds^T q, plus ds k when dq is
    fused in (its partial dq per key block, one more output): 8 or 10 B H L^2 D; the separate dq kernel q k^T,
    d_out v^T and ds k: 6. Bytes as `attention_cost`: each tensor read or written once, plus the fused
    kernel's partial dq written and read back."""
    calls, flops, nbytes = 0, 0.0, 0.0
    for line, runs in hlo_lib.lines_with_executions(hlo_text):  # a call inside a loop (scan) runs per trip
        if 'custom_call_target="tpu_custom_call"' not in line or not (call := _SPLASH_CALL.search(line)):
            continue
        kind = call.group(1)
        outputs = [(dtype, [int(d) for d in dims.split(",")])
                   for dtype, dims in _ARRAY.findall(line.split(" custom-call(")[0])]
        outputs = [(dtype, dims) for dtype, dims in outputs if len(dims) >= 3]
        if not outputs:
            continue
        dtype, dims = outputs[0] if kind == "fwd" else outputs[-1]
        heads, (length, dim) = int(np.prod(dims[:-2])), dims[-2:]
        matmul = 2.0 * heads * length * length * dim * runs
        tensor = heads * length * dim * _DTYPE_BYTES[dtype] * runs
        if kind == "fwd":
            flops, nbytes = flops + 2 * matmul, nbytes + 4 * tensor
        elif kind == "dkv":
            fused = len(outputs) == 3  # partial dq, dk, dv
            kv_blocks = int(np.prod(outputs[0][1])) // int(np.prod(dims)) if fused else 0
            flops += (5 if fused else 4) * matmul
            nbytes += 7 * tensor + 2 * kv_blocks * tensor
        else:
            flops, nbytes = flops + 3 * matmul, nbytes + 6 * tensor
        calls += runs
    return calls, flops, nbytes
