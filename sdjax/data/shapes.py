"""The built-in captioned-shapes dataset: "a red circle on a blue background", generated, no download.

Every example is a pure function of (seed, index), so the dataset needs no storage, is identical on every
host, and the generator can also score a generated image against the caption it was asked for.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class ShapeScene:
    shape: str
    foreground: str
    background: str
    # Centre and half-size as fractions of the image side.
    center_x: float
    center_y: float
    radius: float

    @property
    def caption(self) -> str:
        return f"a {self.foreground} {self.shape} on a {self.background} background"


def scene_for(seed: int, index: int) -> ShapeScene:
    rng = np.random.default_rng([seed, index])
    foreground, background = rng.choice(list(COLOURS), size=2, replace=False)
    radius = float(rng.uniform(0.22, 0.32))
    center_x, center_y = (float(v) for v in rng.uniform(0.5 - 0.12, 0.5 + 0.12, size=2))
    return ShapeScene(shape=str(rng.choice(SHAPES)), foreground=str(foreground), background=str(background),
                      center_x=center_x, center_y=center_y, radius=radius)


def shape_mask(scene: ShapeScene, size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, [size, size] float32 (anti-aliased)."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    dx, dy, r = x - scene.center_x, y - scene.center_y, scene.radius
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    else:  # upward triangle: apex at the top, base at the bottom
        top, bottom = -r, r * 0.8
        half_width = r * (dy - top) / (bottom - top)
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def render(scene: ShapeScene, size: int) -> np.ndarray:
    """The scene as an RGB uint8 image [size, size, 3]."""
    mask = shape_mask(scene, size)[..., None]
    fg = np.asarray(COLOURS[scene.foreground], np.float32)
    bg = np.asarray(COLOURS[scene.background], np.float32)
    return np.round(mask * fg + (1 - mask) * bg).astype(np.uint8)


class ShapesSource:
    """A random-access source (grain's `RandomAccessDataSource` protocol) of {image, caption} records."""

    def __init__(self, num_examples: int, resolution: int, seed: int):
        self.num_examples, self.resolution, self.seed = num_examples, resolution, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        scene = scene_for(self.seed, int(index))
        return {"image": render(scene, self.resolution), "caption": scene.caption}

    def __repr__(self) -> str:
        return f"ShapesSource(num_examples={self.num_examples}, resolution={self.resolution}, seed={self.seed})"
