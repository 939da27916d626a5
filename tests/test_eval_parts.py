"""Ground-truth part interpretability (demo data) and holdout reconstruction MSE."""

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.parts import (NONE_LABEL, _mutual_information_bits, cell_labels, channel_information_bits,
                                      firing_counts, part_interpretability, strongest_firings, summarise)
from tests.test_eval_fixtures import demo_data, tiny_generator  # noqa: F401 - fixtures


def test_cell_labels_use_the_projective_field_centre_and_the_smallest_box():
    parts = [
        {"object_type": "face", "part_type": "eye", "slot": "left_eye", "bbox": [0, 0, 16, 16]},
        {"object_type": "face", "part_type": "nose", "slot": "nose", "bbox": [8, 8, 16, 16]},
    ]
    # conv8 at 32 px: cell (y, x) has its centre at ((y + .5) * 4, (x + .5) * 4); the stored images are 64 px,
    # so boxes are halved.
    types, slots = cell_labels(parts, "conv8", resolution=32, image_size=64)
    grid = np.array(types).reshape(8, 8)
    assert grid[0, 0] == "eye" and grid[1, 1] == "nose" and grid[3, 3] == NONE_LABEL
    assert np.array(slots).reshape(8, 8)[1, 1] == "face/nose"


def test_perfect_units_have_purity_and_nmi_one():
    vocab = ["eye", NONE_LABEL, "nose"]
    activations = torch.zeros(2, 2, 1, 3)
    activations[:, 0, 0, 0] = 1.0  # channel 0 fires only at cell 0 (an eye)
    activations[:, 1, 0, 2] = 1.0  # channel 1 only at cell 2 (a nose)
    labels = [["eye", NONE_LABEL, "nose"]] * 2
    counts = firing_counts(activations, labels, vocab)
    assert counts.tolist() == [[2, 0, 0], [0, 0, 2]]
    metrics, details = summarise(counts, vocab, counts, vocab, "conv8", num_images=2)
    assert metrics["parts_purity_conv8"] == 1.0 and metrics["parts_nmi_conv8"] == pytest.approx(1.0)
    assert metrics["parts_mi_bits_conv8"] == pytest.approx(1.0)  # two equally likely labels
    assert metrics["parts_purity_chance_conv8"] == 0.5 and metrics["parts_on_part_fraction_conv8"] == 1.0
    assert [u["dominant_part_type"] for u in details["units"]] == ["eye", "nose"]
    # A unit firing everywhere carries no information about the label.
    everywhere = firing_counts(torch.ones(2, 1, 1, 3), labels, vocab)
    metrics, _ = summarise(everywhere, vocab, everywhere, vocab, "conv8", num_images=2)
    assert metrics["parts_mi_bits_conv8"] == pytest.approx(0.0, abs=1e-12)


def test_part_interpretability_on_demo_data(demo_data, tiny_generator):
    cfg, generator = tiny_generator
    metrics, details = part_interpretability(generator, cfg, demo_data, layer="conv8", num_images=6)
    assert details["num_images"] == 6
    for key in ("parts_purity_conv8", "parts_nmi_conv8", "parts_on_part_fraction_conv8"):
        assert 0.0 <= metrics[key] <= 1.0 or math.isnan(metrics[key]), key
    # conv8 keeps k=16 positions per channel: at most 16 firings per channel and image.
    assert metrics["parts_firings_per_image_conv8"] <= 16 * 64


def test_channel_information_terms_sum_to_the_mutual_information_and_rank_the_part_unit_first():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(5, 4))
    counts[2] = [40, 0, 0, 1]  # one channel that fires almost only on label 0
    bits = channel_information_bits(counts)
    assert bits.sum() == pytest.approx(_mutual_information_bits(counts)[0])
    # I(C; L) = H(L) - H(L | C), computed here independently of parts.py.
    joint = counts / counts.sum()
    p_label, p_channel = joint.sum(0), joint.sum(1)
    h_label = -sum(p * math.log2(p) for p in p_label if p > 0)
    h_label_given_channel = -sum(joint[c, l] * math.log2(joint[c, l] / p_channel[c])
                                 for c in range(joint.shape[0]) for l in range(joint.shape[1]) if joint[c, l] > 0)
    assert bits.sum() == pytest.approx(h_label - h_label_given_channel)
    assert (bits >= -1e-12).all() and int(np.argmax(bits)) == 2
    assert channel_information_bits(np.zeros((3, 2))).tolist() == [0.0, 0.0, 0.0]


def test_strongest_firings_take_one_position_per_image_strongest_first():
    acts = torch.zeros(3, 2, 4, 4)
    acts[0, 1, 1, 2], acts[0, 1, 3, 3] = 5.0, 2.0  # image 0: best at (1, 2)
    acts[2, 1, 0, 0] = 7.0
    acts[1, 0, 2, 2] = 9.0  # another channel
    assert strongest_firings(acts, 1, 5) == [(2, 0, 0, 7.0), (0, 1, 2, 5.0)]
    assert strongest_firings(acts, 1, 1) == [(2, 0, 0, 7.0)]


def test_evaluate_parts_draws_the_part_units_figure(demo_data, tiny_generator, tmp_path):
    from PIL import Image

    from pipeline.evaluation import evaluate

    cfg, generator = tiny_generator
    metrics, artifacts = evaluate(cfg, generator, demo_data, ["parts"], out_dir=tmp_path, progress=False)
    assert artifacts["parts_png"] == str(tmp_path / "parts_conv8.png")
    with Image.open(artifacts["parts_png"]) as picture:
        width, height = picture.size
    # Eight channel rows of nine tiles (the basis function and eight firings).
    assert width > 400 and height > 600


def test_holdout_mse_and_its_ranges(demo_data, tiny_generator, tmp_path):
    from pipeline.evaluation import evaluate

    cfg, generator = tiny_generator
    metrics, _ = evaluate(cfg, generator, demo_data, ["mse"], out_dir=tmp_path, progress=False)
    assert metrics["holdout_mse_images"] == cfg.evaluation.mse_images
    assert metrics["holdout_mse_01"] == pytest.approx(metrics["holdout_mse_pm1"] / 4)
    assert 0 < metrics["holdout_mse_pm1"] <= 4.0  # both images and tanh outputs lie in [-1, 1]


def test_parts_without_ground_truth_is_unavailable(tmp_path, tiny_generator):
    from pipeline.evaluation import MetricUnavailable, evaluate

    cfg, generator = tiny_generator
    with pytest.raises(MetricUnavailable, match="no dataset"):
        evaluate(cfg, generator, None, ["parts"], out_dir=tmp_path, progress=False, strict=True)
