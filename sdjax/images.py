"""Images as the trainer writes them: [-1, 1] model outputs -> uint8, grids of images, PNG files.

A leaf: the sampler, the VAE stage's reconstruction grids and DreamBooth's class images all write through it.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 255] uint8."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one [rows * H, columns * W, 3] image, row by row (black where N runs out)."""
    count, height, width, channels = images.shape
    rows = math.ceil(count / columns)
    padded = np.zeros((rows * columns, height, width, channels), np.uint8)
    padded[:count] = images
    return padded.reshape(rows, columns, height, width, channels).swapaxes(1, 2).reshape(
        rows * height, columns * width, channels)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes beside and renames: a reader (or another host writing the same file to a shared folder) never
    sees half a PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def save_images(folder: str, images: np.ndarray) -> list[str]:
    """One PNG per image: FOLDER/image_0000.png, ... (index = the image's seed offset)."""
    paths = [os.path.join(folder, f"image_{j:04d}.png") for j in range(len(images))]
    for path, image in zip(paths, images):
        save_png(path, image)
    return paths
