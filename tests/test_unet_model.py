"""sdjax's own UNet (sdjax/models/unet.py) against diffusers' PyTorch UNet2DConditionModel: the same outputs and
gradients from the same weights. (Against the Flax class it replaced, FlaxUNet2DConditionModel of diffusers
0.39, while both existed: the same parameter tree, the real SDXL config's included; outputs and gradients
equal once that class's tanh-approximated GELU and 1e-5 GroupNorm epsilon were set to PyTorch's, which ours
follows; 2e-4 to 4e-4 apart on the tiny configs without.)

Tiny configs, one per family: SD 1.x (conv projections, one head count for every level), SD 2.x (linear
projections, heads per level), SDXL (a level without attention, two transformer layers deep, the "text_time"
embedding) and `only_cross_attention`. Kernels and remat are compared on one block (cheaper to compile).
"""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from tiny import load_config_file

from sdjax.models import attention as attention_lib, pytorch_weights, unet_attention
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.unet_layers import CrossAttnDownBlock2D

_CROSS = 24  # cross_attention_dim of the tiny configs
_TOKENS = 5
_TEXT_EMBEDS = 12  # SDXL's pooled text embedding width in the tiny config

_TWO_LEVELS = {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
               "cross_attention_dim": _CROSS}
FAMILIES = {
    "sd1": {**_TWO_LEVELS, "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    "sd2": {**_TWO_LEVELS, "attention_head_dim": (2, 4), "use_linear_projection": True,
            "down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2},
    "sdxl": {**_TWO_LEVELS, "attention_head_dim": (2, 4), "use_linear_projection": True,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": _TEXT_EMBEDS + 6 * 8},
    # One level (no resampling: the cheapest UNet to compile), self-attention replaced by cross-attention.
    "only_cross_attention": {"sample_size": 8, "block_out_channels": (32,), "layers_per_block": 1,
                             "cross_attention_dim": _CROSS, "attention_head_dim": 4, "only_cross_attention": True,
                             "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",)},
}


def _inputs(family: str) -> dict:
    """sample NCHW (8x8 latents), two timesteps (one late: large sinusoid arguments), context; SDXL's pooled
    text embeddings and size/crop ids."""
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
              "timesteps": np.array([3, 901], np.int32),
              "context": rng.standard_normal((2, _TOKENS, _CROSS)).astype(np.float32)}
    if FAMILIES[family].get("addition_embed_type") == "text_time":
        inputs["text_embeds"] = rng.standard_normal((2, _TEXT_EMBEDS)).astype(np.float32)
        inputs["time_ids"] = np.array([[64, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]], np.float32)
    return inputs


def _cotangent(shape) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


# The inputs the gradients are taken against (time ids are integers in practice: no gradient).
_DIFFERENTIABLE = ("sample", "context", "text_embeds")


def _added(inputs: dict):
    return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if "text_embeds" in inputs else None


def _loss(module, params, inputs):
    """A scalar of the whole output: its dot product with a fixed random tensor."""
    inputs = jax.tree.map(jnp.asarray, inputs)
    out = module.apply({"params": params}, inputs["sample"], inputs["timesteps"], inputs["context"], _added(inputs))
    return jnp.sum(out.sample * _cotangent(out.sample.shape)), out.sample


def _output_and_grads(module, params, inputs):
    """(output, d loss / d differentiable inputs, d loss / d params), jitted."""
    def loss(differentiable, params):
        return _loss(module, params, {**inputs, **differentiable})

    differentiable = {k: v for k, v in inputs.items() if k in _DIFFERENTIABLE}
    (_, out), (d_inputs, d_params) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        differentiable, params)
    return np.asarray(out), jax.tree.map(np.asarray, d_inputs), jax.tree.map(np.asarray, d_params)


def _shapes(module, inputs):
    inputs = jax.tree.map(jnp.asarray, inputs)
    return jax.eval_shape(lambda rng: module.init(rng, inputs["sample"], inputs["timesteps"], inputs["context"],
                                                  _added(inputs))["params"], jax.random.key(0))


def _tree(module, inputs) -> dict:
    """{param path: (shape, dtype)} of `module`'s init."""
    return {k: (v.shape, v.dtype) for k, v in flatten_dict(_shapes(module, inputs)).items()}


