"""Remat and gradient accumulation trade memory for time, never the result: same loss, same update.

The step runs with `optax.sgd(1.0)`, so the update it applies is exactly minus the gradient: comparing updates
compares gradients, with no optimizer in between (Adam's first step, g / |g|, would turn rounding noise in
near-zero gradients into full-size differences).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdjax import data as data_lib
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax import training_setup
from sdjax.config import ConfigError
from sdjax.models import attention as attention_lib, unet_attention
from sdjax.validation import validate


@pytest.fixture(scope="module")
def setup():
    """The SGD training setup of a config with batch 16 (2 per device, room for 2 micro-batches), its initial
    state and a batch, shared: each variant below builds on the same models and compiles only its step."""
    from tiny import tiny_config
    config = tiny_config()
    config.train.batch_size = 16
    base = training_setup.build(config, tx=optax.sgd(1.0))
    state = base.create_state(jax.random.key(0))
    batch = base.global_batch(data_lib.make_train_dataset(config, base.models.tokenizer)[0])
    return base, state, batch


def _one_step(setup, **train_overrides):
    """(loss, update) of one SGD step on the batch, with `train_overrides` applied to config.train."""
    base, state, batch = setup
    config = base.config.copy_and_resolve_references()
    config.train.update(train_overrides)
    variant = training_setup.build(config, models=base.models, tx=optax.sgd(1.0))
    new_state, metrics = variant.train_step(jax.tree.map(jnp.copy, state), batch, jax.random.key(1))  # donated
    update = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), new_state.params, state.params)
    return float(metrics["loss"]), update


@pytest.fixture(scope="module")
def reference(setup):
    return _one_step(setup)


# Tolerance: recomputation and micro-batching only reorder float32 sums (XLA fuses the recomputed forward
# differently; micro-batch gradients are summed before averaging), so the loss agrees to 1e-6 relative and
# every gradient entry to 1e-5 of the largest one (measured: about 1e-7 on this CPU).
def _assert_same_step(result, reference):
    loss, update = result
    ref_loss, ref_update = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(ref_update))
    assert scale > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), update, ref_update)


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_gives_same_loss_and_update(setup, reference, policy):
    _assert_same_step(_one_step(setup, remat=policy), reference)


def test_grad_accumulation_gives_same_loss_and_update_as_whole_batch(setup, reference):
    _assert_same_step(_one_step(setup, grad_accum=2), reference)


def test_vae_encode_chunks_give_same_loss_and_update(setup, reference):
    # The frozen VAE encodes the batch in 2 parts in sequence: the same latents, so the same step.
    _assert_same_step(_one_step(setup, vae_encode_chunks=2), reference)


def test_merge_micro_batches_undoes_the_split():
    x = np.arange(16 * 3).reshape(16, 3)
    np.testing.assert_array_equal(step_lib.merge_micro_batches(step_lib.split_micro_batches(x, 4), 4), x)


def test_remat_recomputes_inside_unet_blocks(tiny_config):
    """train.remat really wraps the blocks: one remat per ResNet/Transformer block in the gradient."""
    params = models_lib.param_shapes(models_lib.build_models(tiny_config), tiny_config)["unet"]
    latents = jax.ShapeDtypeStruct((1, 4, 2, 2), jnp.float32)
    context = jax.ShapeDtypeStruct((1, tiny_config.data.max_length, tiny_config.model.unet.cross_attention_dim),
                                   jnp.float32)

    def remat_count(policy):
        tiny_config.train.remat = policy
        models = models_lib.build_models(tiny_config)

        def loss(unet_params, latents, context):
            return models_lib.predict_noise(models, unet_params, latents, jnp.ones((1,), jnp.int32), context).sum()

        jaxpr = jax.make_jaxpr(jax.grad(loss))(params, latents, context)  # traced, not compiled
        return str(jaxpr).count("remat")

    blocks = [name for block in params.values() if isinstance(block, dict) for name in block
              if name.startswith(("resnets_", "attentions_"))]
    assert remat_count("none") == 0
    assert remat_count("full") == len(blocks) > 0


def test_split_micro_batches_takes_every_device_share():
    x = np.arange(8)  # on 4 devices: [0 1] [2 3] [4 5] [6 7]
    micro = np.asarray(step_lib.split_micro_batches(x, 2))
    np.testing.assert_array_equal(micro, [[0, 2, 4, 6], [1, 3, 5, 7]])  # one example from each device


def test_attention_kernels_match_default(tiny_config, monkeypatch):
    """The other `model.attention` kernels compute the default's UNet output (float32). Both reorder the
    float32 sums (`memory_efficient` sums the softmax chunk by chunk; `dot_product` is XLA's fused kernel), and
    the tiny UNet's GroupNorms over 2x2 latents amplify that: outputs of order 0.5 moved by up to 1.6e-4
    (chunked) and 2.2e-4 (dot_product) in runs here, so 5e-4 absolute. `per_head` loops over heads; `auto`
    on these 8 emulated CPU devices materialises the scores, in the layout of diffusers' split_head_dim."""
    default_models = models_lib.build_models(tiny_config)
    params = models_lib.init_params(default_models, tiny_config, jax.random.key(0))["unet"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 2, 2), np.float32)
    context = rng.standard_normal((2, tiny_config.data.max_length, default_models.unet.cross_attention_dim),
                                  np.float32)
    outputs = {}
    kernels = ("default", "memory_efficient", "dot_product", "per_head", "auto")
    for attention in kernels:
        tiny_config.model.attention = attention
        models = models_lib.build_models(tiny_config)
        outputs[attention] = jax.jit(lambda p: models_lib.predict_noise(
            models, p, latents, np.array([10, 900]), context))(params)
    for attention in kernels[1:]:
        np.testing.assert_allclose(outputs[attention], outputs["default"], rtol=0, atol=5e-4, err_msg=attention)
    # On a CPU that is one JAX device, `auto` is `per_head` where the scores are big, else `default`'s layout.
    monkeypatch.setattr(attention_lib.jax, "local_device_count", lambda backend=None: 1)
    for threshold, expected in ((0, "per_head"), (2**40, "default")):
        monkeypatch.setattr(attention_lib, "PER_HEAD_MIN_SCORE_BYTES", threshold)
        np.testing.assert_array_equal(jax.jit(lambda p: models_lib.predict_noise(
            models, p, latents, np.array([10, 900]), context))(params), outputs[expected], err_msg=expected)


