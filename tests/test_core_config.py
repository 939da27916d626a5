"""Configuration: presets, YAML, overrides and one clear message per mistake (issue: core)."""

import json
import subprocess
import sys

import pytest

import pipeline
from pipeline.config import ConfigError, config_from_dict


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sparsity.conv8=65"], "k=65 is larger than the layer (64 H*W positions)"),
        (["model.sparsity.conv16=1.5"], "fraction 1.5 is outside (0, 1]"),
        (["model.sparsity.conv16=0.0"], "fraction 0.0 is outside (0, 1]"),
        (["langevin.steps=0"], "langevin.steps: must be a positive number of Langevin steps"),
        (["langevin.step_size=-0.1"], "langevin.step_size: must be positive"),
        (["model.resolution=48"], "48 cannot be produced by this architecture"),
        (["model.resolution=128"], "resolution 128 needs 5 upsampling blocks"),
        (["langevin.stpes=3"], "did you mean 'langevin.steps'?"),
        (["model.sparsity.conv9=3"], "did you mean 'conv8'?"),
        (["training.batch_size=ten"], "training.batch_size: 'ten' is not a valid int"),
        (["evaluation.inference_steps=0"], "evaluation.inference_steps: must be a positive number of Langevin steps"),
        (["evaluation.inference_noise_free_steps=-1"], "evaluation.inference_noise_free_steps: must be >= 0"),
        (["evaluation.inference_step_size=0.0"], "evaluation.inference_step_size: must be positive or null"),
        (["evaluation.swd_images=0"], "evaluation.swd_images: must be positive"),
        (["evaluation.at_end=[swd, fdi]"], "unknown evaluation.at_end metric 'fdi'; did you mean 'fid'?"),
        (["training.max_train_minutes=0"], "training.max_train_minutes: must be positive or null, got 0"),
    ],
)
def test_each_mistake_has_its_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        pipeline.load_config("paper64", overrides)
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_all_mistakes_reported_together():
    with pytest.raises(ConfigError) as info:
        pipeline.load_config("paper64", ["langevin.steps=0", "langevin.step_size=0"])
    assert len(info.value.problems) == 2


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'paper64'"):
        pipeline.load_config("paper46")


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nlangevin:\n  steps: 7\nmodel:\n  sparsity:\n    conv8: 0.5\n")
    cfg = pipeline.load_config(str(path), ["training.batch_size=4"])
    assert cfg.preset == "tiny" and cfg.langevin.steps == 7 and cfg.training.batch_size == 4
    assert cfg.model.sparsity["conv8"] == 0.5 and cfg.model.sparsity["fc4"] == 16
    assert cfg.resolved_k("conv8") == 32


def test_resolutions_32_64_128():
    for resolution, widths in ((32, "[64, 32, 16]"), (64, "[64, 32, 16, 8]"), (128, "[64, 32, 16, 8, 8]")):
        cfg = pipeline.load_config(
            "tiny",
            [f"model.resolution={resolution}", f"model.widths={widths}", f"model.critic_widths={widths}",
             "model.sparsity={fc4: 8}"],
        )
        import torch

        images = pipeline.build_generator(cfg)(torch.randn(1, cfg.model.latent_dim))
        assert images.shape[-1] == resolution


def test_config_round_trips_through_dict():
    cfg = pipeline.load_config("celeba64", ["langevin.steps=11"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.data.limit == 10_000


def test_dry_run_reports_table1():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--preset", "paper64", "--dry-run", "--json"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    layers = {layer["name"]: layer for layer in report["layers"]["generator"]}
    assert layers["fc4"]["output_shape"] == [3200, 4, 4] and layers["fc4"]["k"] == 8
    assert layers["conv8.conv1"]["output_shape"] == [512, 8, 8] and layers["conv8.conv1"]["k"] == 16
    assert layers["conv16.conv1"]["output_shape"] == [256, 16, 16] and layers["conv16.conv1"]["k"] == 64
    assert layers["conv32.conv1"]["output_shape"] == [128, 32, 32] and layers["conv32.conv1"]["k"] == 256
    assert layers["conv64.conv1"]["output_shape"] == [64, 64, 64] and layers["conv64.conv1"]["k"] is None
    assert layers["to_rgb"]["output_shape"] == [3, 64, 64]
    critic = report["layers"]["critic"]
    assert critic[0]["output_shape"] == [64, 64, 64] and critic[-1]["output_shape"] == [1]
    assert report["config"]["langevin"]["steps"] == 30


def test_dry_run_bad_override_exits_2():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--preset", "tiny", "--set", "langevin.steps=-1", "--dry-run"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2 and "langevin.steps" in out.stderr


def test_inference_and_swd_keys_have_defaults_and_accept_valid_values():
    cfg = pipeline.load_config("tiny")
    e = cfg.evaluation
    assert (e.inference_steps, e.inference_noise_free_steps, e.inference_step_size, e.swd_images) == (100, 20, None, 1000)
    # A closing longer than the chain is allowed: the whole (e.g. shortened) chain is then noise-free.
    cfg = pipeline.load_config("tiny", ["evaluation.at_end=[mse, swd]", "evaluation.inference_steps=5",
                                        "evaluation.inference_noise_free_steps=20", "evaluation.inference_step_size=0.1"])
    assert cfg.evaluation.at_end == ["mse", "swd"] and cfg.evaluation.inference_step_size == 0.1


def test_an_int_is_accepted_for_an_optional_float_and_becomes_a_float():
    cfg = pipeline.load_config("tiny", ["evaluation.inference_step_size=1", "training.max_steps=5"])
    assert cfg.evaluation.inference_step_size == 1.0 and isinstance(cfg.evaluation.inference_step_size, float)
    assert cfg.training.max_steps == 5 and isinstance(cfg.training.max_steps, int)


def test_an_exponent_without_a_dot_is_a_float_in_overrides_and_yaml(tmp_path):
    # PyYAML (YAML 1.1) reads "2e-3" as a string; a learning rate is written that way.
    cfg = pipeline.load_config("tiny", ["training.generator_lr=2e-3", "evaluation.inference_step_size=1e-1"])
    assert cfg.training.generator_lr == 0.002 and cfg.evaluation.inference_step_size == 0.1
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntraining:\n  critic_lr: 5e-4\n")
    assert pipeline.load_config(str(path)).training.critic_lr == 0.0005
    with pytest.raises(pipeline.ConfigError, match="training.generator_lr: '2e-3x' is not a valid float"):
        pipeline.load_config("tiny", ["training.generator_lr=2e-3x"])
    # Where a string is expected, it stays a string.
    assert pipeline.load_config("tiny", ["run.name=1e3"]).run.name == "1e3"


def test_mlflow_checkpoint_labels_are_validated():
    with pytest.raises(pipeline.ConfigError, match="run.mlflow_checkpoints: 'latest' is not one of final, best"):
        pipeline.load_config("tiny", ["run.mlflow_checkpoints=[latest]"])
    assert pipeline.load_config("tiny", ["run.mlflow_checkpoints=[]"]).run.mlflow_checkpoints == []


def test_a_saved_config_with_removed_keys_still_loads():
    saved = pipeline.load_config("tiny").to_dict()
    saved["training"].update({"device": "auto", "critic_reference_sigma": 0.016})
    assert config_from_dict(saved).training.batch_size == 32
    saved["training"]["no_such_key"] = 1
    with pytest.raises(ConfigError, match="no_such_key"):
        config_from_dict(saved)