@functools.cache
def _pytorch_case(family: str):
    """The PyTorch UNet of `family` (random weights, norms and biases too), its output and input gradients,
    and its weights as our params (sdjax's own converter)."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel as PyTorchUNet
    torch.manual_seed(0)
    model = PyTorchUNet(**FAMILIES[family]).eval()
    with torch.no_grad():
        for p in model.parameters():  # off their init values (ones, zeros), where a swapped scale/bias would show
            p.add_(0.05 * torch.randn_like(p))
    inputs = _inputs(family)
    tensors = {k: torch.from_numpy(v).requires_grad_(k in _DIFFERENTIABLE) for k, v in inputs.items()}
    added = None if "text_embeds" not in inputs else {k: tensors[k] for k in ("text_embeds", "time_ids")}
    out = model(tensors["sample"], tensors["timesteps"], tensors["context"], added_cond_kwargs=added).sample
    (out * torch.from_numpy(_cotangent(tuple(out.shape)))).sum().backward()
    grads = {k: t.grad.numpy() for k, t in tensors.items() if k in _DIFFERENTIABLE}
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = pytorch_weights.pytorch_to_flax(state, _shapes(UNet2DConditionModel(**FAMILIES[family]), inputs), "unet")
    return types.SimpleNamespace(model=model, inputs=inputs, output=out.detach().numpy(), grads=grads,
                                 params=params)


@functools.cache
def _ours(family: str, **fields):
    """Our UNet's output and gradients on the PyTorch case's weights and inputs."""
    case = _pytorch_case(family)
    return _output_and_grads(UNet2DConditionModel(**FAMILIES[family], **fields), case.params, case.inputs)


def _assert_close(got, want, relative: float):
    """Each array of `got` within `relative` x max(1, its largest value) of `want`'s."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, want_leaf), got_leaf in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=0, atol=relative * max(1.0, np.abs(want_leaf).max()),
                                   err_msg=jax.tree_util.keystr(path))


# --- against diffusers' PyTorch UNet2DConditionModel -----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_pytorch(family):
    case = _pytorch_case(family)
    output, _, _ = _ours(family)
    assert np.abs(case.output).max() > 0.5  # a real signal
    np.testing.assert_allclose(output, case.output, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_input_gradients_equal_pytorch(family):
    """d loss / d (sample, context, SDXL's text_embeds) within 1e-4 of PyTorch's, relative to each gradient's
    largest value (they are sums over the whole output)."""
    case = _pytorch_case(family)
    _, grads, _ = _ours(family)
    assert grads.keys() == case.grads.keys()
    for name, want in case.grads.items():
        scale = np.abs(want).max()
        assert scale > 1e-3, name
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_from_config_of_a_pytorch_config_builds_the_same_unet():
    """The whole config PyTorch's UNet writes (its bookkeeping and PyTorch-only keys at their defaults) loads."""
    assert UNet2DConditionModel.from_config(dict(_pytorch_case("sdxl").model.config)) == \
        UNet2DConditionModel(**FAMILIES["sdxl"])


# --- kernels and remat: the same function ------------------------------------------------------------------


@functools.cache
def _transformer(kernel: str):
    """Output and gradients (inputs and params) of a Transformer2DModel running `kernel`: self-
    attention over 8x8 positions, cross-attention over 5 tokens."""
    module = unet_attention.Transformer2DModel(in_channels=32, heads=4, dim_head=8, depth=1,
                                               use_linear_projection=True, kernel=kernel)
    rng = np.random.default_rng(0)
    features, context = rng.standard_normal((2, 8, 8, 32)), rng.standard_normal((2, _TOKENS, _CROSS))
    params = module.init(jax.random.key(0), features, context)["params"]

    def loss(features, context, params):
        out = module.apply({"params": params}, features, context)
        return jnp.sum(out * _cotangent(out.shape)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(features, context, params)
    return out, grads


@pytest.mark.parametrize("attention", ["memory_efficient", "dot_product", "per_head", "auto"])
def test_attention_kernels_give_the_default_output_and_gradients(attention):
    _assert_close(_transformer(attention), _transformer("default"), 1e-5)


@pytest.mark.parametrize("query_length, key_length", [(40, 40), (40, 7), (9, 23)])
def test_memory_efficient_kernel_over_many_uneven_chunks_equals_materialised(query_length, key_length):
    """Query chunks of 16 and key chunks of 8: several chunks each way, the last ones padded."""
    rng = np.random.default_rng(0)
    q = 3 * rng.standard_normal((2, query_length, 3, 8)).astype(np.float32)  # sharp softmax
    k, v = (rng.standard_normal((2, key_length, 3, 8)).astype(np.float32) for _ in range(2))
    cotangent = rng.standard_normal(q.shape).astype(np.float32)

    def value_and_grads(kernel):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, 8 ** -0.5), q, k, v)
        return out, vjp(cotangent)

    chunked = functools.partial(attention_lib.memory_efficient_kernel, query_chunk=16, key_chunk=8)
    materialized = attention_lib.KERNELS["default"]
    _assert_close(jax.jit(lambda: value_and_grads(chunked))(), jax.jit(lambda: value_and_grads(materialized))(), 1e-5)