def test_auto_loops_over_heads_only_for_scores_too_big_for_the_cache():
    def qk(batch, tokens, heads, keys):
        return np.zeros((batch, tokens, heads, 8), np.float32), np.zeros((batch, keys, heads, 8), np.float32)
    assert attention_lib.scores_bytes(*qk(8, 1024, 8, 1024)) == 268_435_456  # benchmarks/train_step.py's
    assert attention_lib.scores_bytes(*qk(8, 1024, 8, 1024)) >= attention_lib.PER_HEAD_MIN_SCORE_BYTES
    assert attention_lib.scores_bytes(*qk(32, 64, 4, 77)) < attention_lib.PER_HEAD_MIN_SCORE_BYTES  # the demo's


def test_dot_product_kernel_runs_in_every_attention_layer(tiny_config, monkeypatch):
    """With `dot_product`, every one of the UNet's attention layers (self and cross) goes through
    jax.nn.dot_product_attention; with `default`, none does."""
    kernels = []
    monkeypatch.setattr(attention_lib, "fused_attention_kernel",
                        lambda query, key: kernels.append(query.shape) or "xla")
    layers = []

    def count_layers(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, unet_attention.Attention):
            layers.append(context.module.name)
        return next_fun(*args, **kwargs)

    latents = np.zeros((2, 4, 2, 2), np.float32)
    for attention in ("default", "dot_product"):
        tiny_config.model.attention = attention
        models = models_lib.build_models(tiny_config)
        params = models_lib.init_params(models, tiny_config, jax.random.key(0))["unet"]
        context = np.zeros((2, tiny_config.data.max_length, models.unet.cross_attention_dim), np.float32)
        kernels.clear()  # the kernels the init above ran: only the forward pass below counts
        with nn.intercept_methods(count_layers):
            jax.eval_shape(lambda p: models_lib.predict_noise(models, p, latents, np.array([1, 2]), context), params)
        if attention == "default":
            assert not kernels and layers
            default_layers, layers = len(layers), []
    assert len(kernels) == default_layers


def test_cudnn_flash_attention_only_where_cudnn_takes_the_shapes(monkeypatch):
    """On GPU: cuDNN for half-precision self-attention; XLA for float32, for the 77-token cross-attention (cuDNN
    refuses odd lengths in training) and for head dims over 128. Elsewhere always XLA."""
    def kernel(length, key_length, dtype=jnp.bfloat16, head_dim=64):
        q = jax.ShapeDtypeStruct((2, length, 8, head_dim), dtype)
        k = jax.ShapeDtypeStruct((2, key_length, 8, head_dim), dtype)
        return attention_lib.fused_attention_kernel(q, k)

    assert kernel(4096, 4096) == "xla"  # this host is a CPU
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    assert kernel(4096, 4096) == "cudnn"
    assert kernel(4096, 77) == "xla"
    assert kernel(4096, 4096, jnp.float32) == "xla"
    assert kernel(4096, 4096, head_dim=160) == "xla"


@pytest.mark.parametrize("key,value,message", [
    ("grad_accum", 3, "divisor of the per-device batch .* = 16 / 8 = 2"),
    ("grad_accum", 0, "train.grad_accum=0"),
    ("vae_encode_chunks", 4, r"divisor of the per-device \(micro-\)batch .* = 16 / 8 / 1 = 2"),
    ("remat", "everything", r"\['none', 'minimal', 'full'\]"),
])
def test_bad_memory_settings_are_named(tiny_config, key, value, message):
    tiny_config.train.batch_size = 16
    tiny_config.train[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config, num_devices=8)
