"""The sparse generator, the critic and the top-k operators (issue: core)."""

import pytest
import torch

import pipeline
from pipeline.model import channel_topk, scheduled_k, spatial_topk, topk_mask


@pytest.fixture(scope="module")
def paper64():
    cfg = pipeline.load_config("paper64")
    torch.manual_seed(0)
    return cfg, pipeline.build_generator(cfg)


def test_paper64_exact_sparsity_per_sample_and_channel(paper64):
    cfg, generator = paper64
    z = torch.randn(3, cfg.model.latent_dim)
    with torch.no_grad():
        images, activations = generator(z, return_activations=True)
    assert images.shape == (3, 3, 64, 64)
    assert list(activations) == ["fc4", "conv8", "conv16", "conv32", "conv64"]
    # Z -> O: at most k = 8 non-zero channels at each of the 4x4 positions.
    fc4 = activations["fc4"]
    assert fc4.shape == (3, 3200, 4, 4)
    per_position = (fc4 != 0).sum(dim=1)
    assert per_position.max() <= 8 and per_position.min() >= 1
    # Later layers: at most k non-zero positions per (sample, channel); generic weights give exactly k
    # for most channels (only dead channels have fewer).
    for name, k in (("conv8", 16), ("conv16", 64), ("conv32", 256)):
        act = activations[name]
        per_channel = (act.flatten(2) != 0).sum(dim=2)
        assert per_channel.max() == k, name
        assert (per_channel == k).float().mean() > 0.5, name
    # conv64 is dense in Table 1: more than a quarter of positions active in most channels.
    assert (activations["conv64"].flatten(2) != 0).float().mean() > 0.25


def test_gradient_reaches_kept_units_only():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    relu = torch.relu(x)
    out, mask = spatial_topk(relu, 5)
    out.sum().backward()
    kept = mask.bool() & (x > 0)
    assert torch.all(x.grad[kept] == 1)
    assert torch.all(x.grad[~kept] == 0)
    assert kept.flatten(2).sum(-1).max() <= 5


def test_channel_topk_gradients_and_counts():
    x = torch.randn(2, 10, 3, 3, requires_grad=True)
    out, mask = channel_topk(torch.relu(x), 3)
    out.pow(2).sum().backward()
    assert ((out != 0).sum(1) <= 3).all()
    assert torch.all(x.grad[mask == 0] == 0)


