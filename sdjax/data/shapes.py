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


# Where scenes are drawn: the centre within CENTER_RANGE of the image centre, the half-size in RADIUS_RANGE.
CENTER_RANGE = 0.12
RADIUS_RANGE = (0.22, 0.32)
# Every shape lies inside the square [MARGIN, 1 - MARGIN]^2 (circle and triangle reach out to the largest
# radius from the farthest centre): what is outside it is always background.
MARGIN = 0.5 - CENTER_RANGE - RADIUS_RANGE[1]


def scene_for(seed: int, index: int, held_out: frozenset[str] = frozenset()) -> ShapeScene:
    """Example `index` of the dataset `seed`; a scene whose caption is in `held_out` is drawn again (from the
    same generator), so those captions never occur and the other examples stay as they were."""
    rng = np.random.default_rng([seed, index])
    while True:
        foreground, background = rng.choice(list(COLOURS), size=2, replace=False)
        radius = float(rng.uniform(*RADIUS_RANGE))
        center_x, center_y = (float(v) for v in rng.uniform(0.5 - CENTER_RANGE, 0.5 + CENTER_RANGE, size=2))
        scene = ShapeScene(shape=str(rng.choice(SHAPES)), foreground=str(foreground), background=str(background),
                           center_x=center_x, center_y=center_y, radius=radius)
        if scene.caption not in held_out:
            return scene


def scene_from_caption(caption: str) -> ShapeScene:
    """The centred, mid-sized scene a caption "a {colour} {shape} on a {colour} background" asks for."""
    words = caption.split()
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background"
            or words[1] not in COLOURS or words[5] not in COLOURS or words[2] not in SHAPES or words[1] == words[5]):
        raise ValueError(f"{caption!r} is not a demo caption: expected 'a COLOUR SHAPE on a COLOUR background' with "
                         f"two different colours of {list(COLOURS)} and a shape of {list(SHAPES)}")
    return ShapeScene(shape=words[2], foreground=words[1], background=words[5], center_x=0.5, center_y=0.5,
                      radius=float(np.mean(RADIUS_RANGE)))


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


# --- scoring a generated image against the caption it was asked for ---------------------------------


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """Each pixel's nearest colour of COLOURS (RGB distance), as an index into list(COLOURS): int [H, W]."""
    palette = np.asarray(list(COLOURS.values()), np.float32)
    distances = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)
    return np.argmin(distances, axis=-1)


def margin_mask(size: int) -> np.ndarray:
    """Pixels (by their centre) outside [MARGIN, 1 - MARGIN]^2, where no scene has any of its shape."""
    coords = (np.arange(size) + 0.5) / size
    outside = (coords < MARGIN) | (coords > 1 - MARGIN)
    return outside[:, None] | outside[None, :]


def _candidate_masks(size: int) -> tuple[np.ndarray, list[str]]:
    """Masks of every shape on a grid of the centres and sizes scenes are drawn with: [N, size * size]. The grid
    is fine enough that every one of 300 rendered scenes is recognised at 16 px (5 centres x 4 sizes: 41 not)."""
    masks, names = [], []
    centres = np.linspace(0.5 - CENTER_RANGE, 0.5 + CENTER_RANGE, 13)
    for shape in SHAPES:
        for radius in np.linspace(*RADIUS_RANGE, 8):
            for cx in centres:
                for cy in centres:
                    scene = ShapeScene(shape, "white", "black", float(cx), float(cy), float(radius))
                    masks.append(shape_mask(scene, size, supersample=2).reshape(-1))
                    names.append(shape)
    return np.stack(masks), names


_CANDIDATES: dict[int, tuple[np.ndarray, list[str]]] = {}


def score(image: np.ndarray, caption: str) -> dict[str, bool | float]:
    """Whether a generated uint8 image [H, W, 3] shows what `caption` asks for, where the generator puts it:
      background  the margin (never covered by a shape) is mostly the caption's background colour;
      foreground  inside it, the commonest colour other than the background is the caption's foreground;
      shape       the pixels of that colour overlap a `shape_mask` of the caption's shape (at some centre and
                  size the generator draws) better than any mask of another shape (intersection over union);
    and how well it is drawn:
      shape_iou   that best overlap with a mask of the caption's shape (1: exactly a shape the generator
                  draws; 0 without a foreground). `shape` is a contest between three shapes, which a square
                  drawn with pinched sides still wins; `shape_iou` tells such a square from a clean one.
    Colours are each pixel's nearest of COLOURS."""
    wanted = scene_from_caption(caption)
    names = list(COLOURS)
    size = image.shape[0]
    labels = nearest_colours(image)
    margin = margin_mask(size)
    background = np.bincount(labels[margin], minlength=len(names)).argmax()
    inner = labels[~margin]
    counts = np.bincount(inner[inner != background], minlength=len(names))
    foreground = counts.argmax() if counts.sum() else None
    result = {"background": names[background] == wanted.background,
              "foreground": foreground is not None and names[foreground] == wanted.foreground,
              "shape": False, "shape_iou": 0.0}
    if foreground is not None:
        if size not in _CANDIDATES:
            _CANDIDATES[size] = _candidate_masks(size)
        masks, shapes = _CANDIDATES[size]
        drawn = (labels == foreground).reshape(-1).astype(np.float32)
        intersection = masks @ drawn
        iou = intersection / (masks.sum(axis=1) + drawn.sum() - intersection)
        result["shape"] = shapes[int(np.argmax(iou))] == wanted.shape
        result["shape_iou"] = float(iou[np.asarray(shapes) == wanted.shape].max())
    return result


class ShapesSource:
    """A random-access source (grain's `RandomAccessDataSource` protocol) of {image, caption} records;
    captions in `held_out` never occur."""

    def __init__(self, num_examples: int, resolution: int, seed: int, held_out=()):
        self.num_examples, self.resolution, self.seed = num_examples, resolution, seed
        self.held_out = frozenset(held_out)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        scene = scene_for(self.seed, int(index), self.held_out)
        return {"image": render(scene, self.resolution), "caption": scene.caption}

    def __repr__(self) -> str:
        return f"ShapesSource(num_examples={self.num_examples}, resolution={self.resolution}, seed={self.seed})"
