"""The fast paths compute what the straightforward ones do, up to floating-point tolerance (issue: speed)."""

import json
import os
import subprocess
import sys

import torch

import pipeline
from pipeline.learning import ABPLearner, LatentBank, langevin_infer
from pipeline.learning.bench import _exact_topk_generator, baseline_step, plain_models, plain_step
from pipeline.learning.learner import prepare_module
from pipeline.model import relu_topk, spatial_relu_topk, sparse_conv, topk_mask, upsample_conv
from pipeline.model.sparsity import _kth_largest


def _assert_close_at_scale(actual, expected, *, atol_of_largest, rtol, msg):
    # Gradients that sum many products in a different order (sparse vs dense, fused vs plain) differ in
    # proportion to their size, so the absolute tolerance is a fraction of the expected tensor's largest entry
    # (of 1 for small tensors); a wrong mask, index or kernel differs by the order of the entry itself.
    atol = atol_of_largest * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda details: f"{msg}: {details}")


def _cfg(*overrides):
    return pipeline.load_config("tiny", ["model.fc_channels=64", "model.widths=[32, 16, 8]", *overrides])


def test_langevin_matches_plain_backward_loop():
    cfg = _cfg()
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    y = torch.rand(4, 3, 32, 32) * 2 - 1
    z0 = torch.randn(4, cfg.model.latent_dim)
    fast = langevin_infer(generator, z0, y, steps=5, step_size=0.2, noise_sigma=0.3,
                          generator_rng=torch.Generator().manual_seed(3)).z
    # Straightforward: loss.backward() with parameter gradients on, same noise sequence.
    rng = torch.Generator().manual_seed(3)
    z = z0.clone()
    for _ in range(5):
        z = z.detach().requires_grad_(True)
        energy = ((y - generator(z)) ** 2).flatten(1).sum(1) / (2 * 0.3**2) + (z**2).sum(1) / 2
        energy.sum().backward()
        z = z - (0.2**2 / 2) * z.grad + 0.2 * torch.randn(z.shape, generator=rng)
    torch.testing.assert_close(fast, z.detach(), rtol=1e-4, atol=1e-4)


def _reference_relu_topk(pre, k, dim):
    """ReLU, then the "keep" top-k mask found with torch.topk, as a first implementation would."""
    x = torch.relu(pre)
    kth = x.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return x * (x >= kth).to(x.dtype)


def test_fused_relu_topk_matches_relu_then_topk_values_and_gradients():
    torch.manual_seed(0)
    pre = torch.randn(6, 5, 40)
    pre[0, 0] = -torch.rand(40)  # every unit negative: the layer is all zeros
    pre[1, 1, :30] = -1.0  # fewer than k positive units: only ReLU zeros
    pre[2, 2, :10] = 0.7  # ties at the threshold: all kept
    pre[3, 3, :5] = 0.0  # exact zeros
    for k, dim in ((8, 2), (3, 1), (40, 2), (1, 2)):
        fast_in = pre.clone().requires_grad_(True)
        ref_in = pre.clone().requires_grad_(True)
        fast, mask = relu_topk(fast_in, k, dim=dim, return_mask=True)
        ref = _reference_relu_topk(ref_in, k, dim) if k < pre.shape[dim] else torch.relu(ref_in)
        assert torch.equal(fast, ref), (k, dim)
        weights = torch.randn_like(pre)
        (fast * weights).sum().backward()
        (ref * weights).sum().backward()
        assert torch.equal(fast_in.grad, ref_in.grad), (k, dim)
        # The combined mask is exactly "survives ReLU and top-k".
        assert torch.equal(mask.bool(), (ref != 0) | ((pre > 0) & (ref == 0) & (pre == 0)))
    assert (relu_topk(pre, 3, dim=1)[0] != 0).sum(1).max() <= 3
    spatial = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out, _ = spatial_relu_topk(spatial, 5)
    assert torch.equal(out, _reference_relu_topk(spatial.reshape(2, 3, 64), 5, 2).view(2, 3, 8, 8))


