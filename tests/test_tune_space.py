"""Search spaces, Pareto fronts and the search report: fast, no Ray."""

import json

import pytest
import yaml

from pipeline.tuning.report import best_trial, dominates, pareto_front
from pipeline.tuning.space import SpaceError, load_space, parse_space, shipped_spaces


@pytest.mark.parametrize("preset", ["tiny", "paper64"])
def test_shipped_spaces_are_valid(preset):
    assert {"paper", "cpu-small"} <= set(shipped_spaces())
    paper = load_space("paper", preset=preset)
    assert "langevin.steps" in paper.keys and any(k.startswith("model.sparsity.") for k in paper.keys)
    assert paper.metric == ["holdout_mse_pm1"]
    small = load_space("cpu-small", preset="tiny")
    assert {"sparsity_schedule.kind", "langevin.step_size", "langevin.noise_sigma", "training.critic_weight"} <= set(small.keys)


def test_malformed_space_reports_every_problem_at_once():
    raw = {
        "metric": "reconstruction_mse", "mode": "lowest", "schedule": "asha",
        "parameters": {
            "langevin.stepz": {"choice": [10, 20]},                  # unknown key
            "model.sparsity.conv8": {"choice": [8, 5000, 1.5]},      # k too large, fraction > 1
            "langevin.step_size": {"loguniform": [0, 0.5]},          # bad distribution bounds
            "training.critic_weight": {"normal": [0, 1]},            # unknown distribution
            "run.name": {"value": "x"},                              # not searchable
        },
    }
    with pytest.raises(SpaceError) as info:
        parse_space(raw, preset="tiny")
    text = str(info.value)
    assert "did you mean 'langevin.steps'" in text
    assert "k=5000 is larger than the layer" in text and "fraction 1.5 is outside (0, 1]" in text
    assert "loguniform needs low > 0" in text and "unknown distribution 'normal'" in text
    assert "did you mean 'scheduler'" in text and "unknown mode 'lowest'" in text
    assert "parameters.run.name: cannot be searched" in text
    assert len(info.value.problems) == 8


def test_space_modes_grid_and_overrides():
    space = parse_space({"metric": ["holdout_mse_pm1", "matching_score_conv8"], "mode": ["min", "max"],
                         "parameters": {"langevin.steps": {"choice": [3, 5]}, "model.sparsity.conv8": {"choice": [8, 0.25]}}})
    assert space.metric == ["holdout_mse_pm1", "matching_score_conv8"] and space.mode == ["min", "max"]
    assert space.grid_size() == 4
    with pytest.raises(SpaceError, match="grid search needs 'choice' values"):
        parse_space({"parameters": {"langevin.step_size": {"uniform": [0.1, 0.3]}}}, search="grid")
    with pytest.raises(SpaceError, match="2 metric"):
        parse_space({"parameters": {"langevin.steps": {"choice": [3]}}}, metric=["a", "b"], mode=["min", "max", "min"])
    # Values are checked against the base config: conv8 k=40 fits 8x8=64, not once --set shrinks nothing,
    # but a k larger than conv8's 64 positions fails.
    with pytest.raises(SpaceError, match="k=65 is larger"):
        parse_space({"parameters": {"model.sparsity.conv8": {"randint": [1, 65]}}})
    with pytest.raises(SpaceError, match="set/--set"):
        parse_space({"parameters": {"langevin.steps": {"choice": [3]}}}, overrides=["langevin.steps=-1"])


def test_pareto_front_and_best():
    def trial(i, a, b, status="finished"):
        return {"trial_id": f"t{i}", "status": status, "params": {"x": i}, "metrics": {"a": a, "b": b}, "run_id": str(i)}

    trials = [trial(0, 1.0, 1.0), trial(1, 2.0, 3.0), trial(2, 0.5, 0.5), trial(3, 3.0, 4.0),
              trial(4, 0.1, 0.1, status="stopped"), trial(5, 0.4, 0.2)]
    assert dominates([1, 3], [2, 3], ["min", "max"])
    front = pareto_front(trials, ["a", "b"], ["min", "max"])  # small a, large b
    assert [t["trial_id"] for t in front] == ["t5", "t2", "t0", "t1", "t3"]  # stopped trial t4 is not eligible
    assert [t["trial_id"] for t in pareto_front(trials, ["a", "b"], ["min", "min"])] == ["t5"]
    assert best_trial(trials, "a", "min")["trial_id"] == "t5"
    assert best_trial(trials, "b", "max")["trial_id"] == "t3"