def test_ties_keep_rule_and_exact_rule():
    # Four equal maxima, k = 2: "keep" keeps all ties at the threshold, "exact" keeps exactly two.
    values = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 3.0, 0.5]]])
    keep = topk_mask(values, 2, dim=2, ties="keep")
    exact = topk_mask(values, 2, dim=2, ties="exact")
    assert keep.tolist() == [[[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]]
    assert exact.sum() == 2 and (exact * values).sum() == 6.0


def test_dense_mode_has_no_topk_zeros():
    cfg = pipeline.load_config("tiny", ["model.sparsity={fc4: null, conv8: null, conv16: null, conv32: null}"])
    generator = pipeline.build_generator(cfg)
    z = torch.randn(4, cfg.model.latent_dim)
    _, activations, masks = generator(z, return_masks=True)
    # Dense: every zero in an activation is a ReLU zero (pre-activation <= 0), none comes from top-k.
    for key, mask in masks.items():
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (activations["conv8"].flatten(2) != 0).sum(-1).float().mean() > 16
    assert all(v is None for v in generator.k.values())


def test_fraction_k_resolves_against_layer_extent():
    cfg = pipeline.load_config("paper64", ["model.sparsity.conv8=0.25", "model.sparsity.conv32=0.3333"])
    assert cfg.resolved_k("conv8") == 16
    assert cfg.resolved_k("conv32") == 341
    generator = pipeline.build_generator(cfg)
    assert generator.k["conv8"] == 16 and generator.k["conv32"] == 341


def test_cells_first_layer_reading():
    cfg = pipeline.load_config("paper64", ["model.first_layer=cells", "model.sparsity.fc4=20"])
    generator = pipeline.build_generator(cfg)
    z = torch.randn(2, 100)
    with torch.no_grad():
        _, activations = generator(z, return_activations=True)
    fc4 = activations["fc4"]  # (2, 3200, 4, 4), channel v*16 + p non-zero only at cell p
    assert fc4.shape == (2, 3200, 4, 4)
    by_slot = fc4.view(2, 200, 16, 16)  # (b, v, slot p, cell q)
    off_diagonal = by_slot * (1 - torch.eye(16))[None, None]
    assert off_diagonal.abs().sum() == 0
    assert ((fc4 != 0).sum(1) <= 20).all() and ((fc4 != 0).sum(1) >= 1).all()


def test_sparsity_schedule_dense_then_anneal():
    target = {"fc4": 8, "conv8": 16, "conv64": None}
    extents = {"fc4": 3200, "conv8": 64, "conv64": 4096}
    args = dict(kind="dense_then_anneal", dense_epochs=2, anneal_epochs=4)
    assert scheduled_k(target, extents, epoch=0.5, **args) == {"fc4": None, "conv8": None, "conv64": None}
    mid = scheduled_k(target, extents, epoch=4, **args)
    assert 8 < mid["fc4"] < 3200 and 16 < mid["conv8"] < 64 and mid["conv64"] is None
    assert mid["conv8"] == 32  # geometric midpoint of 64 and 16
    assert scheduled_k(target, extents, epoch=7, **args) == target
    assert scheduled_k(target, extents, "fixed", 0.0, 0, 0) == target


def test_both_weight_scalings_start_from_the_same_function_and_differ_in_stored_weights():
    outputs, stored = [], []
    for scaling in ("equalized", "standard"):
        cfg = pipeline.load_config("tiny", [f"model.weight_scaling={scaling}", "sparsity_schedule.kind=fixed"])
        torch.manual_seed(0)
        generator = pipeline.build_generator(cfg)
        with torch.no_grad():
            outputs.append(generator(torch.ones(2, cfg.model.latent_dim)))
        stored.append(generator.blocks[0][0].weight.detach().std().item())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    # Equalized stores N(0, 1); standard stores He-normal weights, std sqrt(2 / fan_in).
    fan_in = pipeline.load_config("tiny").model.fc_channels * 9
    assert abs(stored[0] - 1.0) < 0.05 and abs(stored[1] - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5


def test_critic_maps_images_to_one_energy_each():
    cfg = pipeline.load_config("tiny")
    critic = pipeline.build_critic(cfg)
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    assert critic(y).shape == (3,)


def test_propagate_with_fixed_masks_reproduces_forward():
    cfg = pipeline.load_config("tiny")
    generator = pipeline.build_generator(cfg)
    z = torch.randn(2, cfg.model.latent_dim)
    with torch.no_grad():
        images, activations, masks = generator(z, return_masks=True)
        again = generator.propagate("conv8", activations["conv8"], masks, use_bias=True, apply_tanh=True)
    torch.testing.assert_close(again, images)


def test_channel_axis_keeps_k_channels_per_position_and_validates_k_against_channels():
    # conv_sparsity_axis=channel: each conv layer's top-k chooses among its channels at every position (the
    # OR-node reading of Sec. 3.2), so k is bounded by the layer's width, not by H*W.
    cfg = pipeline.load_config("tiny", ["model.conv_sparsity_axis=channel", "model.sparsity.conv8=3",
                                        "model.sparsity.conv16=5", "sparsity_schedule.kind=fixed"])
    assert cfg.layer_extent("conv8") == 64 and cfg.layer_extent("conv16") == 32
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    with torch.no_grad():
        _, activations, masks = generator(torch.randn(4, cfg.model.latent_dim), return_masks=True)
    for name, k in (("conv8", 3), ("conv16", 5)):
        per_position = (activations[name] != 0).sum(dim=1)
        assert per_position.max() == k, name
        assert (per_position == k).float().mean() > 0.5, name
        # Per channel it is not limited: some channel is on at more than k positions.
        assert (activations[name].flatten(2) != 0).sum(-1).max() > k, name
    # The mask propagate() uses agrees with the activation it came from.
    assert torch.equal(masks["block0.conv1"].bool(), activations["conv8"] != 0)
    with pytest.raises(pipeline.ConfigError, match="conv16: k=128 is larger than the layer \\(32 channels\\)"):
        pipeline.load_config("tiny", ["model.conv_sparsity_axis=channel"])
    with pytest.raises(pipeline.ConfigError, match="conv_sparsity_axis"):
        pipeline.load_config("tiny", ["model.conv_sparsity_axis=depth"])
