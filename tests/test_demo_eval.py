"""The demo dataset's held-out captions and the scorer `sdjax eval-demo` uses: it recognises what the generator
draws, and only that."""

import dataclasses

import numpy as np
import pytest

from sdjax import demo_eval
from sdjax.data import shapes

HELD_OUT = ("a red circle on a blue background", "a yellow square on a black background")


def test_held_out_captions_never_occur_in_the_train_split_and_others_are_unchanged():
    source = shapes.ShapesSource(num_examples=2000, resolution=16, seed=0, held_out=HELD_OUT)
    everything = shapes.ShapesSource(num_examples=2000, resolution=16, seed=0)
    captions = [source[i]["caption"] for i in range(len(source))]
    assert not set(captions) & set(HELD_OUT)
    original = [everything[i]["caption"] for i in range(len(everything))]
    assert set(original) & set(HELD_OUT)  # the generator does draw them when asked to keep them
    assert [c for c, o in zip(captions, original) if o not in HELD_OUT] == [o for o in original if o not in HELD_OUT]


@pytest.mark.parametrize("resolution,least_iou", [(16, 0.8), (32, 0.9)])
def test_scorer_accepts_every_generated_scene_for_its_own_caption(resolution, least_iou):
    for index in range(60):
        scene = shapes.scene_for(3, index)
        scores = shapes.score(shapes.render(scene, resolution), scene.caption)
        assert scores | {"shape_iou": None} == {
            "background": True, "foreground": True, "shape": True, "shape_iou": None}, (index, scene)
        # the candidate masks' grid of centres and sizes is coarser than the generator's: close, not exact
        assert least_iou <= scores["shape_iou"] <= 1, (index, scene)


def test_shape_iou_tells_a_pinched_square_from_a_clean_one():
    """What guidance 7.5 drew on the demo (docs/demo.md): squares with concave sides, which still win the
    three-way shape contest; their overlap with the nearest square is what shows it."""
    scene = shapes.ShapeScene("square", "red", "blue", 0.5, 0.5, 0.3)
    clean = shapes.render(scene, 32)
    rows, cols = np.nonzero(shapes.shape_mask(scene, 32) > 0.5)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    middle_rows = slice((top + bottom) // 2 - 3, (top + bottom) // 2 + 4)
    middle_cols = slice((left + right) // 2 - 3, (left + right) // 2 + 4)
    pinched = clean.copy()  # two pixels taken out of the middle of each side
    for edge in (top, top + 1, bottom, bottom - 1):
        pinched[edge, middle_cols] = clean[0, 0]
    for edge in (left, left + 1, right, right - 1):
        pinched[middle_rows, edge] = clean[0, 0]
    caption = "a red square on a blue background"
    clean_scores, pinched_scores = shapes.score(clean, caption), shapes.score(pinched, caption)
    assert clean_scores["shape"] and pinched_scores["shape"]  # both are squares to the contest
    assert pinched_scores["shape_iou"] < clean_scores["shape_iou"] - 0.05


def test_scorer_rejects_each_wrong_attribute():
    scene = shapes.ShapeScene("square", "red", "blue", 0.45, 0.55, 0.3)
    image = shapes.render(scene, 32)
    right_shape = shapes.score(image, "a red square on a blue background")["shape_iou"]
    assert shapes.score(image, "a green square on a blue background") == {
        "background": True, "foreground": False, "shape": True, "shape_iou": right_shape}
    assert shapes.score(image, "a red square on a white background") == {
        "background": False, "foreground": True, "shape": True, "shape_iou": right_shape}
    wrong_shape = shapes.score(image, "a red circle on a blue background")
    assert wrong_shape["shape"] is False and wrong_shape["shape_iou"] < right_shape
    assert shapes.score(np.zeros((32, 32, 3), np.uint8), "a red circle on a blue background") == {
        "background": False, "foreground": False, "shape": False, "shape_iou": 0.0}


def test_accuracy_is_the_fraction_of_images_right_per_attribute():
    right = shapes.render(shapes.scene_from_caption(HELD_OUT[0]), 32)
    wrong_colour = shapes.render(shapes.scene_from_caption("a green circle on a blue background"), 32)
    result = demo_eval.accuracy(np.stack([right, wrong_colour]), [HELD_OUT[0]] * 2)
    iou = shapes.score(right, HELD_OUT[0])["shape_iou"]
    assert result == {"background": 1.0, "foreground": 0.5, "shape": 1.0, "all": 0.5, "shape_iou": iou}


def test_a_caption_that_is_not_a_demo_caption_is_refused():
    with pytest.raises(ValueError, match="not a demo caption"):
        shapes.scene_from_caption("a purple circle on a blue background")


def test_seen_counterpart_keeps_the_words_and_changes_the_background_to_a_trained_caption():
    held_out = {"a red circle on a blue background", "a red circle on a yellow background"}
    # COLOURS order: red, green, blue, yellow, white, black: after blue comes yellow (held out), then white.
    assert demo_eval.seen_counterpart("a red circle on a blue background", held_out) == \
        "a red circle on a white background"
    # wraps around the colours and skips the foreground colour
    assert demo_eval.seen_counterpart("a green square on a black background", set()) == \
        "a green square on a red background"
    assert demo_eval.seen_counterpart("a red square on a black background", set()) == \
        "a red square on a green background"
    everything = {f"a red circle on a {c} background" for c in shapes.COLOURS if c != "red"}
    with pytest.raises(ValueError, match="every background"):
        demo_eval.seen_counterpart("a red circle on a blue background", everything)


def test_reconstruction_scores_count_what_the_reconstruction_keeps_per_shape():
    def identity(images):
        return images

    report, images = demo_eval.score_reconstructions(identity, 32, num_images=4)
    assert report["images"] == 12 and images.shape == (12, 32, 32, 3)
    assert report["all"] == 1.0 and all(r["all"] == 1.0 for r in report["per_shape"].values())

    def squares_as_circles(images):  # a VAE that rounds every square into a circle of the same colours
        scenes = demo_eval.reconstruction_scenes(0, 4)
        return np.stack([shapes.render(dataclasses.replace(s, shape="circle") if s.shape == "square" else s, 32)
                         for s in scenes])

    report, _ = demo_eval.score_reconstructions(squares_as_circles, 32, num_images=4)
    assert report["per_shape"]["square"] | {"shape_iou": None} == {
        "background": 1.0, "foreground": 1.0, "shape": 0.0, "all": 0.0, "shape_iou": None}
    assert report["per_shape"]["circle"]["shape"] == report["per_shape"]["triangle"]["shape"] == 1.0
    assert report["shape"] == pytest.approx(2 / 3)