def test_search_report_into_mlflow(tmp_path):
    """The parent run of a two-objective search gets the trials table, Pareto table and plots."""
    from pipeline.tracking import mlflow_run
    from pipeline.tuning.search import log_summary, summarize
    from pipeline.tuning.settings import SchedulerOptions, SearchPlan, SearchSettings, TrialSetup

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, _ = mlflow_run.get_or_create_run(uri, "exp", "srch", {"search.name": "srch"}, artifact_root=str(tmp_path / "art"))
    space = parse_space({"metric": "holdout_mse_pm1,matching_score_conv8", "mode": "min,max",
                         "parameters": {"langevin.steps": {"choice": [3, 5]}, "model.sparsity.conv8": {"choice": [8, 0.25]}}})
    trials = [{"trial_id": f"t{i}", "status": s, "run_id": None, "run_name": f"srch-t{i}", "error": None,
               "params": {"langevin.steps": st, "model.sparsity.conv8": k},
               "metrics": {"holdout_mse_pm1": a, "matching_score_conv8": b, "training_iteration": 3.0}}
              for i, (s, st, k, a, b) in enumerate([("finished", 3, 8, 0.2, 0.5), ("finished", 5, 0.25, 0.1, 0.4),
                                                   ("finished", 5, 8, 0.3, 0.3), ("stopped", 3, 0.25, 0.9, 0.1)])]
    settings = SearchSettings(name="srch", space="x")
    setup = TrialSetup(preset="tiny", overrides={}, data_url="/nowhere", workdir=str(tmp_path), tracking_uri=uri,
                       experiment="exp", storage=str(tmp_path / "runs"), search_name="srch", parent_run_id=parent)
    plan = SearchPlan(search="optuna", scheduler=SchedulerOptions("asha"), trials=4, per_trial_cpus=1.5,
                      max_concurrent=None, overrides={})
    summary = summarize(trials, space, settings, plan, setup, tmp_path)
    assert [p["trial_id"] for p in summary["pareto"]] == ["t1", "t0"]
    summary["duration_s"] = 1.0
    log_summary(summary, trials, space, setup)
    client = mlflow_run.client(uri)
    names = {a.path for a in client.list_artifacts(parent)} | {a.path for a in client.list_artifacts(parent, "plots")}
    assert {"trials.csv", "pareto.csv", "summary.json", "plots/pareto.png",
            "plots/holdout_mse_pm1_vs_params.png", "plots/matching_score_conv8_vs_params.png"} <= names
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["pareto_size"] == 2.0


def test_tune_cli_rejects_a_bad_space_before_starting(tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"parameters": {"langevin.stepz": {"choice": [3, 5]},
                                                  "langevin.step_size": {"uniform": [0.5, 0.1]}}}))
    code = main(["tune", "--space", str(bad), "--name", "never", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("invalid search space") == 1
    assert "did you mean 'langevin.steps'" in err and "uniform needs low < high" in err
    assert not (tmp_path / "w").exists()  # nothing created: no Tune state, no MLflow store, no Ray

    assert main(["tune", "--space", "cpu-small", "--check", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["scheduler"]["kind"] == "asha" and plan["trials"] == 6


@pytest.mark.parametrize("kind", ["random", "grid"])
def test_random_and_grid_searches_take_the_concurrency_limit_themselves(kind):
    """Tune ignores max_concurrent_trials next to a BasicVariantGenerator (random, grid): the generator must
    carry the --max-concurrent limit, or every trial starts at once."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.tuning.search import _search_algorithm

    algorithm = _search_algorithm(kind, None, seed=0, max_concurrent=2)
    assert isinstance(algorithm, BasicVariantGenerator) and algorithm.max_concurrent == 2
