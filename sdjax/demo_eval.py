"""`sdjax eval-demo`: does a demo run draw what its prompts say?

Each held-out prompt (`data.demo_held_out`: captions the train split never showed; else `sample.prompts`) is
sampled `num_images` times with the run's sampling settings, and every image is scored by the dataset's own
generator (`sdjax/data/shapes.py: score`): background colour in the margin where no shape ever reaches,
foreground colour inside it, and the shape that the foreground pixels overlap best. The accuracy of each
attribute is the fraction of images that have it right; `all` counts images with all three right.
Chance levels: background 1/6, foreground 1/5 (given the background), shape 1/3. `shape_iou` (mean
intersection over union of the drawn shape with the best-fitting shape the generator would draw) says how
cleanly the shapes are drawn, which the three-way `shape` contest does not.

Beside each held-out prompt, its seen counterpart (`seen_counterpart`: the same words but another
background, a caption the train split does show) is sampled and scored the same way, under `"seen"`: the
difference between the two is what the run draws for captions it was trained on and what it makes of new
combinations of the same words.

A VAE run (`sdjax train-vae`, the demo's first stage) has nothing to sample: for it, `num_images` scenes of
the eval split, each drawn as every shape, are reconstructed and scored the same way, also per shape (under
`"per_shape"`): what the latents lose, the UNet stage cannot draw (a VAE that rounds the squares' corners
caps the UNet's squares).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from sdjax import checkpoint as checkpoint_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import sample as sample_lib
from sdjax import vae as vae_lib
from sdjax.data import shapes
from sdjax.data.preprocess import to_pixels
from sdjax.images import image_grid, save_png, to_uint8

ATTRIBUTES = ("background", "foreground", "shape")


class NotADemoRunError(ValueError):
    """The run did not train on the demo dataset, whose generator is what scores the images."""


def held_out_prompts(config: ml_collections.ConfigDict) -> list[str]:
    return list(config.data.get("demo_held_out") or config.sample.prompts)


def seen_counterpart(caption: str, held_out) -> str:
    """The caption with `caption`'s foreground colour and shape on the next background colour (in
    shapes.COLOURS' order) that makes a caption not in `held_out`, i.e. one the train split shows."""
    scene = shapes.scene_from_caption(caption)
    colours = list(shapes.COLOURS)
    start = colours.index(scene.background)
    for colour in colours[start + 1:] + colours[:start]:
        seen = dataclasses.replace(scene, background=colour).caption
        if colour != scene.foreground and seen not in held_out:
            return seen
    raise ValueError(f"every background for {caption!r} is held out: nothing seen to compare it with")


def accuracy(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Per attribute (and `all`), the fraction of `images` (image i asked for prompts[i]) that show it; and
    `shape_iou`, the mean overlap of the drawn shapes with the asked-for shape (see shapes.score)."""
    scores = [shapes.score(image, prompt) for image, prompt in zip(images, prompts)]
    result = {name: float(np.mean([s[name] for s in scores])) for name in ATTRIBUTES}
    result["all"] = float(np.mean([all(s[name] for name in ATTRIBUTES) for s in scores]))
    result["shape_iou"] = float(np.mean([s["shape_iou"] for s in scores]))
    return result


def reconstruction_scenes(seed: int, num_images: int) -> list[shapes.ShapeScene]:
    """`num_images` scenes of each shape, in shapes.SHAPES' order: the first `num_images` scenes of the demo
    dataset `seed`, each drawn as every shape (same colours, centre and size)."""
    scenes = [shapes.scene_for(seed, index) for index in range(num_images)]
    return [dataclasses.replace(scene, shape=shape) for shape in shapes.SHAPES for scene in scenes]


def score_reconstructions(reconstruct, resolution: int, num_images: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(accuracy per attribute, overall and per shape, the reconstructions) of `reconstruct(uint8 images
    [N, H, W, 3]) -> uint8 images` on `reconstruction_scenes`."""
    scenes = reconstruction_scenes(seed, num_images)
    images = np.asarray(reconstruct(np.stack([shapes.render(scene, resolution) for scene in scenes])))
    captions = [scene.caption for scene in scenes]
    rows = [slice(i * num_images, (i + 1) * num_images) for i in range(len(shapes.SHAPES))]
    per_shape = {shape: accuracy(images[row], captions[row]) for shape, row in zip(shapes.SHAPES, rows)}
    return {**accuracy(images, captions), "images": len(scenes), "per_shape": per_shape}, images


def evaluate_vae(config: ml_collections.ConfigDict, params: dict, step: int, num_images: int, seed: int,
                 out: str | None) -> dict:
    """The report of a VAE run: its reconstructions of generated scenes, scored (see module doc)."""
    models = models_lib.build_models(config)
    reconstruct_pixels = jax.jit(lambda params, pixels: vae_lib.reconstruct(models, params, pixels))

    def reconstruct(images):
        return to_uint8(reconstruct_pixels(params, to_pixels(images)))

    # the eval split's scenes (its seed is the train split's + 1: data/sources.py); --seed picks others
    scene_seed = config.data.demo_seed + 1 + seed
    report, images = score_reconstructions(reconstruct, config.data.resolution, num_images, scene_seed)
    if out and jax.process_index() == 0:  # rows: circles, squares, triangles
        save_png(out, image_grid(images, num_images))
    return {"step": step, "reconstructions": True, **report}


def evaluate(workdir: str, step: int | None = None, num_images: int = 8, scheduler: str | None = None,
             num_steps: int | None = None, guidance: float | None = None, seed: int = 0,
             out: str | None = None, use_ema: bool = True) -> dict:
    if num_images < 1:
        raise ValueError(f"--num-images={num_images}: expected at least 1")
    config, params, step = checkpoint_lib.load_params_for_inference(workdir, step, use_ema=use_ema)
    if config.data.source != "demo":
        raise NotADemoRunError(f"{workdir} trained on data.source={config.data.source!r}: eval-demo scores runs "
                               "on the built-in demo dataset (data.source=demo)")
    if config.train.get("stage", "unet") == "vae":
        return evaluate_vae(config, params, step, num_images, seed, out)
    prompts = held_out_prompts(config)
    seen = [seen_counterpart(prompt, frozenset(prompts)) for prompt in prompts]
    scheduler = scheduler or config.sample.scheduler
    num_steps = num_steps or config.sample.steps
    guidance = config.sample.guidance if guidance is None else guidance
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked; sampling splits images over all devices
    config.mesh.data, config.mesh.fsdp = -1, 1
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config)
    sampler = sample_lib.Sampler(models, config, mesh, scheduler, num_steps)
    asked = sample_lib.repeat_prompts(prompts + seen, num_images)  # one sampling pass for both sets
    images = sampler(jax.device_put(params, mesh_lib.replicated(mesh)), asked, config.sample.negative_prompt,
                     seed, guidance)
    if out and jax.process_index() == 0:  # rows: the held-out prompts, then their seen counterparts
        save_png(out, image_grid(images, num_images))
    per_prompt = {prompt: accuracy(images[i * num_images:(i + 1) * num_images], [prompt] * num_images)
                  for i, prompt in enumerate(prompts + seen)}
    held = len(prompts) * num_images
    return {"step": step, **accuracy(images[:held], asked[:held]), "images": held, "prompts": len(prompts),
            "seen": {**accuracy(images[held:], asked[held:]), "prompts": seen},
            "scheduler": scheduler, "steps": num_steps, "guidance": guidance,
            "ema": bool(use_ema and config.train.ema_decay > 0), "per_prompt": per_prompt}