def test_kth_largest_selection_matches_topk():
    torch.manual_seed(1)
    values = torch.randn(4, 7, 33).contiguous(memory_format=torch.contiguous_format)
    for k in (1, 5, 33):
        for dim in (1, 2):
            if k > values.shape[dim]:
                continue
            expected = values.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
            assert torch.equal(_kth_largest(values, k, dim), expected)


# Plain SGD at this rate: one step moves tiny's weights by a few percent. With standard weights Step 3's gradients
# reach ~1e4, so the config's Adam rate (1e-3) as an SGD rate would move them by more than their own size,
# saturate tanh and leave the second step comparing near-zero gradients.
_SGD_LR = 1e-6


def _assert_steps_agree(cfg, learner, other_generator, other_critic, other_step, indices, images, steps: int = 2):
    """``learner.step`` and ``other_step`` (same signature as ``baseline_step``) from the same weights, both
    with plain SGD (a parameter's update is then -lr x its gradient: Adam with beta1 = 0 moves every weight by
    ~lr whatever its gradient's size, which could hide or fake a difference): Z, and every parameter's update
    of generator and critic, agree after every step. Updates are compared at the scale of their largest entry
    (``_assert_close_at_scale``): the two implementations sum the same products in different orders."""
    learner.generator_optimizer = torch.optim.SGD(learner.generator.parameters(), lr=_SGD_LR)
    learner.critic_optimizer = torch.optim.SGD(learner.critic.parameters(), lr=_SGD_LR)
    opt_g = torch.optim.SGD(other_generator.parameters(), lr=_SGD_LR)
    opt_c = torch.optim.SGD(other_critic.parameters(), lr=_SGD_LR)
    other_bank = LatentBank(indices.numel(), cfg.model.latent_dim)
    rng = torch.Generator().manual_seed(cfg.training.seed)
    pairs = [("generator", learner.generator, other_generator), ("critic", learner.critic, other_critic)]
    for step in range(steps):
        before = {(kind, name): (fast.detach().clone(), base.detach().clone())
                  for kind, ours, theirs in pairs
                  for (name, fast), base in zip(ours.named_parameters(), theirs.parameters())}
        learner.step(indices, images)
        other_step(cfg, other_generator, other_critic, opt_g, opt_c, other_bank, indices, images, rng)
        torch.testing.assert_close(learner.bank.z, other_bank.z, rtol=1e-4, atol=1e-4, msg=f"Z after step {step}")
        for kind, ours, theirs in pairs:
            for (name, fast), base in zip(ours.named_parameters(), theirs.parameters()):
                fast_before, base_before = before[(kind, name)]
                update, expected = fast.detach() - fast_before, base.detach() - base_before
                # (Eq. 21 has no gradient in the critic's output bias: it adds to f(Y) and f(g(Z)) alike.)
                assert kind == "critic" or expected.abs().max() > 0, f"{kind} {name} did not move in step {step}"
                _assert_close_at_scale(update, expected, atol_of_largest=1e-4, rtol=1e-3,
                                       msg=f"{kind} {name} update, step {step}")


def test_learner_step_matches_the_straightforward_implementation():
    # ABPLearner.step (parameters frozen in Langevin, fused top-k, g(Z^) reused from Step 1, no extra
    # forward for the final energy, channels-last) against ``baseline_step`` written from the paper.
    cfg = _cfg("langevin.steps=4", "training.critic_energy_l2=0")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    indices = torch.arange(8)
    torch.manual_seed(0)
    generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
    critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
    learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
    torch.manual_seed(0)
    base_generator = _exact_topk_generator(cfg, pipeline.build_generator(cfg))
    base_critic = pipeline.build_critic(cfg)
    _assert_steps_agree(cfg, learner, base_generator, base_critic, baseline_step, indices, images)


def _dense_upsample_conv(x, weight, bias, scale):
    return torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
                                      weight * scale, bias, padding=1)


