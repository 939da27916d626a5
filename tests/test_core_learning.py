"""Langevin inference, the latent bank and Algorithm 1's learner step (issue: core)."""

import pytest
import torch

import pipeline
from pipeline.learning import ABPLearner, LangevinDivergenceError, LatentBank, langevin_infer, posterior_energy
from pipeline.learning.learner import generate, reconstruct


def _small_cfg(*overrides):
    # The tiny preset narrowed further so CPU tests take seconds.
    return pipeline.load_config("tiny", ["model.fc_channels=64", "model.widths=[32, 16, 8]", *overrides])


def test_langevin_lowers_energy_and_leaves_parameter_grads_untouched():
    cfg = _small_cfg()
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    z_true = torch.randn(16, cfg.model.latent_dim)
    with torch.no_grad():
        y = generator(z_true)
    for p in generator.parameters():
        p.grad = torch.full_like(p, 7.0)  # sentinel: must be left as is
    z0 = torch.randn(16, cfg.model.latent_dim) * 3  # far from the posterior
    result = langevin_infer(generator, z0, y, steps=30, step_size=0.1, noise_sigma=0.3)
    before = posterior_energy(generator, z0, y, 0.3).detach()
    after = posterior_energy(generator, result.z, y, 0.3).detach()
    assert after.mean() < before.mean()
    assert (after < before).float().mean() > 0.8
    assert all(torch.all(p.grad == 7.0) for p in generator.parameters())
    assert all(p.requires_grad for p in generator.parameters())


def test_langevin_divergence_raises_with_step_and_settings():
    cfg = _small_cfg()
    generator = pipeline.build_generator(cfg)
    y = torch.zeros(2, 3, 32, 32)
    z0 = torch.full((2, cfg.model.latent_dim), 1e30)
    with pytest.raises(LangevinDivergenceError, match=r"step 1 of 5 .*step_size=100"):
        langevin_infer(generator, z0, y, steps=5, step_size=100.0, noise_sigma=0.3)


def test_langevin_backoff_halves_step_size():
    cfg = _small_cfg()
    generator = pipeline.build_generator(cfg)
    y = torch.rand(2, 3, 32, 32)
    z0 = torch.randn(2, cfg.model.latent_dim)
    # 1e25 overflows float32 in the drift term; halving 100 times is not possible, so it must raise
    # after max_backoffs, naming them.
    with pytest.raises(LangevinDivergenceError, match="after 2 back-offs"):
        langevin_infer(generator, z0 * 1e25, y, steps=3, step_size=1e18, noise_sigma=1e-3,
                       on_divergence="backoff", max_backoffs=2)


def test_latent_bank_parquet_round_trip_is_bit_exact(tmp_path):
    bank = LatentBank(100_000, 100, seed=3)
    bank.scatter(torch.tensor([5, 99_999]), torch.randn(2, 100))
    path = tmp_path / "latents.parquet"
    bank.save(str(path))
    assert path.stat().st_size < 50e6
    loaded = LatentBank.load(str(path))
    assert loaded.z.shape == (100_000, 100)
    assert torch.equal(loaded.z, bank.z)


def test_one_learner_step_paper64_batch2():
    cfg = pipeline.load_config("paper64", ["langevin.steps=2"])
    torch.manual_seed(0)
    generator, critic = pipeline.build_generator(cfg), pipeline.build_critic(cfg)
    bank = LatentBank(10, cfg.model.latent_dim)
    learner = ABPLearner(cfg, generator, critic, bank, torch.device("cpu"))
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_c = [p.detach().clone() for p in critic.parameters()]
    z_before = bank.z.clone()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    metrics = learner.step(torch.tensor([3, 7]), images).as_floats()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_c, critic.parameters()))
    changed = (bank.z != z_before).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [3, 7]


