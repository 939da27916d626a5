"""`sparsegen ablation` (Table 4 as one command): two arms trained on Ray Train, evaluated, tabulated, logged."""

import json
import math

import pytest

from pipeline.config import EvaluationConfig, load_config
from tests.conftest import FAST_TRAINING_OVERRIDES

# A handful of steps, few Langevin steps, small evaluation sizes: seconds per arm on 2 cores.
ABLATION_OVERRIDES = [*FAST_TRAINING_OVERRIDES, "langevin.steps=2", "evaluation.matching_images=16",
                      "evaluation.mse_images=8"]
if "inference_steps" in EvaluationConfig.__dataclass_fields__:  # evaluation's own (longer) Langevin chain
    ABLATION_OVERRIDES += ["evaluation.inference_steps=2", "evaluation.inference_noise_free_steps=1"]
if "swd_images" in EvaluationConfig.__dataclass_fields__:
    ABLATION_OVERRIDES += ["evaluation.swd_images=8"]


def _sets(overrides):
    return sum((["--set", o] for o in overrides), [])


@pytest.mark.ray
def test_ablation_two_arms_table_json_and_mlflow(ray_session, demo_shards, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.tracking import mlflow_run

    workdir = tmp_path / "work"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(["ablation", "--preset", "tiny", "--data", demo_shards, "--arms", "sparse,dense", "--max-steps", "4",
                 "--workers", "1", "--name", "abl", "--workdir", str(workdir), "--tracking-uri", uri, "--json",
                 *_sets(ABLATION_OVERRIDES)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])

    # -- the JSON: both arms and both untrained initialisations, every metric finite -------------------------
    assert set(summary["arms"]) == {"sparse", "dense"} and set(summary["untrained"]) == {"sparse", "dense"}
    expected = {"holdout_mse_pm1", "matching_score_conv8", "matching_score_conv8_image_mean",
                "matching_score_conv8_field", "matching_score_conv8_field_image_mean", "matching_channels_conv8",
                "matching_reference_blob_conv8", "matching_reference_holdout_conv8", "parts_purity_conv8", "parts_purity_chance_conv8", "parts_nmi_conv8"}
    from pipeline.evaluation.orchestration import METRICS

    if "swd" in METRICS:
        expected.add("swd")
    for group in ("arms", "untrained"):
        for arm, metrics in summary[group].items():
            assert expected <= set(metrics), (group, arm, expected - set(metrics))
            for name, value in metrics.items():
                assert value is not None and math.isfinite(value), (group, arm, name, value)
    assert set(summary["ratios"]) == {"sparse/dense", "untrained-sparse/untrained-dense"}
    for pair, ratios in summary["ratios"].items():
        assert {"matching_score_conv8", "parts_nmi_conv8", "holdout_mse_pm1"} <= set(ratios)
        for name, value in ratios.items():
            assert value is not None and math.isfinite(value) and value > 0, (pair, name, value)
        a, b = pair.split("/")
        rows = {**summary["arms"], **{f"untrained-{k}": v for k, v in summary["untrained"].items()}}
        assert ratios["holdout_mse_pm1"] == pytest.approx(rows[a]["holdout_mse_pm1"] / rows[b]["holdout_mse_pm1"])
    assert summary["wall_time_s"] > 0 and summary["max_steps"] == 4 and summary["failed"] == {}
    # The printed table has every row.
    for row in ("sparse", "dense", "untrained-sparse", "untrained-dense", "sparse/dense"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), row

    # -- MLflow: the parent holds the table and the PNG; one nested child run per arm ------------------------
    client = mlflow_run.client(uri)
    parent_id = summary["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"ablation.json", "ablation.md", "basis_functions_conv8.png"} <= artifacts, artifacts
    logged = json.loads(open(client.download_artifacts(parent_id, "ablation.json")).read())
    assert logged["arms"] == summary["arms"] and logged["ratios"] == summary["ratios"]
    assert "untrained-dense" in open(client.download_artifacts(parent_id, "ablation.md")).read()
    assert "ratio.sparse_over_dense.matching_score_conv8" in parent.data.metrics

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{mlflow_run.PARENT_TAG}` = '{parent_id}'")
    by_arm = {run.data.tags["sparsegen.arm"]: run for run in children}
    assert set(by_arm) == {"sparse", "dense"}
    assert {arm: run.info.run_id for arm, run in by_arm.items()} == summary["child_runs"]
    for arm, run in by_arm.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["training.max_steps"] == "4" and run.data.params["training.seed"] == "0"
        for name in ("matching_score_conv8", "matching_score_conv8_field", "parts_nmi_conv8", "holdout_mse_pm1"):
            assert run.data.metrics[name] == pytest.approx(summary["arms"][arm][name])
            assert run.data.metrics[f"untrained_{name}"] == pytest.approx(summary["untrained"][arm][name])
    # The dense arm has no top-k anywhere and a fixed schedule; the sparse arm keeps the preset's k.
    assert by_arm["sparse"].data.params["model.sparsity.conv8"] == "16"
    assert by_arm["dense"].data.params["model.sparsity.conv8"] == ""
    assert by_arm["dense"].data.params["sparsity_schedule.kind"] == "fixed"


@pytest.mark.parametrize("argv, needle", [
    (["--arms", "sparse,sparce"], "unknown arm(s) 'sparce'; --arms takes a comma-separated list of sparse, dense, "
                                  "sparse-nocritic, dense-nocritic"),
    (["--preset", "tinny"], "did you mean 'tiny'?"),
    (["--set", "langevin.stepz=2"], "did you mean 'langevin.steps'?"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--data", "/nonexistent/shards"], "--data /nonexistent/shards does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    from pipeline.cli import main

    code = main(["ablation", "--workdir", str(tmp_path), *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsegen ablation: ") and needle in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_arms_make_the_dense_and_nocritic_configs():
    from pipeline.tuning.ablation import AblationSettings, compute_ratios, prepare

    plan = prepare(AblationSettings(name="x", arms=["dense-nocritic", "sparse", "sparse-nocritic"],
                                    overrides=["model.sparsity.conv16=32"], max_steps=3))
    configs = plan.configs
    assert all(cfg.model.sparsity[layer] is None for cfg in [configs["dense-nocritic"]]
               for layer in configs["dense-nocritic"].layer_names())
    assert configs["sparse"].model.sparsity["conv16"] == 32 and configs["sparse"].model.sparsity["conv8"] == 16
    assert configs["sparse-nocritic"].training.critic_weight == 0.0
    assert configs["sparse"].training.critic_weight == load_config("tiny").training.critic_weight > 0
    assert {cfg.training.max_steps for cfg in configs.values()} == {3}
    assert {cfg.training.seed for cfg in configs.values()} == {0}
    # The first arm of each sparsity pattern evaluates that pattern's untrained initialisation.
    assert plan.untrained_owner == {"dense": "dense-nocritic", "sparse": "sparse"}
    ratios = compute_ratios({"sparse-nocritic": {"holdout_mse_pm1": 0.2}, "dense-nocritic": {"holdout_mse_pm1": 0.4},
                             "sparse": {"holdout_mse_pm1": 0.1}}, {}, "conv8")
    assert ratios == {"sparse-nocritic/dense-nocritic": {"holdout_mse_pm1": 0.5}}
