"""sdjax's own PyTorch <-> Flax weight names (sdjax/models/weight_names.py): for a tiny model of every family,
PyTorch -> Flax -> PyTorch gives back the state dict bit for bit; for the real configs (SD 1.5, SD 2.1, SDXL),
every key maps both ways, on shapes only. (While diffusers' and transformers' Flax utilities existed, the Flax
trees were checked bit-equal to theirs, for the tiny families and the real configs' keys.)

The PyTorch models are built on torch's meta device (keys and shapes, no memory) and their state dicts filled
with random numpy arrays: every value distinct, so a transpose or a swap shows."""

import functools

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from pytorch_folder import with_text_model_prefix
from sdjax.models import weight_names
from sdjax.models.pytorch_weights import pytorch_to_flax

# family -> (config, component): SD 1.x's conv projections, SD 2.x's linear projections and per-level head
# dims, SDXL's text_time embedding and two-layer transformers, the VAE, both CLIP text models.
TINY_FAMILIES = {
    "sd1_unet": ("tiny_sd1", "unet"),
    "sd2_unet": ("tiny_sd2", "unet"),
    "sdxl_unet": ("tiny_sdxl", "unet"),
    "vae": ("tiny_sd1", "vae"),
    "clip_text": ("tiny_sd1", "text_encoder"),
    "clip_text_with_projection": ("tiny_sdxl", "text_encoder_2"),
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# SD 1.x's hub files carry this buffer; transformers no longer saves it.
POSITION_IDS = "text_model.embeddings.position_ids"


def _tiny_config(name: str):
    import ml_collections
    from tiny import tiny_config, tiny_sdxl_config
    if name == "tiny_sd1":
        return tiny_config()
    config = tiny_config() if name == "tiny_sd2" else tiny_sdxl_config()
    # New dicts rather than update(): attention_head_dim changes type (int -> per-level tuple).
    unet = {**config.model.unet.to_dict(), "use_linear_projection": True, "attention_head_dim": (2, 4)}
    if name == "tiny_sdxl":
        unet["transformer_layers_per_block"] = (2, 2)  # the mid block takes the last level's
    config.model.unet = ml_collections.ConfigDict(unet)
    return config


@functools.cache
def _config_and_shapes(name: str):
    """(config, models, Flax param shapes of every component) of a tiny config or of configs/NAME.py."""
    from tiny import load_config_file

    from sdjax import models as models_lib
    config = _tiny_config(name) if name.startswith("tiny_") else load_config_file(name)
    models = models_lib.build_models(config)
    return config, models, models_lib.param_shapes(models, config)


def _library(component: str) -> str:
    return weight_names.TRANSFORMERS if component in TEXT_ENCODERS else weight_names.DIFFUSERS


def _pytorch_shapes(config, models, component: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the PyTorch model's state dict (its class in diffusers / transformers), built on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        module = {"unet": lambda: UNet2DConditionModel(**config.model.unet.to_dict()),
                  "vae": lambda: AutoencoderKL(**config.model.vae.to_dict()),
                  "text_encoder": lambda: CLIPTextModel(models.text_encoder_config),
                  "text_encoder_2": lambda: CLIPTextModelWithProjection(models.text_encoder_2_config)}[component]()
    shapes = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    return with_text_model_prefix(shapes) if component in TEXT_ENCODERS else shapes


def _tiny_state(family: str):
    """(PyTorch state dict of random values as a hub file holds it, Flax param shapes, library) of a family."""
    config_name, component = TINY_FAMILIES[family]
    config, models, shapes = _config_and_shapes(config_name)
    rng = np.random.default_rng(0)
    state = {key: rng.standard_normal(shape, dtype=np.float32)
             for key, shape in _pytorch_shapes(config, models, component).items()}
    if component in TEXT_ENCODERS:
        state[POSITION_IDS] = np.arange(config.data.max_length, dtype=np.int64)[None]
    return state, shapes[component], _library(component)


def _ours(library: str):
    return {weight_names.DIFFUSERS: weight_names.flax_name_and_layout_diffusers,
            weight_names.TRANSFORMERS: weight_names.flax_name_and_layout_transformers}[library]


def _shape_only(shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.float32), shape)


def test_tiny_families_have_the_layers_they_stand_for():
    assert _tiny_state("sd1_unet")[0]["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4  # a 1x1 conv
    assert _tiny_state("sd2_unet")[0]["down_blocks.0.attentions.0.proj_in.weight"].ndim == 2  # a linear
    sdxl = _tiny_state("sdxl_unet")[0]
    assert "add_embedding.linear_1.weight" in sdxl
    assert "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight" in sdxl
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in _tiny_state("vae")[0]
    assert "text_projection.weight" in _tiny_state("clip_text_with_projection")[0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_flax_tree_maps_back_to_the_pytorch_state_dict(family):
    state, flax_shapes, library = _tiny_state(family)
    flax_params = flatten_dict(pytorch_to_flax(state, flax_shapes, family, rename=_ours(library)))
    back = dict(weight_names.pytorch_name_and_layout(key, value, library) for key, value in flax_params.items())
    assert back.keys() == {key for key in state if not weight_names.is_pytorch_buffer(key)}
    for key, value in back.items():
        assert np.array_equal(value, state[key]), key


@pytest.mark.parametrize("config_name", ["sd15", "sd21", "sdxl"])
def test_every_key_of_the_real_configs_maps_both_ways(config_name):
    config, models, shapes = _config_and_shapes(config_name)
    for component, tree in shapes.items():
        flax_shapes, library = flatten_dict(tree), _library(component)
        pytorch_shapes = _pytorch_shapes(config, models, component)
        to_flax = {}
        for key, shape in pytorch_shapes.items():
            flax_key, array = weight_names.flax_name_and_layout(key, _shape_only(shape), flax_shapes, library)
            assert flax_key in flax_shapes and array.shape == flax_shapes[flax_key].shape, (component, key)
            to_flax[key] = flax_key
        assert sorted(to_flax.values()) == sorted(flax_shapes), component  # one PyTorch key per Flax param
        for flax_key, shape in flax_shapes.items():
            key, array = weight_names.pytorch_name_and_layout(flax_key, _shape_only(shape.shape), library)
            assert to_flax.get(key) == flax_key and array.shape == pytorch_shapes[key], (component, flax_key)


def test_bare_clip_text_transformer_weights_get_the_text_model_prefix():
    state, flax_shapes, library = _tiny_state("clip_text")
    bare = {key.removeprefix("text_model."): value for key, value in state.items()}
    assert "embeddings.token_embedding.weight" in bare
    from_bare = flatten_dict(pytorch_to_flax(bare, flax_shapes, "bare", rename=_ours(library)))
    from_full = flatten_dict(pytorch_to_flax(state, flax_shapes, "full", rename=_ours(library)))
    assert from_bare.keys() == from_full.keys()
    assert all(np.array_equal(from_bare[key], value) for key, value in from_full.items())


def test_position_ids_is_a_buffer_and_the_position_embedding_a_weight():
    assert weight_names.is_pytorch_buffer(POSITION_IDS)
    assert not weight_names.is_pytorch_buffer("text_model.embeddings.position_embedding.weight")


def test_unknown_library_is_refused_by_name():
    with pytest.raises(ValueError, match="'pytorch'"):
        weight_names.flax_name_and_layout("conv_in.weight", _shape_only((4, 4, 3, 3)), {}, "pytorch")
    with pytest.raises(ValueError, match="'pytorch'"):
        weight_names.pytorch_name_and_layout(("conv_in", "kernel"), _shape_only((3, 3, 4, 4)), "pytorch")
