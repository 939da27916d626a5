"""Every config setting does something: one test per setting that no other test names, each set through
``load_config`` overrides (the path users take) and checked by its effect, not by its value being stored."""

import math

import pytest
import torch

import pipeline
from pipeline.learning import ABPLearner, LatentBank, langevin_infer
from pipeline.learning.langevin import chain_options
from pipeline.learning.learner import autocast_dtype
from pipeline.model import describe_layers
from tests.test_eval_fixtures import demo_data  # noqa: F401 - fixture


def _cfg(*overrides):
    return pipeline.load_config("tiny", ["model.fc_channels=64", "model.widths=[32, 16, 8]", *overrides])


# --- model -----------------------------------------------------------------------------------------------

def test_convs_per_block_sets_the_convs_of_every_generator_block():
    for n in (1, 3):
        cfg = _cfg(f"model.convs_per_block={n}")
        generator = pipeline.build_generator(cfg)
        assert [len(block) for block in generator.blocks] == [n, n, n]
        assert generator(torch.randn(2, cfg.model.latent_dim)).shape == (2, 3, 32, 32)
        convs = [layer["name"] for layer in describe_layers(cfg)["generator"] if ".conv" in layer["name"]]
        assert len(convs) == 3 * n


def test_sparsity_ties_keep_retains_tied_units_and_exact_keeps_k():
    counts = {}
    for rule in ("keep", "exact"):
        cfg = _cfg(f"model.sparsity_ties={rule}", "model.sparsity.conv8=16")
        generator = pipeline.build_generator(cfg).eval()
        last = generator.blocks[0][-1]  # conv8's sparsified conv: a constant map ties all 64 positions
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(1.0)
            _, activations = generator(torch.randn(3, cfg.model.latent_dim), return_activations=True)
        counts[rule] = (activations["conv8"] > 0).flatten(2).sum(2)  # (sample, channel)
    assert torch.all(counts["keep"] == 64)
    assert torch.all(counts["exact"] == 16)


