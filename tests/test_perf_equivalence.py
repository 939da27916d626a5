"""The fast paths compute what the straightforward ones do, up to floating-point tolerance (issue: speed)."""

import json
import subprocess
import sys

import torch

import pipeline
from pipeline.learning import ABPLearner, LatentBank, langevin_infer
from pipeline.learning.learner import prepare_module


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


def test_channels_last_step_matches_contiguous_step():
    results = []
    for channels_last in (False, True):
        cfg = _cfg(f"training.channels_last={str(channels_last).lower()}", "langevin.steps=3")
        torch.manual_seed(0)
        generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
        critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
        learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
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
    # After two Adam steps (each moves a weight by ~lr whatever its gradient's size, so weights whose
    # gradient is ~0 may move either way) the generated images still agree closely.
    torch.testing.assert_close(samples_a, samples_b, rtol=0, atol=2e-2)


def test_bench_step_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "step", "--preset", "tiny", "--set", "langevin.steps=2",
         "--set", "model.widths=[16, 8, 8]", "--batch", "4", "--steps", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("iteration_images_per_s", "flops_per_image", "iteration_flops_per_s", "peak_flops_per_s",
                "langevin_fraction_of_peak", "speedup_vs_baseline"):
        assert report[key] > 0, key
