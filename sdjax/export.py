"""`sdjax export`: a run's checkpoint -> a diffusers folder for PyTorch (or Flax) pipelines.

    OUT/model_index.json  the pipeline and its components; no safety checker, no feature extractor
    OUT/unet/             config.json + diffusion_pytorch_model.safetensors  (flax: diffusion_flax_model.msgpack)
    OUT/vae/              config.json + diffusion_pytorch_model.safetensors  (flax: diffusion_flax_model.msgpack)
    OUT/text_encoder/     config.json + model.safetensors                    (flax: flax_model.msgpack)
    OUT/tokenizer/        the run's CLIP tokenizer
    OUT/scheduler/        scheduler_config.json: PNDM (Stable Diffusion's own) over the run's `diffusion.*`
    SDXL runs also: OUT/text_encoder_2/ (CLIPTextModelWithProjection) and OUT/tokenizer_2/

`StableDiffusionPipeline.from_pretrained(OUT)` loads the PyTorch folder (SDXL: `StableDiffusionXLPipeline`).
A LoRA run (`lora.rank > 0`) exports OUT/pytorch_lora_weights.safetensors instead, for
`pipe.load_lora_weights(OUT)` (see `export`), or with `--merge_lora` the folder above with the adapters merged
into the weights. No torch and no accelerator are needed: weights go from the checkpoint to numpy to
safetensors. Only params are read (no optimizer state),
and one component is converted and written at a time, its Flax arrays freed as they are converted: for SD 1.5
the peak is the params (~4.3 GB fp32) plus one converted UNet (~3.4 GB).
The folder is written as OUT.partial and renamed to OUT at the end, so an OUT folder is always complete.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import ml_collections
from flax import serialization
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from sdjax import checkpoint as checkpoint_lib
from sdjax import lora as lora_lib
from sdjax import models as models_lib
from sdjax.models import layer_stacks, pytorch_export
from sdjax.models.tokenizer import save_tokenizer

FORMATS = ("pytorch", "flax")

# component -> (library, class) per format; `model_index.json` lists them, `from_pretrained` instantiates them.
_CLASSES = {
    "pytorch": {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                "scheduler": ("diffusers", "PNDMScheduler"),
                "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                "tokenizer_2": ("transformers", "CLIPTokenizer")},
    "flax": {"unet": ("diffusers", "FlaxUNet2DConditionModel"), "vae": ("diffusers", "FlaxAutoencoderKL"),
             "text_encoder": ("transformers", "FlaxCLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
             "scheduler": ("diffusers", "FlaxPNDMScheduler"),
             "text_encoder_2": ("transformers", "FlaxCLIPTextModelWithProjection"),
             "tokenizer_2": ("transformers", "CLIPTokenizer")},
}
_SDXL_ONLY = ("text_encoder_2", "tokenizer_2")
_PIPELINES = {("pytorch", False): "StableDiffusionPipeline", ("flax", False): "FlaxStableDiffusionPipeline",
              ("pytorch", True): "StableDiffusionXLPipeline", ("flax", True): "FlaxStableDiffusionXLPipeline"}
_WEIGHT_FILES = {
    ("pytorch", "diffusers"): "diffusion_pytorch_model.safetensors", ("pytorch", "transformers"): "model.safetensors",
    ("flax", "diffusers"): "diffusion_flax_model.msgpack", ("flax", "transformers"): "flax_model.msgpack",
}


class ExportError(ValueError):
    """The export cannot be written as asked (bad format, output folder already there)."""


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for


@dataclasses.dataclass
class ExportResult:
    out: str
    step: int
    format: str
    ema: bool  # whether the UNet weights (LoRA: the adapters) are the run's EMA weights
    lora_weights: str | None = None  # OUT/pytorch_lora_weights.safetensors of a LoRA run (not merged)
    pipeline: bool = True  # whether OUT holds a whole diffusers pipeline folder


def model_index(fmt: str, sdxl: bool = False) -> dict:
    """The pipeline's components. The Flax pipeline has no `requires_safety_checker` and wants the two absent
    components passed: `FlaxStableDiffusionPipeline.from_pretrained(OUT, safety_checker=None,
    feature_extractor=None)`. SDXL's pipelines have no safety checker; the PyTorch one is told to encode an
    empty negative prompt as sdjax's sampler does (and as the caption dropout trained it), not to zero it."""
    index = {
        "_class_name": _PIPELINES[fmt, sdxl],
        **pytorch_export.diffusers_version(),
        **{name: list(library_and_class) for name, library_and_class in _CLASSES[fmt].items()
           if sdxl or name not in _SDXL_ONLY},
    }
    if sdxl:
        if fmt == "pytorch":
            index.update(image_encoder=[None, None], feature_extractor=[None, None],
                         force_zeros_for_empty_prompt=False)
        return index
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    if fmt == "pytorch":
        index["requires_safety_checker"] = False  # else diffusers warns that the safety checker is off
    return index


