"""sdjax/hlo_text.py: the loop repeats XLA's cost analysis leaves out of a scanned step, read off the compiled
program's text, for CPU (XLA writes the trip count) and for a TPU topology compiled on this host (libtpu does
not: the loop condition's constant)."""

import jax
import jax.numpy as jnp
import pytest

from sdjax import hlo_text, roofline

LAYERS, TOKENS, WIDTH = 6, 256, 512


def _layer(x, w):
    return x + jax.nn.gelu(x @ w[0]) @ w[1], None


def _scanned(x, ws):
    return jax.lax.scan(_layer, x, ws)[0].sum()


def _unrolled(x, ws):
    for i in range(LAYERS):
        x = _layer(x, ws[i])[0]
    return x.sum()


# Forward: two matmuls a layer; backward: two for the input's cotangent, two for the weights'.
ANALYTIC_FLOPS = LAYERS * 6 * 2 * TOKENS * WIDTH * WIDTH


def _shapes(platform):
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), jnp.float32)
    ws = jax.ShapeDtypeStruct((LAYERS, 2, WIDTH, WIDTH), jnp.float32)
    if platform == "tpu":
        from jax.experimental import topologies
        device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        x, ws = (jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in (x, ws))
    return x, ws


def _costs(fn, platform):
    x, ws = _shapes(platform)
    lowered = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, ws)
    compiled = lowered.compile()
    devices = [next(iter(s.sharding.device_set)) for s in (x,)] if platform == "tpu" else jax.devices("cpu")
    xla_flops, xla_bytes = roofline._cost_analysis(compiled)
    return xla_flops, xla_bytes, roofline.step_cost(lowered, compiled, devices)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_a_scanned_stack_counts_every_layer(platform):
    xla_flops, xla_bytes, scanned = _costs(_scanned, platform)
    _, unrolled_bytes, unrolled = _costs(_unrolled, platform)
    # XLA's analysis sees one layer of six; the loop's repeats bring it to the stack's arithmetic.
    assert xla_flops < 0.3 * ANALYTIC_FLOPS
    assert scanned.loops.loops == 2  # the forward scan and its transpose
    assert scanned.flops == pytest.approx(ANALYTIC_FLOPS, rel=0.02)
    # (XLA simplifies the last layer's matmuls against the sum's cotangent of ones: measured 0.98 and 0.95.)
    assert unrolled.loops.loops == 0 and unrolled.flops == pytest.approx(ANALYTIC_FLOPS, rel=0.06)
    # Bytes: the text's estimate of the repeats is reported, not added (it over-reads): the step's bytes stay
    # XLA's. The scanned program is another program (it copies each layer's weights and activations into
    # stacked residual buffers), so with the estimate it is only of the unrolled one's order (measured 2.3x on
    # CPU, 1.9x on v5e), and well above XLA's one-body count.
    assert scanned.bytes_accessed == xla_bytes
    estimate = xla_bytes + scanned.loops.extra_bytes
    assert estimate > 1.5 * xla_bytes and 0.7 * unrolled_bytes < estimate < 3 * unrolled_bytes


