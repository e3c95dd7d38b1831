"""sdjax's CLIP text encoders (sdjax/models/clip_text.py): transformers' PyTorch CLIPTextModel /
CLIPTextModelWithProjection compute the same from the same weights (outputs, pooled states, projections and
parameter gradients), for each family Stable Diffusion uses; the parameter counts of the real configs.
(Against transformers 4.57's Flax CLIP classes, which they replaced, while both existed: the same parameter
trees, outputs and gradients within 1e-5.)

Tolerances: float32 on CPU, tiny models. Outputs: max abs diff <= 1e-4 against PyTorch (seen: ~1e-6).
Gradients (token ids are integers, so gradients are taken w.r.t. the parameters, the token embedding table
being the input's): max abs diff <= 1e-4 x the largest gradient (seen: ~5e-7 x).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdjax.models import pytorch_weights, weight_names
from sdjax.models.clip_text import CLIPTextEncoder, CLIPTextEncoderWithProjection, _pool

ATOL_PYTORCH = 1e-4
ATOL_OLD_FLAX = 1e-5
GRAD_RTOL = 1e-4  # of the largest gradient magnitude
GRAD_RTOL_OLD_FLAX = 1e-5

VOCAB, LENGTH, EOS = 100, 16, 99  # EOS: the tokenizer's end-of-text id, its vocabulary's last (as CLIP's)
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=LENGTH, projection_dim=24, bos_token_id=98)

# Family -> (config, pad id). SD 1.x's text encoder config has the legacy eos_token_id 2, under which the pooled
# state is taken at each caption's highest id; SD 2.x and SDXL name the real one, taken at its first occurrence
# (SD's tokenizer pads with it, SDXL's second tokenizer with id 0).
FAMILIES = {
    "sd1_quick_gelu_legacy_eos": (dict(hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1), EOS),
    "sd2_gelu": (dict(hidden_act="gelu", eos_token_id=EOS, pad_token_id=EOS), EOS),
    "sdxl_second_gelu_projection": (dict(hidden_act="gelu", eos_token_id=EOS, pad_token_id=0), 0),
}
WITH_PROJECTION = {"sdxl_second_gelu_projection"}


def _config(family: str) -> CLIPTextConfig:
    return CLIPTextConfig(**TINY, **FAMILIES[family][0])


def _modules(family: str):
    """(ours, PyTorch class)."""
    if family in WITH_PROJECTION:
        return CLIPTextEncoderWithProjection(_config(family)), CLIPTextModelWithProjection
    return CLIPTextEncoder(_config(family)), CLIPTextModel


def _input_ids(pad: int) -> np.ndarray:
    """Three captions: start token, random words, end-of-text at different positions, then padding."""
    rng = np.random.default_rng(0)
    ids = np.full((3, LENGTH), pad, np.int32)
    for row, eos_at in enumerate((5, 11, LENGTH - 1)):
        ids[row, 0] = TINY["bos_token_id"]
        ids[row, 1:eos_at] = rng.integers(3, EOS - 2, eos_at - 1)
        ids[row, eos_at] = EOS
    return ids


def _position_ids(ids):
    return np.broadcast_to(np.arange(ids.shape[-1]), ids.shape).astype(np.int32)


def _shapes(module):
    ids = jnp.zeros((1, LENGTH), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.ones_like(ids), None))["params"]


@functools.cache
def _pytorch_model_and_params(family: str):
    """The PyTorch model (float32, eval mode) with random weights, and those weights in our param tree."""
    ours, torch_class = _modules(family)
    torch.manual_seed(0)
    model = torch_class(_config(family)).eval()
    with torch.no_grad():  # off init's zero biases and unit norms, so a misplaced weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = pytorch_weights.pytorch_to_flax(state, _shapes(ours), "text_encoder",
                                             rename=weight_names.flax_name_and_layout_transformers)
    return model, params


def _apply(module, params, ids, mask, output_hidden_states=True):
    return module.apply({"params": params}, ids, mask, _position_ids(ids), deterministic=True,
                        output_hidden_states=output_hidden_states)


def _named_outputs(output) -> dict:
    """{name: array} of an output (ours, transformers' Flax or PyTorch), hidden states one by one. transformers'
    WithProjection outputs have no pooler_output."""
    named = {f"hidden_states_{i}": h for i, h in enumerate(output.hidden_states)}
    for field in ("last_hidden_state", "pooler_output", "text_embeds"):
        if getattr(output, field, None) is not None:
            named[field] = getattr(output, field)
    return named


def _ids_and_mask(family):
    ids = _input_ids(FAMILIES[family][1])
    return ids, np.ones_like(ids)  # as sdjax runs the encoders


def _loss_weights(family: str) -> dict:
    """Random weights of a scalar loss over the outputs every implementation has: the hidden states, and the
    pooled state (without projection) or its projection (with)."""
    hidden, rng = TINY["hidden_size"], np.random.default_rng(1)
    shapes = {f"hidden_states_{i}": (3, LENGTH, hidden) for i in range(TINY["num_hidden_layers"] + 1)}
    shapes["last_hidden_state"] = (3, LENGTH, hidden)
    if family in WITH_PROJECTION:
        shapes["text_embeds"] = (3, TINY["projection_dim"])
    else:
        shapes["pooler_output"] = (3, hidden)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _outputs_and_gradients(module, family: str, mask=None):
    """(outputs by `_named_outputs`, gradients of the `_loss_weights` loss w.r.t. every parameter) of a Flax
    module (ours or transformers'), compiled, with the family's weights, ids and `mask` (default ones)."""
    ids, ones = _ids_and_mask(family)
    weights = _loss_weights(family)

    def loss(params):
        outputs = _named_outputs(_apply(module, params, ids, ones if mask is None else mask))
        return sum(jnp.sum(outputs[name] * w) for name, w in weights.items()), outputs

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_pytorch_model_and_params(family)[1])
    return outputs, flatten_dict(grads)


@functools.cache
def _ours(family: str):
    """Our module's `_outputs_and_gradients` (computed once, for every test that compares them)."""
    return _outputs_and_gradients(_modules(family)[0], family)


def _pytorch(family: str, mask=None):
    """The PyTorch model's outputs and gradients, as `_outputs_and_gradients` gives ours."""
    model, _ = _pytorch_model_and_params(family)
    ids, ones = _ids_and_mask(family)
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(ones if mask is None else mask).long()
    # transformers 5's CLIPTextModel is the text transformer itself (no `text_model` attribute); 4's wraps it.
    text = getattr(model, "text_model", model)(ids_t, mask_t, output_hidden_states=True)
    outputs = _named_outputs(text)
    if family in WITH_PROJECTION:
        outputs["text_embeds"] = model.text_projection(text.pooler_output)
    model.zero_grad()
    sum(torch.sum(outputs[name] * torch.from_numpy(w)) for name, w in _loss_weights(family).items()).backward()
    grads = pytorch_weights.pytorch_to_flax({name: p.grad.numpy() for name, p in model.named_parameters()},
                                            _shapes(_modules(family)[0]), "gradients",
                                            rename=weight_names.flax_name_and_layout_transformers)
    return {name: value.detach().numpy() for name, value in outputs.items()}, flatten_dict(grads)


def _max_diffs(ours: dict, theirs: dict) -> dict:
    assert ours.keys() == theirs.keys()
    return {name: float(np.max(np.abs(np.asarray(ours[name]) - np.asarray(theirs[name])))) for name in ours}


def _assert_gradients_close(ours: dict, theirs: dict, rtol: float):
    scale = max(float(np.max(np.abs(g))) for g in theirs.values())
    diffs = _max_diffs(ours, theirs)
    assert max(diffs.values()) <= rtol * scale, (scale, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])


# --- PyTorch, the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_pytorch(family):
    """Every hidden state (embeddings, each layer, the final norm's), the pooled state, the projection."""
    ours, theirs = _ours(family)[0], _pytorch(family)[0]
    diffs = _max_diffs(ours, theirs)
    assert max(diffs.values()) <= ATOL_PYTORCH, diffs
    assert len(ours) == TINY["num_hidden_layers"] + 3 + (family in WITH_PROJECTION)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_gradients_match_pytorch(family):
    _assert_gradients_close(_ours(family)[1], _pytorch(family)[1], GRAD_RTOL)


def test_padding_mask_matches_pytorch():
    """An attention mask with zeros after each caption's end (sdjax passes ones: the captions are padded and
    the pooled state does not see the padding, being causal)."""
    family = "sd2_gelu"
    ids, _ = _ids_and_mask(family)
    mask = (np.cumsum(ids == EOS, axis=1) - (ids == EOS) == 0).astype(np.int32)  # 1 up to the first eos
    assert 0 < mask.sum() < mask.size
    ours, theirs = _outputs_and_gradients(_modules(family)[0], family, mask), _pytorch(family, mask)
    diffs = _max_diffs(ours[0], theirs[0])
    assert max(diffs.values()) <= ATOL_PYTORCH, diffs
    _assert_gradients_close(ours[1], theirs[1], GRAD_RTOL)


def test_pooled_state_is_at_the_first_end_of_text_or_the_highest_id_under_the_legacy_id():
    states = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1)
    ids = jnp.array([[7, 9, 4, 9, 9], [7, 3, 9, 9, 9]])
    np.testing.assert_array_equal(_pool(states, ids, eos_token_id=9)[:, 0], [1, 7])  # first eos (pad = eos)
    ids = jnp.array([[7, 9, 4, 0, 0], [7, 3, 5, 9, 0]])
    np.testing.assert_array_equal(_pool(states, ids, eos_token_id=2)[:, 0], [1, 8])  # highest id


