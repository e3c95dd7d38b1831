"""Splash attention (sdjax/models/tpu_attention.py) against the materialised kernel: on CPU with Pallas'
interpreter (which runs the TPU kernel's logic), and one AOT compile for a TPU topology with libtpu."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import BlockSizes
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sdjax.models import attention, batch_sharding, tpu_attention
from sdjax.models.attention import materialized_kernel


def _inputs(shape, kv_len, dtype, seed=0):
    """query, key, value, and a random cotangent for the output: (batch, length, heads, dim_head)."""
    batch, _, heads, dim = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    query = jax.random.normal(keys[0], shape, dtype)
    key, value = (jax.random.normal(k, (batch, kv_len, heads, dim), dtype) for k in keys[1:3])
    return query, key, value, jax.random.normal(keys[3], shape, dtype)


def _forward_and_grads(kernel, query, key, value, weights):
    """The output and the gradients of sum(output * weights) w.r.t. query, key and value."""
    def loss(q, k, v):
        out = kernel(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weights.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)
    return out, grads


def _splash(scale, block_sizes=None):
    return lambda q, k, v: tpu_attention.splash_kernel(q, k, v, scale, block_sizes=block_sizes, interpret=True)


def _blocks(size):  # splash's blocks all `size`, with the fused backward kernel (block_sizes_for's choice)
    return BlockSizes(block_q=size, block_kv=size, block_q_dkv=size, block_kv_dkv=size, use_fused_bwd_kernel=True)


def _materialized(scale):
    return lambda q, k, v: materialized_kernel(q, k, v, scale)


# Lengths: 128 and 256 need no padding, 200 and 320 pad queries and keys (masked keys in the last block);
# head dims: SD 1.5's 40, 80, 160 and SD 2.x's 64, padded to 128 or 256. The default blocks (`block` None)
# are one per sequence at these lengths; 128 blocks make 2 x 2 and 3 x 3 grids, so the online softmax across
# key blocks and the fused backward's partial dq sums run too. Each case is small: the interpreter runs the
# kernel's grid step by step.
@pytest.mark.parametrize("length, heads, dim, block", [(128, 2, 40, None), (200, 1, 64, None),
                                                       (256, 1, 80, 128), (320, 1, 160, 128)])
def test_float32_matches_materialized_forward_and_backward(length, heads, dim, block):
    inputs = _inputs((1, length, heads, dim), length, jnp.float32)
    scale = dim ** -0.5
    sizes = None if block is None else _blocks(block)
    out, grads = _forward_and_grads(_splash(scale, sizes), *inputs)
    want_out, want_grads = _forward_and_grads(_materialized(scale), *inputs)
    assert out.dtype == jnp.float32 and out.shape == want_out.shape
    # Measured: at most ~1e-6 apart (summation order); 1e-5 leaves room.
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_materialized_within_bf16_rounding():
    # Batch 2, 200 tokens in 128 blocks (padding, 2 x 2 grid). The kernels round to bf16 in different places
    # (the materialised one holds bf16 scores and probabilities; splash keeps f32 tiles but rounds scale *
    # query, its output and its partial dq per key block), so both are compared with the float32 result.
    # Measured (values up to 1.3): splash 0.0023-0.0044 off (dq: 0.0044, 0.0032 in one block), the
    # materialised kernel in bf16 0.0067-0.0108.
    shape, dim = (2, 200, 2, 64), 64
    inputs = _inputs(shape, 200, jnp.bfloat16)
    scale = dim ** -0.5
    out, grads = _forward_and_grads(_splash(scale, _blocks(128)), *inputs)
    exact_out, exact_grads = _forward_and_grads(_materialized(scale), *(x.astype(jnp.float32) for x in inputs))
    bf16_out, bf16_grads = _forward_and_grads(_materialized(scale), *inputs)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for got, bf16, exact in zip((out, *grads), (bf16_out, *bf16_grads), (exact_out, *exact_grads)):
        got, bf16, exact = (np.asarray(x, np.float32) for x in (got, bf16, exact))
        assert np.max(np.abs(got - exact)) <= np.max(np.abs(bf16 - exact))  # no worse than XLA's in bf16
        np.testing.assert_allclose(got, exact, atol=1e-2, rtol=1e-2)


def test_cross_attention_lengths_pad_the_keys():
    # 77 caption tokens (not what splash_or_materialized sends to splash, but splash_kernel takes it).
    inputs = _inputs((1, 128, 1, 40), 77, jnp.float32)
    out, grads = _forward_and_grads(_splash(0.1), *inputs)
    want_out, want_grads = _forward_and_grads(_materialized(0.1), *inputs)
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_block_sizes_pad_at_most_to_the_next_128():
    assert tpu_attention._block_for(4096) == 512  # SD 1.5 at 512 px, top level
    assert tpu_attention._block_for(1024) == 512
    assert tpu_attention._block_for(256) == 256
    assert tpu_attention._block_for(200) == 256
    assert tpu_attention._block_for(576) == 128  # 640 = 5 x 128, not 1024 in 512 blocks
    assert tpu_attention._block_for(2304) == 384  # SD 2.x at 768 px
    sizes = tpu_attention.block_sizes_for(4096, 4096, 40)
    assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.use_fused_bwd_kernel) == (512, 512, 512, True)
    separate = tpu_attention.block_sizes_for(4096, 4096, 40, fused_backward=False)
    assert separate.has_backward_blocks and separate.block_q_dq == 512
    # model.flash_block_size caps them: 256 -> 4096 tokens in 256 blocks, 2304 in 256 (not 384).
    capped = tpu_attention.block_sizes_for(4096, 4096, 40, max_block=256)
    assert (capped.block_q, capped.block_kv, capped.block_q_dkv) == (256, 256, 256)
    assert tpu_attention._block_for(2304, 256) == 256 and tpu_attention._block_for(640, 256) == 128


def test_a_capped_block_size_computes_the_same_attention():
    # model.flash_block_size=128 on 512 tokens: 4 query x 4 key blocks instead of one, same result.
    query, key, value, _ = _inputs((1, 512, 2, 40), 512, jnp.float32)
    want = materialized_kernel(query, key, value, 0.2)
    got = attention.Kernel("flash", max_block=128)(query, key, value, 0.2)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_flash_and_auto_choose_by_shape_off_tpu():
    # `flash` runs splash (interpreted off TPU) for self-attention, XLA's kernel for cross-attention; `auto`
    # off TPU never runs it (CPU: materialised here).
    for kv_len, kernel in ((77, attention.flash_kernel), (1024, attention.auto_kernel)):
        inputs = _inputs((1, 1024, 1, 8), kv_len, jnp.float32)[:3]
        np.testing.assert_array_equal(jax.jit(kernel, static_argnums=3)(*inputs, 0.3),
                                      jax.jit(materialized_kernel, static_argnums=3)(*inputs, 0.3))


def test_attention_cost():
    flops, bytes_ = tpu_attention.attention_cost(4, 8, 4096, 4096, 40, 2, backward=False)
    assert flops == 4 * 4 * 8 * 4096 * 4096 * 128  # head dim 40 runs as 128
    assert bytes_ == 4 * (4 * 8 * 4096 * 128 * 2)
    backward_flops, _ = tpu_attention.attention_cost(4, 8, 4096, 4096, 40, 2, backward=True)
    assert backward_flops == 2.5 * flops
    separate, _ = tpu_attention.attention_cost(4, 8, 4096, 4096, 40, 2, backward=True, fused_backward=False)
    assert separate == 3.5 * flops


def test_batch_axes_are_the_steps():
    from sdjax import mesh
    assert batch_sharding.BATCH_AXES == mesh.BATCH_AXES


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])  # sdjax.mesh's, and the other
def test_sharded_over_the_mesh_matches_unsharded(axis_type):
    # 8 emulated CPU devices (conftest.py), batch 8 over ("data", "fsdp") = (2, 4): one example per device.
    # `attention` picks the interpreter itself here (a CPU lowering).
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    query, key, value, weights = _inputs((8, 128, 1, 40), 128, jnp.float32)
    want_out, want_grads = _forward_and_grads(_splash(0.2), query, key, value, weights)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(x, batch) for x in (query, key, value, weights)]
        out, grads = _forward_and_grads(lambda q, k, v: tpu_attention.attention(q, k, v, 0.2), *sharded)
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        assert got.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_sharded_batch_must_divide_the_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    query = jnp.zeros((4, 128, 1, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not divide"):
        jax.jit(lambda q: tpu_attention.attention(q, q, q, 1.0))(query)


def test_compiles_for_tpu_forward_and_backward():
    # libtpu's compiler on this CPU host (sdjax plan's devices): Mosaic lowers the real kernel for SD 1.5's
    # top level at 512 px, 4096 tokens, bf16, head dims 40 and 64 (SD 2.x / SDXL), through `attention` as
    # the step would call it: under a v5e:2x2 mesh, batch 4 sharded over its 4 chips. Measured: 2-4 s each.
    from sdjax import plan
    try:
        devices = plan.target_devices("v5e:2x2")
    except ValueError as e:
        pytest.skip(str(e))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    for dim in (40, 64):
        args = [jax.ShapeDtypeStruct((4, 4096, 8, dim), jnp.bfloat16, sharding=batch)] * 3

        def forward_and_backward(q, k, v, scale=dim ** -0.5):
            out, vjp = jax.vjp(lambda q, k, v: tpu_attention.attention(q, k, v, scale), q, k, v)
            return out, vjp(out)

        start = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(forward_and_backward).lower(*args).compile()
        print(f"head dim {dim}: compiled for TPU in {time.perf_counter() - start:.1f} s")
        text = compiled.as_text()
        # Mosaic's kernels (forward, fused backward), not the interpreter's loops; each device its own batch.
        assert text.count('custom_call_target="tpu_custom_call"') == 2
        assert f"bf16[1,4096,8,{dim}]" in text
        # What the planner adds for them: one example per device, forward and fused backward.
        calls, flops, _ = tpu_attention.compiled_kernel_costs(text)
        forward, _ = tpu_attention.attention_cost(1, 8, 4096, 4096, dim, 2, backward=False)
        backward, _ = tpu_attention.attention_cost(1, 8, 4096, 4096, dim, 2, backward=True)
        assert calls == 2 and flops == forward + backward

    # `auto` lowered for TPU: splash for long self-attention, XLA's kernel for 77 caption tokens and for
    # self-attention below attention.FLASH_MIN_TOKENS.
    long, short, captions = (jax.ShapeDtypeStruct((4, tokens, 8, 40), jnp.bfloat16, sharding=batch)
                             for tokens in (4096, 256, 77))
    with jax.set_mesh(mesh):
        for query, key, want in ((long, long, True), (long, captions, False), (short, short, False)):
            lowered = jax.jit(attention.auto_kernel, static_argnums=3).lower(query, key, key, 0.1)
            assert ("tpu_custom_call" in lowered.as_text()) == want
        # model.flash_min_tokens=256 sends the 256-token self-attention to the kernel too.
        lowered = jax.jit(attention.Kernel("auto", min_tokens=256), static_argnums=3).lower(short, short, short, 0.1)
        assert "tpu_custom_call" in lowered.as_text()


def test_a_unet_with_flash_attention_computes_the_materialized_loss_and_gradients():
    # Every self-attention layer through splash (Pallas' interpreter on CPU): 64 and 16 tokens padded to 128,
    # head dims 8 and 16 padded to 128; cross-attention stays materialised.
    from sdjax.models.unet import UNet2DConditionModel
    unet = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                attention_head_dim=4, cross_attention_dim=32, sample_size=8)
    sample = jax.random.normal(jax.random.key(1), (2, 4, 8, 8))
    timesteps, context = jnp.array([3, 500]), jax.random.normal(jax.random.key(2), (2, 7, 32))
    materialized = UNet2DConditionModel(**unet, attention="default")
    params = jax.jit(materialized.init)(jax.random.key(0), sample, timesteps, context)["params"]

    def loss_and_grads(attention):
        module = UNet2DConditionModel(**unet, attention=attention)
        loss = lambda p: jnp.mean(module.apply({"params": p}, sample, timesteps, context).sample ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (want_loss, want_grads), (loss, grads) = loss_and_grads("default"), loss_and_grads("flash")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.slow  # two tiny train steps compiled, the kernel interpreted
def test_a_sharded_train_step_with_flash_attention_equals_the_one_device_step():
    # The step traced on its mesh (sdjax.mesh.traced_on_mesh): each of 8 devices runs the kernel on its own
    # examples (shard_map over data x fsdp); one device runs it on all.
    from tiny import PARAMS_ATOL, comparable_config, run_train_steps, tiny_config
    config = comparable_config(tiny_config())
    config.model.attention = "flash"
    config.mesh.data, config.mesh.fsdp = 2, 4
    sharded_state, sharded = run_train_steps(config, num_steps=1)
    config.mesh.data, config.mesh.fsdp = 1, 1
    one_state, one = run_train_steps(config, devices=jax.devices()[:1], num_steps=1)
    np.testing.assert_allclose(np.array(sharded), np.array(one), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.device_get(sharded_state.params)),
                         jax.tree.leaves(jax.device_get(one_state.params))):
        np.testing.assert_allclose(got, want, atol=PARAMS_ATOL)