def test_critic_first_width_and_convs_per_block_shape_the_critic():
    cfg = _cfg("model.critic_first_width=8", "model.critic_convs_per_block=3")
    critic = pipeline.build_critic(cfg)
    assert critic.stem.weight.shape[0] == 8
    assert critic.blocks[0][0].weight.shape[1] == 8
    assert [len(block) for block in critic.blocks] == [3] * len(cfg.model.critic_widths)
    assert critic(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_leaky_relu_slope_one_makes_the_critic_affine():
    a, b = torch.randn(2, 2, 3, 32, 32)
    zero = torch.zeros_like(a)

    def affine_defect(slope):
        cfg = _cfg(f"model.leaky_relu_slope={slope}")
        torch.manual_seed(0)
        critic = pipeline.build_critic(cfg)
        with torch.no_grad():  # f(a + b) - f(0) = (f(a) - f(0)) + (f(b) - f(0)) for all a, b only if f is affine
            f0 = critic(zero)
            return ((critic(a + b) - f0) - (critic(a) - f0) - (critic(b) - f0)).abs().max().item()

    assert affine_defect(1.0) < 1e-4
    assert affine_defect(0.2) > 1e-3


# --- Langevin and the optimisers -------------------------------------------------------------------------

def test_grad_clip_norm_bounds_each_examples_drift():
    torch.manual_seed(0)
    generator = pipeline.build_generator(_cfg())
    y = torch.rand(4, 3, 32, 32) * 2 - 1
    z0 = torch.randn(4, 32)  # one noise-free step moves Z by (delta^2 / 2) x the (clipped) drift
    moves = {}
    for clip in ("null", "0.001"):
        options = chain_options(_cfg(f"langevin.grad_clip_norm={clip}").langevin)
        options["steps"] = 1
        result = langevin_infer(generator, z0, y, **options, noise_free_steps=1)
        moves[clip] = (result.z - z0).norm(dim=1)
    delta = _cfg().langevin.step_size
    assert torch.all(moves["0.001"] <= delta**2 / 2 * 0.001 * 1.02)  # float32 rounding of Z ~ 1 + 5e-6
    assert torch.all(moves["null"] > 100 * moves["0.001"])


def _learner(*overrides):
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    return ABPLearner(cfg, pipeline.build_generator(cfg), pipeline.build_critic(cfg), LatentBank(8, 32, seed=0),
                      torch.device("cpu"))


def test_adam_betas_of_generator_and_critic_come_from_the_config():
    learner = _learner("training.generator_betas=[0.3, 0.9]", "training.critic_betas=[0.1, 0.8]")
    assert all(group["betas"] == (0.3, 0.9) for group in learner.generator_optimizer.param_groups)
    assert all(group["betas"] == (0.1, 0.8) for group in learner.critic_optimizer.param_groups)
    # Adam's second step depends on the betas (its first is bias-corrected to the same size for any betas).
    parameters = {}
    for betas in ("[0.0, 0.99]", "[0.9, 0.999]"):
        learner = _learner(f"training.generator_betas={betas}", "training.critic_weight=0")
        images = torch.rand(4, 3, 32, 32) * 2 - 1
        for _ in range(2):
            learner.step(torch.arange(4), images)
        parameters[betas] = torch.cat([p.detach().flatten() for p in learner.generator.parameters()])
    assert not torch.allclose(parameters["[0.0, 0.99]"], parameters["[0.9, 0.999]"])


def test_lr_decay_per_epoch_scales_both_learning_rates_per_whole_epoch():
    learner = _learner("training.lr_decay_per_epoch=0.5", "training.generator_lr=0.001", "training.critic_lr=0.002")
    learner.set_epoch(3.7)
    assert all(math.isclose(g["lr"], 0.001 * 0.5**3) for g in learner.generator_optimizer.param_groups)
    assert all(math.isclose(g["lr"], 0.002 * 0.5**3) for g in learner.critic_optimizer.param_groups)


def test_precision_chooses_the_autocast_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(_cfg("training.precision=auto"), cpu) is None
    assert autocast_dtype(_cfg("training.precision=auto"), cuda) is torch.bfloat16
    assert autocast_dtype(_cfg("training.precision=fp32"), cuda) is None
    assert autocast_dtype(_cfg("training.precision=bf16"), cpu) is torch.bfloat16
    # bf16 on CPU runs a whole step of Algorithm 1 and moves the generator.
    learner = _learner("training.precision=bf16")
    before = [p.detach().clone() for p in learner.generator.parameters()]
    metrics = learner.step(torch.arange(4), torch.rand(4, 3, 32, 32) * 2 - 1).as_floats()
    assert math.isfinite(metrics["generator_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.generator.parameters()))
    with pytest.raises(pipeline.ConfigError, match="precision"):
        _cfg("training.precision=fp16")


# --- evaluation --------------------------------------------------------------------------------------------

def _evaluate(cfg, data, metrics, out_dir):
    from pipeline.evaluation.orchestration import evaluate

    torch.manual_seed(0)
    return evaluate(cfg, pipeline.build_generator(cfg), data, metrics, out_dir=out_dir, progress=False)


def test_matching_layer_chooses_the_scored_layer(demo_data, tmp_path):  # noqa: F811 - fixture
    cfg = _cfg("evaluation.matching_layer=conv16", "evaluation.matching_images=10")
    metrics, artifacts = _evaluate(cfg, demo_data, ["matching"], tmp_path)
    assert math.isfinite(metrics["matching_score_conv16"])
    assert not any(name.endswith("conv8") for name in metrics)
    # The reference points are scored in that layer's boxes too (demo data has a holdout split).
    assert {"matching_reference_blob_conv16", "matching_reference_holdout_conv16"} <= set(metrics)
    assert all(-1 <= metrics[f"matching_reference_{k}_conv16"] <= 1 for k in ("blob", "holdout"))


def test_fid_samples_and_inception_weights_reach_fid(demo_data, tmp_path, monkeypatch):  # noqa: F811 - fixture
    import json

    from pipeline.evaluation import inception
    from tests.test_eval_fid import TinyFeatures

    monkeypatch.setenv("SPARSEGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    missing = str(tmp_path / "no-such-inception.pth")
    metrics, artifacts = _evaluate(_cfg(f"evaluation.inception_weights={missing}"), demo_data, ["fid"], tmp_path / "a")
    assert "fid" not in metrics
    assert missing in json.loads(open(artifacts["summary"]).read())["unavailable"]["fid"]

    seen = []
    monkeypatch.setattr(inception, "load_inception",
                        lambda weights, device="cpu": (seen.append(weights), (TinyFeatures(), "cd" * 32))[1])
    metrics, _ = _evaluate(_cfg("evaluation.fid_samples=5", "evaluation.inception_weights=/w/x.pth"), demo_data,
                           ["fid"], tmp_path / "b")
    assert seen == ["/w/x.pth"] and metrics["fid_generated_samples"] == 5
