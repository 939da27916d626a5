"""The MSE-vs-inference-steps curve (pipeline.evaluation.inference_curve) and its agreement with holdout MSE."""

import json

import pytest
import torch

from pipeline.evaluation.inference_curve import inference_curve, main, parse_int_list, parse_noise_free
from tests.test_eval_fixtures import demo_data, tiny_generator  # noqa: F401 - fixtures


def test_parsers():
    assert parse_int_list("10, 20,10", name="--steps") == [10, 20]
    with pytest.raises(ValueError, match="positive"):
        parse_int_list("0,5", name="--steps")
    assert parse_noise_free("0,cfg,all,cfg", configured=20) == [0, 20, "all"]
    with pytest.raises(ValueError, match="non-negative"):
        parse_noise_free("-1", configured=20)


def test_curve_rows_and_the_configured_point_equals_holdout_mse(demo_data, tiny_generator):
    from pipeline.evaluation.orchestration import holdout_mse, read_images

    cfg, generator = tiny_generator
    _, images = read_images(demo_data, "holdout", cfg.evaluation.mse_images, cfg.model.resolution)
    rows = inference_curve(generator, cfg, images, [2, 6], noise_free=[0, 4, "all"])
    # (2, 4) and (2, "all") are the same chain (clamped to 2 noise-free steps): measured once.
    assert [(r["steps"], r["noise_free_steps"]) for r in rows] == [(2, 0), (2, 2), (6, 0), (6, 4), (6, 6)]
    assert all(r["mse_pm1"] > 0 and r["mse_01"] == pytest.approx(r["mse_pm1"] / 4) for r in rows)
    reference = holdout_mse(generator, cfg, demo_data, num_images=cfg.evaluation.mse_images, steps=6,
                            noise_free_steps=4)
    assert rows[3]["mse_pm1"] == pytest.approx(reference["holdout_mse_pm1"], rel=1e-6)


def test_curve_command_on_a_checkpoint(demo_data, tiny_generator, tmp_path, capsys):
    from pipeline.distributed.checkpoint import write_checkpoint
    from pipeline.learning import LatentBank

    cfg, generator = tiny_generator
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, {"generator": generator.state_dict()},
                                  LatentBank(4, cfg.model.latent_dim), {"step": 0})
    code = main(["--checkpoint", checkpoint, "--data", demo_data, "--steps", "1,3", "--noise-free", "0,cfg",
                 "--images", "4", "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["steps"], r["noise_free_steps"]) for r in out["rows"]] == [(1, 0), (1, 1), (3, 0), (3, 3)]
    assert out["settings"]["images"] == 4 and out["settings"]["split"] == "holdout"
    assert main(["--checkpoint", str(tmp_path / "missing"), "--steps", "1"]) == 2


def test_langevin_step_rng_draws_match_with_and_without_a_noise_free_tail(tiny_generator):
    """A noise-free tail draws no random numbers, so chains of one seed share their noisy prefix: the
    curve's points differ by the chain's end only, not by a reshuffled noise sequence."""
    from pipeline.learning import langevin_infer

    cfg, generator = tiny_generator
    y = torch.zeros(2, 3, 32, 32)
    z0 = torch.zeros(2, cfg.model.latent_dim)
    rng = torch.Generator().manual_seed(0)
    langevin_infer(generator, z0, y, steps=4, step_size=0.3, noise_sigma=0.3, noise_free_steps=2, generator_rng=rng)
    after_two_draws = rng.get_state()
    rng2 = torch.Generator().manual_seed(0)
    langevin_infer(generator, z0, y, steps=2, step_size=0.3, noise_sigma=0.3, generator_rng=rng2)
    assert torch.equal(after_two_draws, rng2.get_state())
