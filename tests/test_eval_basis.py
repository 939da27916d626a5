"""Basis functions: the analytic answer on a hand-built 2-layer generator, and linearity on the real one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation.basis import (
    Unit,
    active_units,
    basis_functions,
    crop_support,
    forward_with_masks,
    propagate_between,
    receptive_field_centre_px,
)
from tests.test_eval_fixtures import tiny_generator  # noqa: F401 - fixture


class Conv(nn.Module):
    """3x3 same-padding convolution with the (x, use_bias) call of the generator's ScaledConv2d."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x, use_bias=True):
        return F.conv2d(x, self.weight, self.bias if use_bias else None, padding=1)


class TwoLayerGenerator(nn.Module):
    """fc4 (2 channels on a 4x4 grid) -> up x2 -> one conv (1 channel, ReLU mask) -> to_rgb: the smallest net
    with SparseGenerator's propagate contract. Hand-set weights: conv kernel K from channel 1, gains g to RGB."""

    layer_names = ["fc4", "conv8"]
    fc_channels = 2

    def __init__(self, kernel, gains):
        super().__init__()
        w = torch.zeros(1, 2, 3, 3)
        w[0, 1] = kernel
        self.blocks = nn.ModuleList([nn.ModuleList([Conv(w, torch.full((1,), 5.0))])])
        rgb = torch.zeros(3, 1, 3, 3)
        rgb[:, 0, 1, 1] = gains  # a 1x1 colour map written as a centred 3x3 kernel
        self.to_rgb = Conv(rgb, torch.full((3,), 7.0))

    def propagate(self, layer, activation, masks, use_bias=False, apply_tanh=False):
        assert layer == "fc4"
        x = F.interpolate(activation, scale_factor=2, mode="nearest")
        x = self.blocks[0][0](x, use_bias=use_bias) * masks["block0.conv0"]
        out = self.to_rgb(x, use_bias=use_bias)
        return torch.tanh(out) if apply_tanh else out


def test_single_unit_basis_function_matches_the_analytic_answer():
    kernel = torch.arange(1.0, 10.0).reshape(3, 3) - 5.0  # asymmetric: catches flips
    gains = torch.tensor([1.0, 2.0, -0.5])
    net = TwoLayerGenerator(kernel, gains)
    mask = torch.ones(2, 1, 8, 8)
    mask[1, 0, 3, 5] = 0.0  # sample 1's ReLU switched this pixel off
    masks = {"block0.conv0": mask}
    a, y, x = 1.5, 1, 2
    units = [Unit(sample=s, layer="fc4", channel=1, y=y, x=x, activation=a) for s in (0, 1)]
    bases = basis_functions(net, masks, units)

    # Analytic: nearest upsampling puts a at the 2x2 block rows 2y..2y+1, cols 2x..2x+1; a 3x3
    # cross-correlation with K spreads each block pixel (r, c) to (r + 1 - i, c + 1 - j) with weight K[i, j];
    # the mask multiplies; the colour map scales by g; no bias anywhere.
    expected = np.zeros((8, 8))
    for r in (2 * y, 2 * y + 1):
        for c in (2 * x, 2 * x + 1):
            for i in range(3):
                for j in range(3):
                    expected[r + 1 - i, c + 1 - j] += a * float(kernel[i, j])
    for sample, basis in enumerate(bases):
        field = expected * mask[sample, 0].numpy()
        rgb = np.stack([float(g) * field for g in gains])
        rows, cols = np.nonzero(np.abs(field) > 0)
        assert basis.box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        y0, y1, x0, x1 = basis.box
        np.testing.assert_allclose(basis.image, rgb[:, y0:y1, x0:x1], rtol=1e-6, atol=1e-6)
    assert bases[0].box == (1, 5, 3, 7)  # the 2x2 block grown by one pixel on every side


def test_crop_support_of_empty_and_point_patterns():
    empty, box = crop_support(np.zeros((3, 5, 5)))
    assert empty.shape == (3, 0, 0) and box == (0, 0, 0, 0)
    point = np.zeros((3, 5, 5))
    point[1, 2, 3] = -2.0
    cropped, box = crop_support(point)
    assert box == (2, 3, 3, 4) and cropped[1, 0, 0] == -2.0


def test_receptive_field_centre():
    assert receptive_field_centre_px("conv8", 0, 0, 64) == (4.0, 4.0)
    assert receptive_field_centre_px("conv16", 15, 2, 32) == (31.0, 5.0)


def test_basis_functions_sum_to_the_layer_contribution(tiny_generator):
    """With masks fixed and no bias the net is linear: basis functions (uncropped) of a set of units add up to
    the propagation of those units together, and with bias + tanh propagating the layer reproduces the image."""
    cfg, generator = tiny_generator
    z = torch.randn(2, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1))
    images, activations, masks = forward_with_masks(generator, z)
    layer = "conv16"
    units = active_units(activations, layer, top=24)  # a subset keeps it cheap; linearity holds for any subset
    assert units and all(u.activation > 0 for u in units)
    subset = torch.zeros_like(activations[layer])
    for u in units:
        subset[u.sample, u.channel, u.y, u.x] = activations[layer][u.sample, u.channel, u.y, u.x]
    whole = generator.propagate(layer, subset, masks, use_bias=False, apply_tanh=False)
    total = torch.zeros_like(whole)
    for basis in basis_functions(generator, masks, units, crop=False):
        total[basis.unit.sample] += torch.from_numpy(basis.image)
    torch.testing.assert_close(total, whole, rtol=1e-4, atol=1e-4)
    again = generator.propagate(layer, activations[layer], masks, use_bias=True, apply_tanh=True)
    torch.testing.assert_close(again, images, rtol=1e-5, atol=1e-5)
    # The early-stopping propagation agrees with the generator's own next-layer activation.
    below = propagate_between(generator, "conv8", activations["conv8"], masks, "conv16")
    assert below.shape == activations["conv16"].shape


def test_active_units_are_sorted_and_limited(tiny_generator):
    cfg, generator = tiny_generator
    _, activations, _ = forward_with_masks(generator, torch.randn(3, cfg.model.latent_dim))
    units = active_units(activations, "conv8", top=5)
    assert len(units) == 15
    for s in range(3):
        values = [u.activation for u in units if u.sample == s]
        assert values == sorted(values, reverse=True)
        u = next(u for u in units if u.sample == s)
        assert activations["conv8"][s, u.channel, u.y, u.x].item() == pytest.approx(u.activation)