def test_output_index_0_is_the_last_hidden_state_and_hidden_states_are_asked_for():
    family = "sd1_quick_gelu_legacy_eos"
    ids, mask = _ids_and_mask(family)
    params = _pytorch_model_and_params(family)[1]
    output = jax.jit(lambda params: _apply(_modules(family)[0], params, ids, mask, False))(params)
    assert output[0] is output.last_hidden_state and output.hidden_states is None
    np.testing.assert_array_equal(output[0], _ours(family)[0]["last_hidden_state"])


def test_unsupported_activation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"hidden_act='relu'.*\['gelu', 'quick_gelu'\]"):
        CLIPTextEncoder(CLIPTextConfig(**TINY, hidden_act="relu"))


# --- the real configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name,component,module_class,count", [
    ("sd15", "text_encoder", CLIPTextEncoder, 123_060_480),  # CLIP ViT-L/14
    ("sd21", "text_encoder", CLIPTextEncoder, 340_387_840),  # OpenCLIP ViT-H/14
    ("sdxl", "text_encoder_2", CLIPTextEncoderWithProjection, 694_659_840),  # OpenCLIP ViT-bigG/14
])
def test_parameter_count_of_the_real_configs(config_name, component, module_class, count):
    from tiny import load_config_file
    values = load_config_file(config_name).model[component].to_dict()
    shapes = _shapes(module_class(CLIPTextConfig(**values)))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count
