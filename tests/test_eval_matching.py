"""Table 4's template matching: a planted patch is found; the mosaic equals per-image match_template."""

import numpy as np
import pytest
from skimage.feature import match_template

from pipeline.evaluation.matching import (ImageMosaic, dark_blob_patterns, image_patch_patterns, match_basis_functions,
                                         matchable, matching_score, reference_scores)
from tests.test_eval_fixtures import no_holdout_data, tiny_generator  # noqa: F401 - fixtures


def _images(n=7, side=24, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, side, side, 3))


@pytest.mark.parametrize("colour", ["gray", "rgb"])
def test_planted_patch_is_located(colour):
    images = _images()
    rng = np.random.default_rng(5)
    patch = rng.uniform(-1, 1, size=(6, 5, 3))
    images[4, 10:16, 3:8] = patch * 0.5 + 0.1  # an affine copy: NCC is invariant to gain and offset
    result = match_basis_functions([np.moveaxis(patch, -1, 0)], images, colour=colour)
    assert result["scores"][0] == pytest.approx(1.0, abs=1e-6)
    assert result["locations"][0] == (4, 10, 3)
    assert result["scored"] == 1 and result["score"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("colour", ["gray", "rgb"])
def test_mosaic_equals_one_call_per_image(colour):
    images = _images(n=5, side=16, seed=1)
    template = np.random.default_rng(2).uniform(-1, 1, size=(7, 4, 3))
    result = ImageMosaic(images, colour).match(template)
    for i, image in enumerate(images):
        if colour == "gray":
            luma = np.array([0.299, 0.587, 0.114])
            response = match_template(image @ luma, template @ luma)
        else:
            response = match_template(image, template)[..., 0]
        assert result.per_image_best[i] == pytest.approx(response.max(), abs=1e-9)
        assert tuple(result.per_image_location[i]) == np.unravel_index(response.argmax(), response.shape)


def test_unmatchable_patterns_are_skipped():
    assert not matchable(np.zeros((3, 0, 0)), 16)
    assert not matchable(np.ones((3, 1, 1)), 16)
    assert not matchable(np.ones((3, 4, 4)), 16)  # constant: NCC undefined
    assert not matchable(np.random.rand(3, 20, 4), 16)  # taller than the images
    result = match_basis_functions([np.zeros((3, 0, 0)), np.random.rand(3, 3, 3)], _images(n=2, side=8))
    assert result["scores"][0] is None and result["skipped"] == 1 and result["scored"] == 1


def test_a_pattern_of_constant_luminance_is_skipped_in_gray_and_scored_in_rgb():
    # Two colours of equal luminance (0.299 R + 0.587 G + 0.114 B = 0.299) in a checkerboard: the pattern varies
    # in RGB, its gray template is constant, so gray NCC is 0 / 0 (match_template returned thousands for such a
    # patch before it was skipped).
    red, grey = np.array([1.0, 0.0, 0.0]), np.full(3, 0.299)
    checker = np.where((np.indices((5, 6)).sum(0) % 2 == 0)[None], red[:, None, None], grey[:, None, None])
    assert np.ptp(checker) > 0
    assert not matchable(checker, 16, "gray")
    assert matchable(checker, 16, "rgb")
    images = _images(n=3, side=16)
    gray = match_basis_functions([checker], images)
    assert gray["scores"] == [None] and gray["skipped"] == 1 and np.isnan(gray["score"])
    rgb = match_basis_functions([checker], images, colour="rgb")
    assert rgb["scored"] == 1 and -1.0 <= rgb["score"] <= 1.0


def test_matching_score_of_a_tiny_model(tiny_generator):
    import torch

    cfg, generator = tiny_generator
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    result = matching_score(generator, images, "conv8", latent_dim=cfg.model.latent_dim, num_latents=2,
                            units_per_latent=3)
    assert len(result["units"]) == 6 and result["scored"] + result["skipped"] == 6
    assert -1.0 <= result["score"] <= 1.0
    scored_channels = {u["channel"] for u in result["units"] if u["score"] is not None}
    assert result["channels"] == len(scored_channels) >= 1
    for unit in result["units"]:
        y0, y1, x0, x1 = unit["box"]
        assert 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32 and unit["activation"] > 0


def test_field_box_is_a_fixed_window_around_the_projective_field_centre():
    from pipeline.evaluation.matching import FIELD_CELLS, field_box

    # conv8 of a 32 px image: cells of 4 px; 2 cells = an 8 px window centred on (4y + 2, 4x + 2).
    assert FIELD_CELLS == 2.0
    assert field_box("conv8", 3, 4, 32) == (10, 18, 14, 22)
    # At the border the window keeps its size and shifts inside the image.
    assert field_box("conv8", 0, 7, 32) == (0, 8, 24, 32)
    assert field_box("conv16", 5, 5, 64, cells=3) == (16, 28, 16, 28)  # centre 22, side 12
    assert field_box("conv8", 2, 2, 32, cells=100) == (0, 32, 0, 32)


def test_field_crop_scores_equal_windows_of_the_full_basis_function(tiny_generator):
    import torch

    from pipeline.evaluation.basis import active_units, basis_functions, forward_with_masks
    from pipeline.evaluation.matching import field_box, units_for_matching

    cfg, generator = tiny_generator
    bases = units_for_matching(generator, "conv8", latent_dim=cfg.model.latent_dim, num_latents=2,
                               units_per_latent=3, seed=0, crop="field")
    z = torch.randn(2, cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    _, activations, masks = forward_with_masks(generator, z)
    full = basis_functions(generator, masks, active_units(activations, "conv8", top=3), crop=False)
    assert len(bases) == len(full) == 6
    for b, f in zip(bases, full):
        assert b.image.shape == (3, 8, 8)  # the same window for every unit
        y0, y1, x0, x1 = field_box("conv8", b.unit.y, b.unit.x, 32)
        assert b.box == (y0, y1, x0, x1)
        assert np.array_equal(b.image, f.image[:, y0:y1, x0:x1])
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    support = matching_score(generator, images, "conv8", latent_dim=cfg.model.latent_dim, num_latents=2,
                             units_per_latent=3)
    field = matching_score(generator, images, "conv8", latent_dim=cfg.model.latent_dim, num_latents=2,
                           units_per_latent=3, crop="field")
    assert field["crop"] == "field" and support["crop"] == "support"
    assert field["scored"] == 6 and -1.0 <= field["score"] <= 1.0
    assert all(tuple(u["box"])[1] - tuple(u["box"])[0] == 8 for u in field["units"])
    with pytest.raises(ValueError, match="crop must be one of support, field"):
        matching_score(generator, images, "conv8", latent_dim=cfg.model.latent_dim, crop="box")


def test_reference_patterns_sit_in_the_boxes_they_are_given():
    boxes = [(0, 6, 2, 10), (4, 9, 4, 9), (1, 4, 0, 3)]
    blobs = dark_blob_patterns(boxes)
    assert [b.shape for b in blobs] == [(3, 6, 8), (3, 5, 5), (3, 3, 3)]
    for blob in blobs:  # dark in the centre, equal in the three channels
        assert np.array_equal(blob[0], blob[1]) and np.array_equal(blob[0], blob[2])
        assert blob[0].min() == blob[0][blob.shape[1] // 2, blob.shape[2] // 2] < blob[0][0, 0] < 0
    holdout = np.arange(2 * 3 * 12 * 12, dtype=np.float64).reshape(2, 3, 12, 12)
    patches = image_patch_patterns(boxes, holdout)
    assert np.array_equal(patches[0], holdout[0, :, 0:6, 2:10])
    assert np.array_equal(patches[1], holdout[1, :, 4:9, 4:9])
    assert np.array_equal(patches[2], holdout[0, :, 1:4, 0:3])  # the boxes cycle over the images
    with pytest.raises(ValueError, match="at least one image"):
        image_patch_patterns(boxes, holdout[:0])


def test_reference_scores_find_a_planted_blob_and_their_own_patches():
    boxes = [(2, 10, 3, 11), (5, 11, 5, 11)]
    images = _images(n=4, side=16, seed=3)
    blob = dark_blob_patterns([boxes[0]])[0]
    images[2, 4:12, 6:14] = np.moveaxis(blob, 0, -1) * 0.7 + 0.2  # an affine copy of the first box's blob
    # Patches cut from the very images they are matched against score 1; a blob planted in one image does too,
    # so the blob reference (a mean over both boxes) is at least halfway there.
    scores = reference_scores(boxes, images, np.moveaxis(images, -1, 1))
    assert scores["holdout"] == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < scores["blob"] < 1.0
    assert set(reference_scores(boxes, images, None)) == {"blob"}
    other = reference_scores(boxes, images, np.moveaxis(_images(n=4, side=16, seed=9), -1, 1))
    assert other["holdout"] < 0.99  # unrelated noise patches do not match exactly


def test_matching_score_reports_references_in_the_scored_boxes(tiny_generator):
    import torch

    cfg, generator = tiny_generator
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    kwargs = dict(latent_dim=cfg.model.latent_dim, num_latents=2, units_per_latent=3)
    assert "reference" not in matching_score(generator, images, "conv8", **kwargs)
    result = matching_score(generator, images, "conv8", references=True, holdout_pm1=images[:2], **kwargs)
    boxes = [tuple(u["box"]) for u in result["units"] if u["score"] is not None]
    images_hwc = np.moveaxis(images.numpy().astype(np.float64), 1, -1)
    assert result["reference"] == pytest.approx(reference_scores(boxes, images_hwc, images[:2].numpy()))
    assert set(result["reference"]) == {"blob", "holdout"}


def test_evaluate_matching_without_a_holdout_split_reports_the_blob_reference_only(tmp_path, tiny_generator,
                                                                                   no_holdout_data):
    import dataclasses
    import math

    from pipeline.evaluation import evaluate

    cfg, generator = tiny_generator
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, matching_images=8))
    metrics, _ = evaluate(cfg, generator, no_holdout_data, ["matching"], out_dir=tmp_path / "eval", progress=False)
    assert math.isfinite(metrics["matching_reference_blob_conv8"])
    assert "matching_reference_holdout_conv8" not in metrics