def test_pure_abp_skips_the_critic():
    cfg = _small_cfg("training.critic_weight=0", "langevin.steps=2")
    generator, critic = pipeline.build_generator(cfg), pipeline.build_critic(cfg)
    learner = ABPLearner(cfg, generator, critic, LatentBank(4, cfg.model.latent_dim), torch.device("cpu"))
    before = [p.detach().clone() for p in critic.parameters()]
    learner.step(torch.arange(4), torch.rand(4, 3, 32, 32))
    assert learner.critic is None
    assert all(torch.equal(a, b) for a, b in zip(before, critic.parameters()))


def _squares(n=32, size=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), -0.5)
    for i in range(n):
        x, y = torch.randint(0, size - 12, (2,), generator=gen).tolist()
        images[i, :, y:y + 12, x:x + 12] = (torch.rand(3, generator=gen) * 2 - 1)[:, None, None]
    return images


def test_overfit_32_images_reconstruction_mse_below_threshold():
    """On 32 images of coloured squares, per-pixel MSE (images in [-1, 1]) falls below 0.12 within
    150 Algorithm 1 iterations (measured: about 70); at initialisation it is above 0.3."""
    cfg = _small_cfg("training.critic_weight=0", "training.seed=0", "training.generator_lr=0.002", "langevin.steps=5")
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    learner = ABPLearner(cfg, generator, None, LatentBank(32, cfg.model.latent_dim), torch.device("cpu"))
    images = _squares()
    indices = torch.arange(32)
    first = learner.step(indices, images).as_floats()["reconstruction_mse"]
    mse = first
    for _ in range(149):
        mse = learner.step(indices, images).as_floats()["reconstruction_mse"]
        if mse < 0.12:
            break
    assert first > 0.3
    assert mse < 0.12


def test_generator_weight_decay_shrinks_weights_not_biases():
    """One step with lr * decay = 0.5 and the same gradients: every weight tensor is the no-decay result
    minus 0.5 x its starting value; biases are the same in both runs."""

    def one_step(decay):
        cfg = _small_cfg("training.critic_weight=0", "langevin.steps=2", "training.generator_lr=0.01",
                         f"training.generator_weight_decay={decay}")
        torch.manual_seed(0)
        generator = pipeline.build_generator(cfg)
        learner = ABPLearner(cfg, generator, None, LatentBank(4, cfg.model.latent_dim), torch.device("cpu"))
        learner.step(torch.arange(4), _squares(4))
        return dict(generator.named_parameters())

    plain, decayed = one_step(0), one_step(50)
    torch.manual_seed(0)
    start = dict(pipeline.build_generator(_small_cfg()).named_parameters())
    for name, p in plain.items():
        if p.ndim > 1:
            # AdamW: w <- w (1 - lr * decay) - lr * adam_update; the Adam update is the same in both runs.
            expected = p.detach() - 0.5 * start[name].detach()
            assert torch.allclose(decayed[name].detach(), expected, atol=1e-5), name
        else:
            assert torch.equal(decayed[name].detach(), p.detach()), name


def test_optimiser_state_from_before_weight_decay_still_resumes():
    """A checkpoint whose generator optimiser has one group in parameters() order (sessions before
    training.generator_weight_decay) loads into the two-group layout with each moment on its own tensor."""
    cfg = _small_cfg("training.critic_weight=0", "langevin.steps=2")
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    learner = ABPLearner(cfg, generator, None, LatentBank(4, cfg.model.latent_dim), torch.device("cpu"))
    learner.step(torch.arange(4), _squares(4))
    state = learner.state_dict()
    old = torch.optim.Adam(generator.parameters(), lr=cfg.training.generator_lr)
    for p in generator.parameters():
        p.grad = torch.full_like(p, float(p.numel()))  # a moment that names its tensor by size
    old.step()
    state["generator_optimizer"] = old.state_dict()
    learner.load_state_dict(state)
    for p in generator.parameters():
        assert torch.allclose(learner.generator_optimizer.state[p]["exp_avg_sq"],
                              old.state[p]["exp_avg_sq"]), p.shape
    assert learner.generator_optimizer.param_groups[1]["weight_decay"] == 0.0


