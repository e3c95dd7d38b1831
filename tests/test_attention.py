"""The `per_head` attention kernel's own backward pass (sdjax/models/attention.py: `_per_head_attention`)
against autodiff of the materialised kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import attention as attention_lib


def _qkv(batch, queries, keys, heads, head_dim, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, queries, heads, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((batch, keys, heads, head_dim)).astype(dtype) for _ in range(2))
    return q, k, v


def _value_and_grads(kernel, q, k, v, cotangent):
    scale = q.shape[-1] ** -0.5
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, scale), q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


@pytest.mark.parametrize("queries, keys", [(64, 64), (64, 16)])  # self-attention; cross-attention, 16 tokens
def test_per_head_forward_and_gradients_equal_the_materialised_kernel(queries, keys):
    q, k, v = _qkv(2, queries, keys, 3, 8)
    q = q * 3  # sharper softmax than unit scores: large probabilities, where a wrong backward shows
    cotangent = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    out, grads = jax.jit(lambda *a: _value_and_grads(attention_lib.per_head_kernel, *a))(q, k, v, cotangent)
    want_out, want_grads = jax.jit(lambda *a: _value_and_grads(attention_lib.materialized_kernel, *a))(
        q, k, v, cotangent)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-5)
    for name, got, want in zip("qkv", grads, want_grads):
        assert np.abs(want).max() > 0.1, name  # a gradient that is there to get wrong
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"d{name}")


def test_per_head_in_bfloat16_keeps_the_dtype_and_float32_softmax():
    q, k, v = _qkv(2, 32, 32, 2, 8)
    cotangent = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out, grads = jax.jit(lambda *a: _value_and_grads(attention_lib.per_head_kernel, *a))(*low, cotangent)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    # Against float32 on the same (bf16-rounded) inputs: only the bf16 rounding of inputs to the dots differs.
    exact = [np.asarray(x, np.float32) for x in low]
    want_out, want_grads = _value_and_grads(attention_lib.materialized_kernel, *exact, cotangent)
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=0, atol=3e-2)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=6e-2)