@functools.cache
def _down_block(remat: str):
    """Output and gradients (inputs and params) of a CrossAttnDownBlock2D (a ResnetBlock2D, a Transformer2DModel)
    with `remat`."""
    block = CrossAttnDownBlock2D(
        in_channels=32, out_channels=32, num_layers=1, add_downsample=False, heads=4, transformer_depth=1,
        use_linear_projection=False, only_cross_attention=False, kernel="default", scan_layers=False, dropout=0.0,
        remat=remat, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    features, temb = rng.standard_normal((2, 8, 8, 32)), rng.standard_normal((2, 128))
    context = rng.standard_normal((2, _TOKENS, _CROSS))
    params = jax.jit(CrossAttnDownBlock2D.init, static_argnums=0)(block.clone(remat="none"), jax.random.key(0),
                                                                 features, temb, context)["params"]

    def loss(features, context, params):
        out, _ = block.apply({"params": params}, features, temb, context)
        return jnp.sum(out * _cotangent(out.shape)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(features, context, params)
    return out, grads


@pytest.mark.parametrize("remat", ["minimal", "full"])
def test_remat_keeps_the_params_loss_and_gradients(remat):
    inputs = _inputs("sdxl")
    assert _tree(UNet2DConditionModel(**FAMILIES["sdxl"], remat=remat), inputs) == \
        _tree(UNet2DConditionModel(**FAMILIES["sdxl"]), inputs)
    # 3e-5: recomputed forward passes round differently, and the time projection's gradient (a sum over every
    # position) cancels to ~1e-5 of its terms.
    _assert_close(_down_block(remat), _down_block("none"), 3e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_training_with_dropout_traces_with_remat(remat):
    """Dropout on (train=True: `deterministic` is static under remat), gradients traced, not compiled."""
    case = _pytorch_case("only_cross_attention")
    unet = UNet2DConditionModel(**FAMILIES["only_cross_attention"], dropout=0.1, remat=remat)

    def loss(params):
        out = unet.apply({"params": params}, case.inputs["sample"], case.inputs["timesteps"], case.inputs["context"],
                         train=True, rngs={"dropout": jax.random.key(0)})
        return jnp.sum(out.sample)

    grads = jax.eval_shape(jax.grad(loss), case.params)
    assert jax.tree.structure(grads) == jax.tree.structure(case.params)


def test_use_memory_efficient_attention_runs_the_memory_efficient_kernel():
    case = _pytorch_case("only_cross_attention")

    def traced(**fields):
        unet = UNet2DConditionModel(**FAMILIES["only_cross_attention"], **fields)
        return str(jax.make_jaxpr(lambda p: _loss(unet, p, case.inputs)[1])(case.params))

    assert traced(use_memory_efficient_attention=True) == traced(attention="memory_efficient") != traced()


def test_compute_dtype_keeps_params_float32_and_outputs_in_it():
    case = _pytorch_case("sd1")
    unet = UNet2DConditionModel(**FAMILIES["sd1"], dtype=jnp.bfloat16)
    assert {s.dtype for s in jax.tree.leaves(_shapes(unet, case.inputs))} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(lambda p: _loss(unet, p, case.inputs)[1], case.params).dtype == jnp.bfloat16


# --- the real models' shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_real_configs_have_the_published_parameter_counts(name, count):
    unet = UNet2DConditionModel(**load_config_file(name).model.unet.to_dict())
    inputs = {"sample": jnp.zeros((1, 4, 8, 8)), "timesteps": jnp.ones((1,), jnp.int32),
              "context": jnp.zeros((1, 1, unet.cross_attention_dim))}
    if unet.addition_embed_type == "text_time":
        text_embeds = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        inputs.update(text_embeds=jnp.zeros((1, text_embeds)), time_ids=jnp.zeros((1, 6)))
    assert sum(s.size for s in jax.tree.leaves(_shapes(unet, inputs))) == count


# --- diffusers configs ---------------------------------------------------------------------------------------


def test_config_round_trips_through_from_config():
    unet = UNet2DConditionModel(**FAMILIES["sdxl"], dtype=jnp.bfloat16, attention="per_head", remat="full")
    config = unet.config
    assert not {"dtype", "attention", "remat"} & config.keys()
    assert UNet2DConditionModel.from_config(config, dtype=jnp.bfloat16, attention="per_head", remat="full") == unet


def test_from_config_ignores_bookkeeping_and_accepts_harmless_pytorch_keys():
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0", "_name_or_path": "x",
              "upcast_attention": True, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-05,
              "center_input_sample": False, "class_embed_type": None, "attention_type": "default",
              **{k: list(v) if isinstance(v, tuple) else v for k, v in FAMILIES["sd2"].items()}}  # JSON: lists
    assert UNet2DConditionModel.from_config(config) == UNet2DConditionModel(**FAMILIES["sd2"])


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("time_cond_proj_dim", 256),
                                        ("resnet_time_scale_shift", "scale_shift"), ("attention_type", "gated"),
                                        ("norm_num_groups", 16), ("act_fn", "mish"), ("cross_attention_dim", [8, 8]),
                                        ("no_such_key", 1)])
def test_from_config_refuses_what_it_cannot_compute(key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        UNet2DConditionModel.from_config({key: value})


@pytest.mark.parametrize("fields, message", [({"num_attention_heads": 8}, "num_attention_heads"),
                                             ({"attention": "splash"}, "model.attention"),
                                             ({"remat": "some"}, "train.remat"),
                                             ({"attention": "per_head", "use_memory_efficient_attention": True},
                                              "use_memory_efficient_attention")])
def test_fields_it_cannot_honour_are_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionModel(**FAMILIES["sd1"], **fields)