def test_resumed_run_takes_weight_decay_from_its_config_for_kernels_only():
    """A checkpoint saved at decay 0.5 resumed with decay 0.1: the group of kernels (ndim > 1) gets 0.1,
    the group of biases keeps 0, whichever position each group has in the saved state."""
    def learner_with(decay):
        cfg = _small_cfg("training.critic_weight=0", "langevin.steps=2", f"training.generator_weight_decay={decay}")
        torch.manual_seed(0)
        generator = pipeline.build_generator(cfg)
        return ABPLearner(cfg, generator, None, LatentBank(4, cfg.model.latent_dim), torch.device("cpu"))

    saved = learner_with(0.5)
    saved.step(torch.arange(4), _squares(4))
    state = saved.state_dict()
    groups = state["generator_optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    for order in (1, -1):  # the saved order, then biases first: decay must follow contents, not position
        resumed = learner_with(0.1)
        current = resumed.generator_optimizer.param_groups
        resumed.generator_optimizer = torch.optim.Adam([{"params": g["params"]} for g in current[::order]],
                                                       decoupled_weight_decay=True)
        resumed.load_state_dict({**state, "generator_optimizer": {**state["generator_optimizer"],
                                                                  "param_groups": groups[::order]}})
        for group in resumed.generator_optimizer.param_groups:
            kernels = all(p.ndim > 1 for p in group["params"])
            assert group["weight_decay"] == (0.1 if kernels else 0.0)


def test_generator_weight_decay_is_validated():
    with pytest.raises(pipeline.ConfigError, match="generator_weight_decay"):
        _small_cfg("training.generator_weight_decay=-1")


def test_learner_is_reproducible_from_seed():
    def run():
        cfg = _small_cfg("langevin.steps=3")
        torch.manual_seed(0)
        generator, critic = pipeline.build_generator(cfg), pipeline.build_critic(cfg)
        learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
        for _ in range(2):
            learner.step(torch.arange(8), _squares(8))
        return learner.bank.z.clone(), [p.detach().clone() for p in generator.parameters()]

    (z1, p1), (z2, p2) = run(), run()
    assert torch.equal(z1, z2) and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_reconstruct_and_generate_shapes():
    cfg = _small_cfg("langevin.steps=3", "evaluation.inference_steps=3")
    generator = pipeline.build_generator(cfg)
    z, recon = reconstruct(generator, _squares(4), cfg)
    assert z.shape == (4, cfg.model.latent_dim) and recon.shape == (4, 3, 32, 32)
    samples = generate(generator, 5, cfg, seed=1)
    assert samples.shape == (5, 3, 32, 32) and samples.abs().max() <= 1


def test_critic_energy_penalty_is_added_to_eq21_and_keeps_energies_bounded():
    # critic_lr 3e-3 is ~4x the default, so energies drift fast: without the penalty they pass 1e8 in these 25
    # steps (standard weights); with it they stay within a few units.
    cfg = _small_cfg("langevin.steps=2", "training.critic_energy_l2=1.0", "training.critic_lr=3e-3")
    torch.manual_seed(0)
    generator, critic = pipeline.build_generator(cfg), pipeline.build_critic(cfg)
    learner = ABPLearner(cfg, generator, critic, LatentBank(16, cfg.model.latent_dim), torch.device("cpu"))
    images = _squares(16)
    for _ in range(25):
        metrics = learner.step(torch.arange(16), images).as_floats()
    eq21 = metrics["energy_observed"] - metrics["energy_synthesized"]
    assert metrics["critic_loss"] > eq21  # the penalty is non-negative and present
    assert abs(metrics["energy_observed"]) < 5 and abs(metrics["energy_synthesized"]) < 5
    assert metrics["energy_observed"] < metrics["energy_synthesized"]  # the critic still separates them


# --- inference of unseen images (evaluation.inference_*) ----------------------------------------------------


def _smooth_generator(cfg, n=8, seed=0):
    """g(Z) = tanh(W Z + b) as 3x32x32 images, and n images it produces exactly, g(Z*) with Z* ~ N(0, I).

    A randomly initialised SparseGenerator is no test bed for inference: its output barely depends on Z
    and its top-k makes the energy piecewise, so longer chains from the prior were measured to *raise* the
    MSE there. This generator has a smooth, well-conditioned posterior, where a longer chain must help.
    """
    torch.manual_seed(seed)
    generator = torch.nn.Sequential(torch.nn.Linear(cfg.model.latent_dim, 3 * 32 * 32), torch.nn.Tanh(),
                                    torch.nn.Unflatten(1, (3, 32, 32)))
    with torch.no_grad():
        generator[0].weight.normal_(0, 0.3 / cfg.model.latent_dim**0.5)
        images = generator(torch.randn(n, cfg.model.latent_dim))
    return generator, images


def test_more_inference_steps_reduce_reconstruction_error():
    # sigma = 0.3, delta = 0.1: the largest curvature of this energy is then ~100, so delta^2 / 2 * 100 < 2
    # keeps gradient steps stable.
    cfg = _small_cfg("langevin.step_size=0.1", "langevin.noise_sigma=0.3")
    generator, images = _smooth_generator(cfg)

    def mse(steps, quiet):
        _, recon = reconstruct(generator, images, cfg, steps=steps, noise_free_steps=quiet, seed=3)
        return float((recon - images).pow(2).mean())

    closing = {steps: mse(steps, 20) for steps in (2, 10, 50)}
    assert closing[50] < closing[10] < closing[2]
    noisy = {steps: mse(steps, 0) for steps in (2, 10)}
    assert noisy[10] < noisy[2]
    # A noisy end keeps the posterior spread (measured ~1.3e-3, about d * sigma^2 / D); the noise-free
    # closing reaches the mode (~1e-5).
    assert closing[50] < 0.1 * mse(50, 0)
    # Without steps the configured chain runs (100 steps, the last 20 noise-free).
    _, recon = reconstruct(generator, images, cfg, seed=3)
    assert float((recon - images).pow(2).mean()) < closing[10]


def test_noise_free_closing_returns_z_without_the_last_kick():
    cfg = _small_cfg()
    generator, images = _smooth_generator(cfg, n=4)
    z0 = torch.randn(4, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1))

    def chain(steps, quiet, rng_seed):
        return langevin_infer(generator, z0, images, steps=steps, step_size=0.1, noise_sigma=0.3,
                              noise_free_steps=quiet, generator_rng=torch.Generator().manual_seed(rng_seed)).z

    # All steps noise-free: deterministic given z0, whatever the RNG.
    assert torch.equal(chain(6, 6, 0), chain(6, 6, 1))
    # Plain Langevin (the training default) does depend on the noise.
    assert not torch.allclose(chain(6, 0, 0), chain(6, 0, 1))
    # One noise-free closing step = 5 Langevin steps with the same noise, then a plain gradient step.
    before = chain(5, 0, 7).requires_grad_(True)
    (grad,) = torch.autograd.grad(posterior_energy(generator, before, images, 0.3).sum(), before)
    expected = before.detach() - (0.1**2 / 2) * grad
    torch.testing.assert_close(chain(6, 1, 7), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise_free_steps"):
        chain(3, 4, 0)


def test_infer_latents_passes_each_inference_setting(monkeypatch):
    import types

    import pipeline.learning.learner as learner_module

    seen = {}

    def spy(generator, z, y, **options):  # records the chain's settings instead of running it
        seen.clear()
        seen.update(options)
        return types.SimpleNamespace(z=z)

    monkeypatch.setattr(learner_module, "langevin_infer", spy)
    cfg = _small_cfg("evaluation.inference_steps=7", "evaluation.inference_noise_free_steps=3",
                     "evaluation.inference_step_size=0.1")
    generator, images = _smooth_generator(cfg, n=2)
    learner_module.infer_latents(generator, images, cfg)
    assert (seen["steps"], seen["noise_free_steps"], seen["step_size"]) == (7, 3, 0.1)
    assert seen["noise_sigma"] == cfg.langevin.noise_sigma  # the posterior stays the one trained on
    # Explicit arguments override; a shorter chain than the closing is noise-free throughout.
    learner_module.infer_latents(generator, images, cfg, steps=2)
    assert (seen["steps"], seen["noise_free_steps"]) == (2, 2)
    learner_module.infer_latents(generator, images, cfg, steps=5, noise_free_steps=0, step_size=0.2)
    assert (seen["steps"], seen["noise_free_steps"], seen["step_size"]) == (5, 0, 0.2)
    # Without evaluation.inference_step_size the training step size is used.
    learner_module.infer_latents(generator, images, _small_cfg("langevin.step_size=0.25"))
    assert seen["step_size"] == 0.25 and seen["steps"] == 100
    with pytest.raises(ValueError, match="positive"):
        learner_module.infer_latents(generator, images, cfg, steps=0)


def test_inference_step_size_changes_the_result():
    generator, images = _smooth_generator(_small_cfg(), n=2)
    small = reconstruct(generator, images, _small_cfg("langevin.noise_sigma=0.3", "evaluation.inference_step_size=0.05"),
                        steps=5)[0]
    large = reconstruct(generator, images, _small_cfg("langevin.noise_sigma=0.3", "evaluation.inference_step_size=0.1"),
                        steps=5)[0]
    assert not torch.allclose(small, large)


def test_generate_in_batches_is_the_same_as_at_once():
    cfg = _small_cfg()
    generator = pipeline.build_generator(cfg).eval()
    torch.testing.assert_close(generate(generator, 7, cfg, seed=2, batch_size=3), generate(generator, 7, cfg, seed=2))


def _step_gradient_reference(cfg, weight):
    """One learner step with the given critic weight; returns (metrics, the parameter gradients it applied)."""
    torch.manual_seed(0)
    generator, critic = pipeline.build_generator(cfg), pipeline.build_critic(cfg)
    learner = ABPLearner(cfg, generator, critic, LatentBank(4, cfg.model.latent_dim), torch.device("cpu"))
    learner.generator_optimizer.step = lambda: None  # keep .grad, leave Theta as it is
    metrics = learner.step(torch.arange(4), torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    return metrics.as_floats(), [p.grad.clone() for p in generator.parameters()]


def test_step3_gradient_norms_of_eq15_and_eq20():
    """grad_norm_reconstruction / grad_norm_critic are the norms of Step 3's two gradient terms at Theta, and
    the gradient applied is their sum (the critic term reaches Theta through the same backward)."""
    cfg_off = _small_cfg("langevin.steps=2", "training.critic_weight=0")
    off, grads_off = _step_gradient_reference(cfg_off, 0.0)
    total_off = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_off]))
    assert off["grad_norm_critic"] == 0.0
    assert off["grad_norm_reconstruction"] == pytest.approx(float(total_off), rel=1e-5)

    cfg_on = _small_cfg("langevin.steps=2", "training.critic_weight=1000")
    on, grads_on = _step_gradient_reference(cfg_on, 1000.0)
    assert on["grad_norm_critic"] > 0.0
    # Same seed, same Theta, same Langevin noise: Eq. 15's gradient is the one the critic-free step applied.
    assert on["grad_norm_reconstruction"] == pytest.approx(off["grad_norm_reconstruction"], rel=1e-4)
    total_on = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_on])))
    # The applied gradient is the sum of the two terms: triangle inequality, and it differs from Eq. 15 alone.
    assert total_on <= on["grad_norm_reconstruction"] + on["grad_norm_critic"] + 1e-3
    assert total_on >= abs(on["grad_norm_reconstruction"] - on["grad_norm_critic"]) - 1e-3