def scheduler_config(config: ml_collections.ConfigDict, class_name: str) -> dict:
    """Stable Diffusion's PNDM settings (as in its scheduler_config.json) over the betas the run trained with."""
    d = config.diffusion
    return {"_class_name": class_name, **pytorch_export.diffusers_version(),
            "num_train_timesteps": d.num_train_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
            "beta_schedule": d.beta_schedule, "prediction_type": d.prediction_type, "trained_betas": None,
            "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}


def _write_json(path: str, values: dict) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_weights(folder: str, params, fmt: str, library: str) -> None:
    """Writes one component's weights; `params` must be the only reference left to its arrays."""
    path = os.path.join(folder, _WEIGHT_FILES[fmt, library])
    if fmt == "flax":
        with open(path, "wb") as f:
            f.write(serialization.to_bytes(params))
        return
    flat = flatten_dict(params)
    del params  # from here on `flat` holds the only references, and conversion frees them one by one
    state = pytorch_export.flax_to_pytorch_state(flat, library, where=folder)
    save_file(state, path, metadata={"format": "pt"})  # transformers refuses safetensors without "format"


def export(workdir: str, out: str, step: int | None = None, fmt: str = "pytorch", use_ema: bool = True,
           merge_lora: bool = False):
    """Writes the checkpoint at `step` (default: the newest complete one) of the run in `workdir` to `out`.

    A LoRA run gives OUT/pytorch_lora_weights.safetensors, for `pipe.load_lora_weights(OUT)` on the base
    pipeline (`model.pretrained`); when the run's base was not a pretrained folder (random init, as in
    configs/demo_lora.py), that base is written beside it as a pipeline folder, so
    `StableDiffusionPipeline.from_pretrained(OUT).load_lora_weights(OUT)` works. `merge_lora`: a full
    pipeline folder with the adapters folded into the weights instead."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: expected one of {list(FORMATS)}.")
    if os.path.exists(out):
        raise ExportError(f"{out} already exists: export writes a new folder.")
    loaded = checkpoint_lib.load_inference_checkpoint(workdir, step, use_ema)
    if loaded.config.train.get("stage", "unet") == "vae":
        return export_vae(loaded, workdir, out, fmt)
    # diffusers' and transformers' names: a run with model.scan_layers has its stacks unrolled here.
    config, params = loaded.config, layer_stacks.unstack_params(loaded.params)
    adapters = params.pop(lora_lib.COMPONENT, None)
    if adapters is not None and merge_lora:
        params = lora_lib.merge({**params, lora_lib.COMPONENT: adapters}, lora_lib.scale(config.lora))
        adapters = None
    if adapters is not None and fmt != "pytorch":
        raise ExportError(f"--format={fmt}: a LoRA run exports its adapters for PyTorch diffusers only; add "
                          f"--merge_lora for a {fmt} pipeline folder with the adapters merged in.")
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # a previous export that was cut off
    os.makedirs(partial)
    result = ExportResult(out=out, step=loaded.step, format=fmt, ema=loaded.ema)
    if adapters is not None:
        state, metadata = pytorch_export.lora_to_pytorch_state(adapters, params, config.lora.rank,
                                                               lora_lib.alpha(config.lora))
        save_file(state, os.path.join(partial, LORA_WEIGHTS), metadata=metadata)
        result.lora_weights = os.path.join(out, LORA_WEIGHTS)
        result.pipeline = not config.model.pretrained
    if result.pipeline:
        _write_pipeline(partial, config, params, fmt)
    os.rename(partial, out)
    return result


def _write_pipeline(partial: str, config: ml_collections.ConfigDict, params: dict, fmt: str) -> None:
    """The diffusers pipeline folder of `params` in `partial` (which it empties of params as it writes)."""
    # The modules (no params) give each component's config; the tokenizer is the run's own.
    models = models_lib.build_models(config)
    classes = _CLASSES[fmt]
    for name in ("unet", "vae"):
        folder = os.path.join(partial, name)
        os.makedirs(folder)
        _write_json(os.path.join(folder, "config.json"),
                    pytorch_export.diffusers_model_config(getattr(models, name), classes[name][1]))
        _write_weights(folder, params.pop(name), fmt, "diffusers")
    text_encoders = [("text_encoder", models.text_encoder_config, "tokenizer")]
    tokenizers = {"tokenizer": models.tokenizer}
    if models.sdxl:
        text_encoders.append((models_lib.TEXT_ENCODER_2, models.text_encoder_2_config, "tokenizer_2"))
        tokenizers = {"tokenizer": models.tokenizer.first, "tokenizer_2": models.tokenizer.second}
    for name, text_config, tokenizer_name in text_encoders:
        folder = os.path.join(partial, name)
        text_config = copy.deepcopy(text_config)
        text_config.architectures = [classes[name][1]]
        text_config.save_pretrained(folder)
        _write_weights(folder, params.pop(name), fmt, "transformers")
        save_tokenizer(tokenizers[tokenizer_name], os.path.join(partial, tokenizer_name))
    os.makedirs(os.path.join(partial, "scheduler"))
    _write_json(os.path.join(partial, "scheduler", "scheduler_config.json"),
                scheduler_config(config, classes["scheduler"][1]))
    _write_json(os.path.join(partial, "model_index.json"), model_index(fmt, models.sdxl))


def export_vae(loaded: checkpoint_lib.InferenceCheckpoint, workdir: str, out: str, fmt: str) -> ExportResult:
    """A VAE run's checkpoint (`sdjax train-vae`) -> a diffusers VAE folder: OUT/config.json, with the run's
    latent scaling factor, and OUT/diffusion_pytorch_model.safetensors (flax: .msgpack), which
    `AutoencoderKL.from_pretrained(OUT)` loads and `model.vae_from=OUT` takes."""
    from sdjax import vae as vae_lib
    if not vae_lib.is_finished(workdir):
        raise ExportError(f"{workdir} has no {vae_lib.SCALING_FILE}: the VAE run has not finished; run its "
                          "`sdjax train-vae` command again to finish it.")
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    with open(os.path.join(workdir, vae_lib.SCALING_FILE)) as f:
        config.model.vae.scaling_factor = json.load(f)["scaling_factor"]
    vae = models_lib.build_models(config).vae
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    _write_json(os.path.join(partial, "config.json"),
                pytorch_export.diffusers_model_config(vae, _CLASSES[fmt]["vae"][1]))
    _write_weights(partial, loaded.params.pop("vae"), fmt, "diffusers")
    os.rename(partial, out)
    return ExportResult(out=out, step=loaded.step, format=fmt, ema=loaded.ema)