def test_nested_loops_multiply_and_unknown_trip_counts_count_once():
    def inner(x, w):
        return jnp.tanh(x @ w), None

    def outer(x, ws):
        return jax.lax.scan(inner, x, ws)[0], None

    def nested(x, ws):  # 3 outer trips of 4 inner ones
        return jax.lax.scan(outer, x, ws)[0].sum()

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    ws = jax.ShapeDtypeStruct((3, 4, 128, 128), jnp.float32)
    text = jax.jit(nested).lower(x, ws).compile().as_text()
    computations, entry = hlo_text.parse(text)
    runs = hlo_text.executions(computations, entry)
    dot_runs = [times for line, times in hlo_text.lines_with_executions(text) if " dot(" in line]
    assert dot_runs and set(dot_runs) == {12}, dot_runs
    assert max(runs.values()) >= 12 and runs[entry] == 1
    costs = hlo_text.uncounted_loop_costs(text)
    assert costs.extra_flops == pytest.approx(11 * 2 * 64 * 128 * 128)
    # A loop whose trip count the text does not give (a while over a data-dependent condition) counts once.
    def until(x):
        return jax.lax.while_loop(lambda c: c[1] < c[0].sum(), lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

    text = jax.jit(until).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile().as_text()
    assert hlo_text.uncounted_loop_costs(text).extra_flops == 0.0



def _attention_layer(x, w):  # heads as a batch dimension: libtpu writes these matmuls as padded convolutions
    q, k, v = (jnp.einsum("btd,hde->bhte", x, w[i]) for i in range(3))
    scores = jax.nn.softmax(jnp.einsum("bhqe,bhke->bhqk", q, k), axis=-1)
    return x + jnp.einsum("bhqe,hde->bqd", jnp.einsum("bhqk,bhke->bhqe", scores, v), w[3]), None


ATTENTION_LAYERS, BATCH, HEADS, SEQ, HEAD_DIM = 6, 4, 8, 77, 64


def _tpu_device():
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]


def test_scanned_attention_on_tpu_counts_what_the_unrolled_program_counts():
    """libtpu writes a batched matmul (scores = q k^T per head) as a convolution whose batch is a spatial window
    over padding: its FLOPs are the window positions that read real input (XLA's count), not every window
    position (which counted 8x too much and doubled a scanned SDXL step's FLOPs)."""
    device = _tpu_device()
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((BATCH, SEQ, HEADS * HEAD_DIM), jnp.bfloat16, sharding=sharding)
    ws = jax.ShapeDtypeStruct((ATTENTION_LAYERS, 4, HEADS, HEADS * HEAD_DIM, HEAD_DIM), jnp.bfloat16,
                              sharding=sharding)

    def scanned(x, ws):
        return jax.lax.scan(_attention_layer, x, ws)[0].astype(jnp.float32).sum()

    def unrolled(x, ws):
        for i in range(ATTENTION_LAYERS):
            x = _attention_layer(x, ws[i])[0]
        return x.astype(jnp.float32).sum()

    costs = {}
    for name, fn in (("scanned", scanned), ("unrolled", unrolled)):
        lowered = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, ws)
        compiled = lowered.compile()
        costs[name] = roofline.step_cost(lowered, compiled, [device])
        if name == "scanned":
            padded = [line for line in compiled.as_text().splitlines() if " convolution(" in line and "pad=" in line]
            assert padded, "no batched matmul written as a padded convolution: the test no longer tests it"
    assert costs["scanned"].loops.loops == 2 and costs["unrolled"].loops.loops == 0
    assert costs["scanned"].flops == pytest.approx(costs["unrolled"].flops, rel=0.03)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_padded_strided_convolutions_and_their_gradients_count_as_xla_counts(platform):
    sharding = {"sharding": jax.sharding.SingleDeviceSharding(_tpu_device())} if platform == "tpu" else {}
    image = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32, **sharding)
    kernel = jax.ShapeDtypeStruct((3, 3, 32, 64), jnp.float32, **sharding)
    for strides in ((1, 1), (2, 2)):
        def conv(x, k):
            return jax.lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        # The gradients are convolutions too, with the input or the window dilated by the stride (one program
        # each: a program of only the convolution, whose FLOPs XLA's analysis gives).
        for fn in (conv, *(jax.grad(lambda x, k: conv(x, k).sum(), argnums=i) for i in (0, 1))):
            compiled = jax.jit(fn).lower(image, kernel).compile()
            computations, _ = hlo_text.parse(compiled.as_text())
            ours = sum(hlo_text.computation_flops(c) for c in computations.values())
            xla_flops, _ = roofline._cost_analysis(compiled)
            assert " convolution(" in compiled.as_text()
            # XLA's figure adds the elementwise work around the convolution (converts, pads: 3% for v5e's
            # strided form, which rewrites the image's layout); every window position would count above it.
            assert 0.95 * xla_flops <= ours <= xla_flops, (strides, ours, xla_flops)
