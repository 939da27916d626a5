"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018) and its `evaluate` metric."""

import json

import numpy as np
import pytest
import torch

from pipeline.evaluation.swd import (
    _blur,
    laplacian_pyramid,
    pyr_down,
    pyr_up,
    pyramid_resolutions,
    sliced_wasserstein_distance,
)
from tests.test_eval_fixtures import demo_data, no_holdout_data, tiny_generator  # noqa: F401 - fixtures


def _scenes(n, size=32, seed=0):
    """Images in [-1, 1] with structure at several scales: 1-3 flat coloured rectangles and mild noise."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), -0.6)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            h, w = torch.randint(4, 14, (2,), generator=gen).tolist()
            y, x = torch.randint(0, size - h, (1,), generator=gen).item(), torch.randint(0, size - w, (1,), generator=gen).item()
            images[i, :, y:y + h, x:x + w] = (torch.rand(3, generator=gen) * 2 - 1)[:, None, None]
    return (images + 0.03 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)


def test_pyramid_levels_go_down_to_16_px():
    assert pyramid_resolutions(32) == [32, 16]
    assert pyramid_resolutions(64) == [64, 32, 16]
    assert pyramid_resolutions(128) == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="smaller than the coarsest level"):
        pyramid_resolutions(8)


def test_pyramid_matches_the_scipy_reference_and_reconstructs_the_image():
    import scipy.ndimage

    # Karras' pyr_down / pyr_up (cv2.pyrDown / pyrUp) written with scipy, mirror borders.
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float32)[None, None] / 256.0
    images = np.random.default_rng(0).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    down = scipy.ndimage.convolve(images, kernel, mode="mirror")[:, :, ::2, ::2]
    up = np.zeros((2, 3, 32, 32), np.float32)
    up[:, :, ::2, ::2] = down
    up = scipy.ndimage.convolve(up, kernel * 4.0, mode="mirror")
    np.testing.assert_allclose(pyr_down(torch.from_numpy(images)).numpy(), down, atol=1e-3)
    np.testing.assert_allclose(pyr_up(torch.from_numpy(down)).numpy(), up, atol=1e-3)
    # A Laplacian pyramid is invertible: upsampling the residual and adding the bands gives the image back.
    band, low = laplacian_pyramid(torch.from_numpy(images), 2)
    assert band.shape[-1] == 32 and low.shape[-1] == 16
    np.testing.assert_allclose((band + pyr_up(low)).numpy(), images, atol=1e-3)


def test_identical_sets_score_near_zero_and_blur_scores_worse():
    reference, clean = _scenes(96, seed=1), _scenes(96, seed=2)
    blurred = _blur(clean)
    same = sliced_wasserstein_distance(reference, reference, seed=0)
    against_clean = sliced_wasserstein_distance(reference, clean, seed=0)
    against_blurred = sliced_wasserstein_distance(reference, blurred, seed=0)
    assert len(same["levels"]) == 2 and same["resolutions_px"] == [32, 16]
    # Identical sets differ only by where the patches were drawn: a small floor, far below a real difference.
    assert same["swd"] < 0.4 * against_blurred["swd"]
    assert against_blurred["swd"] > 1.3 * against_clean["swd"]
    # Blur removes the finest band's detail: level 0 (32 px) shows it most.
    assert against_blurred["levels"][0] > 2 * against_clean["levels"][0]


def test_seed_reproduces_and_different_seeds_are_close():
    reference, blurred = _scenes(96, seed=1), _blur(_scenes(96, seed=2))
    first = sliced_wasserstein_distance(reference, blurred, seed=0)
    assert sliced_wasserstein_distance(reference, blurred, seed=0) == first
    other = sliced_wasserstein_distance(reference, blurred, seed=1)
    assert other["swd"] != first["swd"]
    assert abs(other["swd"] - first["swd"]) < 0.15 * first["swd"]  # measured: 7 % (blur itself: +100 %)


def test_swd_rejects_sets_of_different_size():
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein_distance(_scenes(4), _scenes(5))


def test_evaluate_swd_on_demo_data(demo_data, tiny_generator, tmp_path):
    from pipeline.evaluation import METRICS, evaluate

    assert "swd" in METRICS
    cfg, generator = tiny_generator
    metrics, artifacts = evaluate(cfg, generator, demo_data, ["swd"], out_dir=tmp_path, progress=False)
    summary = json.loads(open(artifacts["summary"]).read())
    settings = summary["settings"]["swd"]
    assert settings["reference_split"] == "holdout" and settings["level_resolutions_px"] == [32, 16]
    assert set(metrics) == {"swd", "swd_level0", "swd_level1", "swd_images"}
    # 60 demo images with ~20 % holdout: every holdout image, as many generated samples.
    assert metrics["swd_images"] == settings["images"] <= 60 * 0.3
    assert metrics["swd"] == pytest.approx((metrics["swd_level0"] + metrics["swd_level1"]) / 2)
    assert metrics["swd"] > 0


def test_evaluate_swd_falls_back_to_train_images_and_caps_the_count(tmp_path, tiny_generator, no_holdout_data):
    import dataclasses

    from pipeline.evaluation import evaluate

    cfg, generator = tiny_generator
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, swd_images=6))
    metrics, artifacts = evaluate(cfg, generator, no_holdout_data, ["swd"], out_dir=tmp_path / "eval",
                                  progress=False)
    settings = json.loads(open(artifacts["summary"]).read())["settings"]["swd"]
    assert settings["reference_split"].startswith("train")
    assert metrics["swd_images"] == 6