def _sparse_map(batch, channels, k, reading, generator, ties=False):
    """A post-top-k first-layer map (B, C, 4, 4): "dense" reading (k of C channels per cell) or "cells"
    (channel v*16 + p lives at cell p only); ``ties`` adds exactly-equal survivors (more than k per cell)."""
    pre = torch.randn(batch, channels, 16, generator=generator)
    if reading == "cells":
        cells = pre[:, : channels // 16]  # (B, V, 16)
        kth = cells.topk(k, dim=1).values[:, k - 1:k]
        kept = cells * (cells >= kth)
        if ties:
            kept[0, :, 5] = 0.0
            kept[0, : k + 2, 5] = 0.5  # k + 2 tied survivors at cell 5
        return torch.diag_embed(kept).reshape(batch, channels, 4, 4)
    kth = pre.topk(k, dim=1).values[:, k - 1:k]
    kept = pre * (pre >= kth)
    if ties:
        kept[1, :, 2] = 0.0
        kept[1, : k + 3, 2] = 0.5  # k + 3 tied survivors at one cell
    return kept.view(batch, channels, 4, 4)


def test_sparse_first_conv_matches_dense_values_and_gradients():
    # upsample x2 + 3x3 conv from the active channels only, against the dense layer: output, gradient to the
    # input (exact on the active units, 0 on the others, which the top-k mask zeroes anyway), to the weight
    # and the bias; both readings of the first layer, ties beyond k, both memory layouts, and all three
    # weight paths (gathered from the parameter, cached channel-major via embedding_bag, the large-batch copy).
    gen = torch.Generator().manual_seed(0)
    channels, out_channels, scale = 640, 24, 0.07
    for reading in ("dense", "cells"):
        for ties in (False, True):
            for channels_last in (False, True):
                for path in ("gather", "cached", "copy"):
                    batch = 40 if path == "copy" else 3  # copy: more gathered rows than channels
                    x = _sparse_map(batch, channels, 4, reading, gen, ties)
                    weight = torch.randn(out_channels, channels, 3, 3, generator=gen)
                    bias = torch.randn(out_channels, generator=gen)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                        weight = weight.contiguous(memory_format=torch.channels_last)
                    n = sparse_conv.active_channel_count(x)
                    assert n == 4 + ties * (3 if reading == "dense" else 2)
                    assert (path == "copy") == (batch * 16 * n > channels)
                    results = []
                    for sparse in (False, True):
                        xi = x.clone().requires_grad_(True)
                        wi = weight.clone().requires_grad_(True)
                        bi = bias.clone().requires_grad_(True)
                        if sparse:
                            cm = None
                            if path == "cached":
                                cm = sparse_conv.channel_major_weight(wi.detach(), scale).contiguous()
                            y = sparse_conv.sparse_upsample_conv3x3(xi, wi, bi, n, scale, cm)
                        else:
                            y = _dense_upsample_conv(xi, wi, bi, scale)
                        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
                        wrt = [xi, bi] if path == "cached" else [xi, wi, bi]
                        results.append((y.detach(), *torch.autograd.grad(y, wrt, upstream)))
                    (y_d, gx_d, *rest_d), (y_s, gx_s, *rest_s) = results
                    case = (reading, ties, channels_last, path)
                    torch.testing.assert_close(y_s, y_d, rtol=1e-5, atol=1e-5, msg=f"values {case}")
                    active = x != 0
                    torch.testing.assert_close(gx_s, gx_d * active, rtol=1e-5, atol=1e-5, msg=f"input grad {case}")
                    assert not gx_s[~active].any()
                    for a, b in zip(rest_s, rest_d):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"weight/bias grad {case}")


def _small_paper_cfg(reading, *overrides):
    # paper64's structure at test size: 1024 = 64 x 16 channels at 4x4, k = 4 per cell.
    return pipeline.load_config("tiny", [f"model.first_layer={reading}", "model.fc_channels=1024",
                                         "model.cell_channels=64", "model.widths=[32, 16, 8]",
                                         "model.sparsity.fc4=4", *overrides])


