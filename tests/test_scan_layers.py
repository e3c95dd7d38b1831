"""model.scan_layers: the scanned UNet stacks and CLIP layers compute what the unrolled ones compute (loss and
gradients), their params convert both ways, and LoRA adapts stacked kernels. (tests/test_sdxl.py trains
an SDXL model with it over FSDP, exports it to the PyTorch pipeline and checks that a resume without it is
refused by name.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from transformers import CLIPTextConfig

from sdjax import lora as lora_lib
from sdjax.models import layer_stacks
from sdjax.models.clip_text import CLIPTextEncoderWithProjection
from sdjax.models.unet import UNet2DConditionModel

# float32 on CPU: the scan runs the same operations in the same order as the unrolled layers; what differs
# is XLA's fusion around them. Measured: losses equal to the last bit, gradients within 7e-8 (UNet) and
# 4e-5 relative to the largest gradient (CLIP).
GRAD_RTOL = 1e-4

# Two layers per block: runs of same-shaped layers in a block of ResNet blocks only (down_blocks_0, as SDXL's
# first level), in a cross-attention block with one-block transformers (up_blocks_1) and with 2-block stacks,
# a scan of scans (up_blocks_0); layers of other shapes in between (down_blocks_1, the last of up_blocks_0, the
# first of up_blocks_1); the mid block's two ResNet blocks, which are not consecutive.
UNET = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
            attention_head_dim=(2, 4), cross_attention_dim=32, transformer_layers_per_block=(1, 2),
            use_linear_projection=True, sample_size=8)


def _assert_grads_close(stacked_grads, unrolled_grads):
    expected = layer_stacks.stack_tree(unrolled_grads)
    assert jax.tree.structure(stacked_grads) == jax.tree.structure(expected)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    for got, want in zip(jax.tree.leaves(stacked_grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=GRAD_RTOL * scale)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_scanned_unet_computes_the_unrolled_loss_and_gradients(remat):
    unrolled = UNet2DConditionModel(**UNET, remat=remat)
    scanned = UNet2DConditionModel(**UNET, remat=remat, scan_layers=True)
    sample = jax.random.normal(jax.random.key(1), (2, 4, 8, 8))
    timesteps, context = jnp.array([3, 500]), jax.random.normal(jax.random.key(2), (2, 7, 32))
    params = jax.jit(unrolled.init)(jax.random.key(0), sample, timesteps, context)["params"]
    stacked = layer_stacks.stack_tree(params)
    # The scanned module's own tree is that of the conversion: the 2-block stacks stacked, the 1-block ones not;
    # runs of same-shaped layers stacked, the other layers not.
    own = jax.eval_shape(lambda: scanned.init(jax.random.key(0), sample, timesteps, context)["params"])
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, stacked)
    assert stacked["down_blocks_1"]["attentions_0"]["transformer_blocks"]["ff"]["net_2"]["kernel"].shape == (2, 256, 64)
    assert sorted(stacked["down_blocks_0"]) == ["downsamplers_0", "layers_0_to_1"]
    assert stacked["down_blocks_0"]["layers_0_to_1"]["resnet"]["conv1"]["kernel"].shape == (2, 3, 3, 32, 32)
    assert sorted(stacked["up_blocks_0"]) == ["attentions_2", "layers_0_to_1", "resnets_2", "upsamplers_0"]
    run = stacked["up_blocks_0"]["layers_0_to_1"]
    assert run["resnet"]["conv1"]["kernel"].shape == (2, 3, 3, 128, 64)
    assert run["attention"]["transformer_blocks"]["ff"]["net_2"]["kernel"].shape == (2, 2, 256, 64)  # run, depth
    assert sorted(stacked["up_blocks_1"]) == ["attentions_0", "layers_1_to_2", "resnets_0"]
    assert "transformer_blocks_0" in stacked["up_blocks_1"]["layers_1_to_2"]["attention"]
    assert {"resnets_0", "resnets_1"} <= set(stacked["mid_block"])

    def loss(module):
        return lambda p: jnp.mean(module.apply({"params": p}, sample, timesteps, context).sample ** 2)

    loss_unrolled, grads_unrolled = jax.jit(jax.value_and_grad(loss(unrolled)))(params)
    loss_scanned, grads_scanned = jax.jit(jax.value_and_grad(loss(scanned)))(stacked)
    np.testing.assert_allclose(loss_scanned, loss_unrolled, rtol=1e-6)
    _assert_grads_close(grads_scanned, grads_unrolled)


def test_the_scanned_clip_encoder_computes_the_unrolled_states_and_gradients():
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, hidden_act="gelu", projection_dim=24, max_position_embeddings=16,
                            bos_token_id=98, eos_token_id=99, pad_token_id=99)
    unrolled, scanned = CLIPTextEncoderWithProjection(config), CLIPTextEncoderWithProjection(config, scan_layers=True)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 100)
    params = unrolled.init(jax.random.key(0), ids)["params"]
    stacked = layer_stacks.stack_tree(params)
    own = jax.eval_shape(lambda: scanned.init(jax.random.key(0), ids)["params"])
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, stacked)

    out_unrolled = unrolled.apply({"params": params}, ids, output_hidden_states=True)
    out_scanned = scanned.apply({"params": stacked}, ids, output_hidden_states=True)
    assert len(out_scanned.hidden_states) == len(out_unrolled.hidden_states) == 4  # embeddings + 3 layers
    for got, want in zip((*out_scanned.hidden_states, out_scanned.text_embeds, out_scanned.pooler_output),
                         (*out_unrolled.hidden_states, out_unrolled.text_embeds, out_unrolled.pooler_output)):
        np.testing.assert_allclose(got, want, atol=1e-6)

    def loss(module):  # what SDXL conditions on: the penultimate states and the projected pooled output
        def of(p):
            out = module.apply({"params": p}, ids, output_hidden_states=True)
            return jnp.sum(out.hidden_states[-2] ** 2) + jnp.sum(out.text_embeds)
        return of

    loss_unrolled, grads_unrolled = jax.jit(jax.value_and_grad(loss(unrolled)))(params)
    loss_scanned, grads_scanned = jax.jit(jax.value_and_grad(loss(scanned)))(stacked)
    np.testing.assert_allclose(loss_scanned, loss_unrolled, rtol=1e-6)
    _assert_grads_close(grads_scanned, grads_unrolled)


def test_stacks_convert_both_ways_on_params_host_arrays_and_shapes():
    rng = np.random.default_rng(0)
    layer = lambda: {"attn1": {"to_q": {"kernel": rng.standard_normal((4, 4), dtype=np.float32)}}}  # noqa: E731
    resnet = lambda channels: {"conv1": {"kernel": rng.standard_normal((3, 3, channels, 4), dtype=np.float32)}}  # noqa: E731
    unet = {"mid_block": {"attentions_0": {"transformer_blocks_0": layer(), "transformer_blocks_1": layer(),
                                           "proj_in": {"bias": np.zeros(4, np.float32)}},
                          "resnets_0": resnet(4), "resnets_1": resnet(4)},
            "down_blocks_0": {"attentions_0": {"transformer_blocks_0": layer()}},
            "up_blocks_0": {"resnets_0": resnet(6), "resnets_1": resnet(8), "resnets_2": resnet(8),
                            "attentions_0": {"transformer_blocks_0": layer()},
                            "attentions_1": {"transformer_blocks_0": layer()},
                            "attentions_2": {"transformer_blocks_0": layer()}}}
    clip = {"text_model": {"encoder": {"layers": {"0": layer(), "1": layer(), "2": layer()}}}}
    params = {"unet": unet, "text_encoder": clip, "vae": {"layers": {"0": layer()}}}  # the VAE is never stacked
    stacked = layer_stacks.stack_params(params)
    assert isinstance(stacked["unet"]["mid_block"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"],
                      np.ndarray)  # host arrays stay on the host
    assert stacked["text_encoder"]["text_model"]["encoder"]["layers"]["attn1"]["to_q"]["kernel"].shape == (3, 4, 4)
    assert "transformer_blocks_0" in stacked["unet"]["down_blocks_0"]["attentions_0"]  # one block: not stacked
    up = stacked["unet"]["up_blocks_0"]  # layers 1 and 2 have the same shapes: one run
    assert sorted(up) == ["attentions_0", "layers_1_to_2", "resnets_0"]
    assert up["layers_1_to_2"]["resnet"]["conv1"]["kernel"].shape == (2, 3, 3, 8, 4)
    assert up["layers_1_to_2"]["attention"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].shape == (2, 4, 4)
    assert {"resnets_0", "resnets_1"} <= set(stacked["unet"]["mid_block"])  # not consecutive: not a run
    assert stacked["vae"] == params["vae"]
    back = layer_stacks.unstack_params(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stacked)
    assert jax.tree.map(lambda x: x.shape, layer_stacks.unstack_params(shapes)) == \
        jax.tree.map(lambda x: x.shape, params)
    assert layer_stacks.stack_params(stacked) == stacked  # stacking twice changes nothing


def test_lora_adapts_stacked_kernels_as_it_adapts_each_layer():
    unrolled = UNet2DConditionModel(**UNET)
    sample = jnp.zeros((1, 4, 8, 8))
    params = jax.jit(unrolled.init)(jax.random.key(0), sample, jnp.ones((1,), jnp.int32), jnp.zeros((1, 7, 32)))["params"]
    stacked = {"unet": layer_stacks.stack_tree(params)}
    lora = ml_collections.ConfigDict(dict(rank=2, alpha=4, unet_target_modules=("to_q", "to_out.0"),
                                          text_encoder_target_modules=()))
    adapters = lora_lib.init_adapters(stacked, lora, jax.random.key(1))
    stack = adapters["unet"]["down_blocks_1"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]
    assert stack["lora_A"].shape == (2, 64, 2) and stack["lora_B"].shape == (2, 2, 64)
    run = adapters["unet"]["up_blocks_0"]["layers_0_to_1"]["attention"]["transformer_blocks"]["attn1"]["to_q"]
    assert run["lora_A"].shape == (2, 2, 64, 2) and run["lora_B"].shape == (2, 2, 2, 64)  # run, depth
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0: the adapters change the kernels
    # Every layer of the stack has its own adapters: as many adapted kernels as unrolled.
    per_layer = layer_stacks.unstack_tree(adapters["unet"])
    assert len(lora_lib.adapted_modules(params, lora.unet_target_modules)) == \
        len({path[:-1] for path in _paths(per_layer)})
    merged = lora_lib.merge({**stacked, "lora": adapters}, lora_lib.scale(lora))["unet"]
    merged_per_layer = lora_lib.merge({"unet": params, "lora": {"unet": per_layer}}, lora_lib.scale(lora))["unet"]
    for got, want in zip(jax.tree.leaves(layer_stacks.unstack_tree(merged)), jax.tree.leaves(merged_per_layer)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    top = ("up_blocks_0", "attentions_1", "transformer_blocks_1", "attn1", "to_q", "kernel")
    assert not np.allclose(_get(merged_per_layer, top), _get(params, top))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))
        else:
            yield prefix + (key,)