def test_generator_with_sparse_first_conv_matches_dense_generator(monkeypatch):
    # The whole generator (Eq. 6 unchanged): images, d/dZ and every parameter gradient, for both readings of
    # the first layer; and the dense fallback when fc4 is dense or its k is large.
    calls = []
    real = sparse_conv.sparse_upsample_conv3x3
    monkeypatch.setattr(sparse_conv, "sparse_upsample_conv3x3", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for reading in ("dense", "cells"):
        # "cells": at most cell_channels (1/16) of the channels are active at a cell even with fc4 dense.
        large = 200 if reading == "dense" else 64
        for k, sparse_expected in ((4, True), (None, reading == "cells"), (large, reading == "cells")):
            cfg = _small_paper_cfg(reading, f"model.sparsity.fc4={'null' if k is None else k}")
            torch.manual_seed(0)
            generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
            z = torch.randn(5, cfg.model.latent_dim, generator=torch.Generator().manual_seed(2))
            results = []
            for sparse in (True, False):
                generator.sparse_first_conv = sparse
                calls.clear()
                zi = z.clone().requires_grad_(True)
                images, activations = generator(zi, return_activations=True)
                grads = torch.autograd.grad((images * torch.linspace(-1, 1, images.numel()).view_as(images)).sum(),
                                            [zi, *generator.parameters()])
                results.append((images.detach(), activations["conv8"].detach(), grads))
                assert bool(calls) == (sparse and sparse_expected), (reading, k, sparse)
            (img_s, act_s, grads_s), (img_d, act_d, grads_d) = results
            torch.testing.assert_close(img_s, img_d, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(act_s, act_d, rtol=1e-5, atol=1e-5)
            for (name, _), a, b in zip([("z", None), *generator.named_parameters()], grads_s, grads_d):
                # Standard-scaled weights have gradients in the hundreds.
                _assert_close_at_scale(a, b, atol_of_largest=1e-6, rtol=1e-4, msg=f"{reading} k={k} grad {name}")


def test_frozen_weight_cache_matches_uncached_chain_and_is_released(monkeypatch):
    import contextlib

    import pipeline.learning.langevin as langevin

    cfg = _small_paper_cfg("dense")
    torch.manual_seed(0)
    generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
    y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z0 = torch.randn(4, cfg.model.latent_dim, generator=torch.Generator().manual_seed(4))

    def chain():
        return langevin_infer(generator, z0, y, steps=4, step_size=0.1, noise_sigma=0.3,
                              generator_rng=torch.Generator().manual_seed(5)).z

    cached = chain()
    layers = [m for m in generator.modules() if hasattr(m, "_frozen_weight")]
    assert layers and all(m._frozen_weight is None and m._frozen_channel_major is None for m in layers)
    monkeypatch.setattr(langevin, "frozen_weight_cache", lambda module: contextlib.nullcontext(module))
    uncached = chain()
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    # Inside the cache the scaled weights are the parameters' current values; a later change is seen.
    with sparse_conv.frozen_weight_cache(generator):
        conv = generator.blocks[0][0]
        torch.testing.assert_close(conv._frozen_weight, conv.weight * conv.scale)
        torch.testing.assert_close(conv.cached_channel_major(),
                                   sparse_conv.channel_major_weight(conv.weight * conv.scale))
    with torch.no_grad():
        before = generator(z0)
        generator.blocks[1][0].weight.mul_(1.5)
        assert not torch.allclose(generator(z0), before)


def test_transposed_upsample_conv_matches_interpolate_then_conv():
    # upsample x2 + 3x3 same conv as one stride-2 transposed conv: values and gradients to input, weight and
    # bias, square and non-square maps, both memory layouts, odd channel counts.
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for (batch, c, o, h, w) in ((3, 5, 7, 4, 4), (2, 16, 3, 8, 5), (4, 32, 16, 16, 16)):
        for channels_last in (False, True):
            x = torch.randn(batch, c, h, w, generator=gen)
            weight = torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5  # unit-scale outputs, as in the model
            bias = torch.randn(o, generator=gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                weight = weight.contiguous(memory_format=torch.channels_last)
            results = []
            for fused in (False, True):
                xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, weight, bias))
                if fused:
                    y = upsample_conv.upsample_conv3x3(xi, upsample_conv.phase_kernel(wi), bi)
                else:
                    y = F.conv2d(F.interpolate(xi, scale_factor=2, mode="nearest"), wi, bi, padding=1)
                upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
                results.append((y.detach(), *torch.autograd.grad(y, [xi, wi, bi], upstream)))
            case = (batch, c, o, h, w, channels_last)
            assert results[1][0].shape == (batch, o, 2 * h, 2 * w)
            for name, a, b in zip(("values", "input grad", "weight grad", "bias grad"), results[1], results[0]):
                # Weight gradients sum batch x 4HW products.
                _assert_close_at_scale(a, b, atol_of_largest=2e-6, rtol=1e-5, msg=f"{name} {case}")


def test_transposed_upsample_conv_rule():
    conv = pipeline.build_generator(_cfg()).blocks[1][0]
    small = torch.zeros(2, conv.weight.shape[1], 8, 8)
    large = torch.zeros(upsample_conv.FUSED_MIN_INPUT_POSITIONS // 64, conv.weight.shape[1], 8, 8)
    assert not upsample_conv.fused_applies(small, conv)  # a weight gradient and few positions: dense
    assert upsample_conv.fused_applies(large, conv)
    assert not upsample_conv.fused_applies(large.to("meta"), conv)  # measured on CPU only
    with sparse_conv.frozen_weight_cache(conv):  # frozen (Langevin): always, with the kernel built once
        assert upsample_conv.fused_applies(small, conv)
        assert conv.phase_kernel() is conv.phase_kernel()
        torch.testing.assert_close(conv.phase_kernel(), upsample_conv.phase_kernel(conv.weight * conv.scale))
    assert conv._frozen_phase_kernel is None


def test_generator_with_transposed_upsample_conv_matches_dense_generator(monkeypatch):
    # The whole generator with and without the transposed form: images, d/dZ and every parameter gradient at
    # a batch large enough for it with a weight gradient; and a Langevin chain (frozen weights, a small
    # batch) against the same chain with it off.
    calls = []
    real = upsample_conv.upsample_conv3x3
    monkeypatch.setattr(upsample_conv, "upsample_conv3x3", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = _cfg()
    torch.manual_seed(0)
    generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
    z = torch.randn(16, cfg.model.latent_dim, generator=torch.Generator().manual_seed(2))
    y = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    results = []
    for fused in (True, False):
        generator.fused_upsample_conv = fused
        calls.clear()
        zi = z.clone().requires_grad_(True)
        images = generator(zi)
        grads = torch.autograd.grad((images * torch.linspace(-1, 1, images.numel()).view_as(images)).sum(),
                                    [zi, *generator.parameters()])
        forward_calls = len(calls)
        chain = langevin_infer(generator, z[:3], y, steps=3, step_size=0.1, noise_sigma=0.3,
                               generator_rng=torch.Generator().manual_seed(5)).z
        assert (forward_calls, len(calls) > forward_calls) == ((2, True) if fused else (0, False))
        results.append((images.detach(), grads, chain))
    (img_f, grads_f, chain_f), (img_d, grads_d, chain_d) = results
    torch.testing.assert_close(img_f, img_d, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip([("z", None), *generator.named_parameters()], grads_f, grads_d):
        # A weight gradient sums 16 x 1,024 products, in a different order in the two forms (on an AMD EPYC,
        # oneDNN's AVX2 kernels, blocks.2.0.weight differed by 1.6e-5 of its largest entry).
        _assert_close_at_scale(a, b, atol_of_largest=1e-4, rtol=0.0, msg=f"grad {name}")
    torch.testing.assert_close(chain_f, chain_d, rtol=1e-4, atol=1e-4)


def test_plain_step_matches_the_learner_step():
    # The competent plain-PyTorch baseline of `bench step` does the same work as ABPLearner.step.
    cfg = _cfg("langevin.steps=4")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    indices = torch.arange(8)
    torch.manual_seed(0)
    generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
    critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
    learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
    plain_generator, plain_critic = plain_models(cfg, torch.device("cpu"), seed=0)
    _assert_steps_agree(cfg, learner, plain_generator, plain_critic, plain_step, indices, images)
    assert all(p.requires_grad for p in [*plain_generator.parameters(), *plain_critic.parameters()])


def test_host_allocator_settings_apply_once():
    from pipeline.host_memory import configure_host_allocator

    first = configure_host_allocator()
    if sys.platform.startswith("linux"):
        assert first and first["trim_threshold_bytes"] >= 1 << 30
    assert configure_host_allocator() is first
    opted_out = subprocess.run(
        [sys.executable, "-c", "from pipeline.host_memory import configure_host_allocator as c; print(c())"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SPARSEGEN_HOST_ALLOCATOR": "default"},
    )
    assert opted_out.stdout.strip() == "None", opted_out.stderr


def test_channels_last_step_matches_contiguous_step():
    results = []
    for channels_last in (False, True):
        cfg = _cfg(f"training.channels_last={str(channels_last).lower()}", "langevin.steps=3")
        torch.manual_seed(0)
        generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
        critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
        learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
        # Plain SGD: parameters after a step are linear in the gradients. Adam moves every weight by ~lr
        # whatever its gradient's size, so a weight whose gradient is ~0 moves either way on rounding noise
        # and, through the top-k selection, flips which units survive.
        learner.generator_optimizer = torch.optim.SGD(generator.parameters(), lr=cfg.training.generator_lr)
        learner.critic_optimizer = torch.optim.SGD(critic.parameters(), lr=cfg.training.critic_lr)
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        first = learner.step(torch.arange(8), images).as_floats()
        z_first = learner.bank.z.clone()
        learner.step(torch.arange(8), images)
        with torch.no_grad():
            samples = generator(torch.randn(4, cfg.model.latent_dim, generator=torch.Generator().manual_seed(9)))
        results.append((first, z_first, samples))
    (metrics_a, z_a, samples_a), (metrics_b, z_b, samples_b) = results
    for name in metrics_a:
        assert abs(metrics_a[name] - metrics_b[name]) <= 1e-4 * max(1.0, abs(metrics_a[name])), name
    torch.testing.assert_close(z_a, z_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(samples_a, samples_b, rtol=0, atol=1e-4)


def test_bench_step_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "step", "--preset", "tiny", "--set", "langevin.steps=2",
         "--set", "model.widths=[16, 8, 8]", "--batch", "4", "--steps", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("iteration_images_per_s", "flops_per_image", "iteration_flops_per_s", "peak_flops_per_s",
                "langevin_fraction_of_peak", "speedup_vs_baseline", "plain_images_per_s", "speedup_vs_plain"):
        assert report[key] > 0, key


def _ddp_rank(rank: int, world_size: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = _cfg("langevin.steps=3")
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
        mine = slice(rank * 4, rank * 4 + 4)
        learners = []
        for wrap in (True, False):
            torch.manual_seed(0)
            generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
            critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
            if wrap:
                generator = torch.nn.parallel.DistributedDataParallel(generator)
                critic = torch.nn.parallel.DistributedDataParallel(critic)
            learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
            # Step 1 moves the DDP critic by the rank-averaged gradient and the plain one by this rank's, and
            # Step 3 differentiates through that critic: hold it still so both Step 3s see the same critic.
            for group in learner.critic_optimizer.param_groups:
                group["lr"] = 0.0
            learner.rng.manual_seed(100 + rank)
            learner.step(torch.arange(8)[mine], images[mine])
            learners.append(learner)
        ddp, plain = learners
        worst = 0.0
        for module_ddp, module_plain in ((ddp.generator.module, plain.generator), (ddp.critic.module, plain.critic)):
            for p_ddp, p_plain in zip(module_ddp.parameters(), module_plain.parameters()):
                local = p_plain.grad.clone()
                dist.all_reduce(local)
                expected = local / world_size
                scale = expected.abs().max().clamp_min(1e-6)
                worst = max(worst, float((p_ddp.grad - expected).abs().max() / scale))
        queue.put((rank, worst))
        # Both ranks leave together: a rank tearing gloo down while its peer still talks to it aborts (seen
        # as exit code -6 under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_step_gradients_are_the_average_of_per_rank_gradients():
    # Step 3 runs the DDP-wrapped generator on Z only and reaches Theta through the graph of g(Z^) kept
    # from Step 1 as well: DDP must still all-reduce the full gradient of both terms, once.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_ddp_rank, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]
    results = dict(queue.get() for _ in range(2))
    assert max(results.values()) < 1e-4, results
