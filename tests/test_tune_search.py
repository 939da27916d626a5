"""End to end: a 4-trial ASHA search over Ray Train runs, interrupted after its first trial and resumed.

The search runs first as its own `sparsegen tune` process joined to the session's Ray; once Tune has
recorded a finished trial the process is killed (a genuine interruption: no clean shutdown, trials cut
mid-run). Running the same --name again restores the Tune experiment and completes it; then MLflow must
hold one parent run and four nested child runs with the searched params and metrics, and `compare` must
list them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytestmark = pytest.mark.ray

FAST = [
    "model.fc_channels=64",
    "model.widths=[32, 16, 8]",
    "langevin.steps=3",
    "training.batch_size=16",
    "training.max_steps=6",
    "data.demo_images=128",
    "run.log_every_steps=2",
    "run.eval_every_steps=6",
    "run.checkpoint_every_steps=2",
    "evaluation.at_end=[]",
]
SPACE = {
    "metric": "reconstruction_mse",
    "mode": "min",
    "scheduler": {"kind": "asha", "metric": "holdout_mse_pm1", "mode": "min", "grace_period": 1, "reduction_factor": 2},
    "parameters": {
        "langevin.step_size": {"loguniform": [0.1, 0.4]},
        "model.sparsity.conv8": {"choice": [8, 16, 0.5]},
        "sparsity_schedule.kind": {"choice": ["fixed", "dense_then_anneal"]},
        "training.critic_weight": {"choice": [0.0, 1.0]},
    },
}


def _terminated_trials(experiment_path: Path) -> list[str]:
    done = []
    for state in experiment_path.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except ValueError:  # being written
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.append(trial["trial_id"])
    return done


def test_search_interrupted_after_first_trial_resumes_and_completes(ray_session, demo_shards, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.tracking import mlflow_run

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    workdir = tmp_path / "work"
    storage = tmp_path / "shared-storage"  # --storage: trial checkpoints and Tune state, apart from the workdir
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    name = "asha-search"
    args = ["tune", "--preset", "tiny", "--data", demo_shards, "--space", str(space_file), "--trials", "4",
            "--max-concurrent", "2", "--search", "optuna", "--seed", "0", "--name", name,
            "--workdir", str(workdir), "--storage", str(storage), "--tracking-uri", uri,
            "--set", "run.experiment=tune-test"]
    for item in FAST:
        args += ["--set", item]

    # -- 1. a search process, killed once Tune has recorded its first finished trial ---------------------------
    started = time.monotonic()
    address = ray_session.get_runtime_context().gcs_address
    log = tmp_path / "first.log"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--address", address],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _terminated_trials(storage / "tune" / name):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no trial finished before the interruption (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # this test's own process group only
        proc.wait()
    interrupted_after = time.monotonic() - started
    finished_before = _terminated_trials(storage / "tune" / name)
    assert 1 <= len(finished_before) < 4

    # -- 2. the same --name again: Tune restores the experiment and runs the remaining trials -------------------
    code = main(args + ["--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["resumed"] is True
    assert summary["trials"] == 4 and summary["trials_failed"] == 0 and summary["trials_unfinished"] == 0
    assert summary["trials_finished"] + summary["trials_stopped"] == 4 and summary["trials_finished"] >= 1
    assert set(finished_before) <= set(summary["trial_runs"])
    # Every trial's Ray Train checkpoints and the Tune state live under --storage, nothing under the workdir.
    assert summary["experiment_path"] == str(storage / "tune" / name)
    trial_dirs = [d for d in (storage / "runs").iterdir() if any(d.glob("checkpoint_*/meta.json"))]
    assert len(trial_dirs) == 4, sorted(d.name for d in (storage / "runs").iterdir())
    assert not (workdir / "tune").exists() and not (workdir / "runs").exists()
    print(f"\n[timing] interrupted after {interrupted_after:.0f} s; resumed search took {summary['duration_s']} s")

    # -- 3. MLflow: 1 parent + 4 nested children with the searched params and metrics ---------------------------
    client = mlflow_run.client(uri)
    experiment = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sparsegen.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.run_id == summary["parent_run_id"] and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sparsegen.trial_id"] for c in children} == set(summary["trial_runs"])
    for child in children:
        assert set(SPACE["parameters"]) <= set(child.data.params)
        assert "step" in child.data.metrics or "reconstruction_mse" in child.data.metrics or \
            child.data.tags["sparsegen.trial_status"] == "stopped"
        expected = {"finished": "FINISHED", "stopped": "KILLED"}[child.data.tags["sparsegen.trial_status"]]
        assert child.info.status == expected, (child.info.run_name, child.info.status, child.data.tags)
    finished = [c for c in children if c.data.tags["sparsegen.trial_status"] == "finished"]
    assert all("reconstruction_mse" in c.data.metrics and "holdout_mse_pm1" in c.data.metrics for c in finished)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"space.yaml", "trials.csv", "best_config.yaml", "summary.json",
            "plots/reconstruction_mse_vs_params.png"} <= artifacts
    assert summary["best"]["run_id"] in {c.info.run_id for c in finished}

    # -- 4. compare lists the four trials ----------------------------------------------------------------------
    png = tmp_path / "compare.png"
    assert main(["compare", "--experiment", "tune-test", "--tracking-uri", uri, "--png", str(png), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["run_id"] for r in compared["runs"]} == {c.info.run_id for c in children}
    assert "reconstruction_mse" in compared["metrics"]
    assert set(compared["params"]) <= set(SPACE["parameters"]) | {"sparsity_schedule.kind"}
    assert png.stat().st_size > 1000
    assert main(["compare", "--search", name, "--experiment", "tune-test", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert all(c.info.run_name in table for c in children)
    assert f"mlflow ui --backend-store-uri {uri}" in table


# --- Public Ray APIs: the report relay, the result listing, the failure budget -------------------------------


def _relay_trainable(config):
    """A Tune driver function around a real 1-worker Ray Train run that reports three checkpoints."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.tuning.relay import ReportRelay

    def loop(loop_config):
        for step in (1, 2, 3):
            with tempfile.TemporaryDirectory() as directory:
                with open(f"{directory}/step.txt", "w") as handle:
                    handle.write(str(step))
                ray.train.report({"step": step, "reconstruction_mse": 1.0 / step},
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))

    relay = ReportRelay()
    trainer = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name=config["name"], storage_path=config["storage"],
                                                          callbacks=[relay.callback()]))
    result = trainer.fit()
    relay.finish({"sparsegen_final": 1.0, "evaluated": 42.0, "last_step": float(result.metrics["step"])})


@pytest.mark.ray
def test_report_relay_delivers_every_train_report_then_the_final_one(ray_session, tmp_path):
    """Each Train report reaches Tune in order (with its checkpoint's URI), then the trial's final result."""
    from ray import tune

    from pipeline.tuning.search import collect_trials
    from pipeline.tuning.settings import FINAL_KEY

    tuner = tune.Tuner(tune.with_resources(_relay_trainable, {"CPU": 0.5}),
                       param_space={"name": "relay-run", "storage": str(tmp_path / "train")},
                       run_config=tune.RunConfig(name="relay", storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    assert len(results) == 1 and results[0].error is None
    history = results[0].metrics_dataframe
    assert list(history["step"].iloc[:3]) == [1, 2, 3]
    assert history["checkpoint_path"].iloc[:3].str.contains("checkpoint_").all()
    assert history[FINAL_KEY].isna().iloc[:3].all() and history[FINAL_KEY].iloc[3] == 1.0 and len(history) == 4
    assert results[0].metrics["evaluated"] == 42.0 and results[0].metrics["last_step"] == 3.0

    records = collect_trials(results, SimpleNamespace(keys=["name"]), "relay")  # a space: its searched keys
    assert [r["status"] for r in records] == ["finished"] and records[0]["metrics"]["evaluated"] == 42.0


def _outcome_trainable(config):
    import ray.tune

    if config["outcome"] == "fails":
        raise RuntimeError("injected failure")
    for step in range(3):
        ray.tune.report({"reconstruction_mse": 1.0, "step": step})
    if config["outcome"] == "finishes":
        ray.tune.report({"sparsegen_final": 1.0, "reconstruction_mse": 0.5})


@pytest.mark.ray
def test_collect_trials_lists_every_trial_with_its_outcome(ray_session, tmp_path):
    """The trial listing comes from the public ResultGrid: one record per trial, finished / stopped / failed."""
    from ray import tune

    from pipeline.tuning.search import collect_trials

    def stop_the_stopped(trial_id, result):  # a scheduler's STOP, as ASHA gives it
        return result["config"]["outcome"] == "stopped" and result["training_iteration"] >= 2

    tuner = tune.Tuner(tune.with_resources(_outcome_trainable, {"CPU": 0.5}),
                       param_space={"outcome": tune.grid_search(["finishes", "stopped", "fails"])},
                       run_config=tune.RunConfig(name="outcomes", storage_path=str(tmp_path), stop=stop_the_stopped,
                                                 verbose=0))
    results = tuner.fit()
    records = collect_trials(results, SimpleNamespace(keys=["outcome"]), "outcomes")  # a space: its searched keys
    assert len(records) == 3 == len(results)
    by_outcome = {r["params"]["outcome"]: r for r in records}
    assert {k: r["status"] for k, r in by_outcome.items()} == {"finishes": "finished", "stopped": "stopped",
                                                                "fails": "failed"}
    assert "injected failure" in by_outcome["fails"]["error"]
    assert by_outcome["finishes"]["metrics"]["reconstruction_mse"] == 0.5
    assert len({r["trial_id"] for r in records}) == 3
    assert all(r["run_name"] == f"outcomes-{r['trial_id']}" for r in records)


def test_max_failures_flag_reaches_tunes_failure_config(tmp_path, capsys):
    from pipeline.cli import build_parser, main
    from pipeline.cli.tune import settings_from_args
    from pipeline.tuning.search import prepare, tune_run_config
    from pipeline.tuning.settings import DEFAULT_MAX_FAILURES

    def plan_of(*extra):
        args = build_parser().parse_args(["tune", "--space", "cpu-small", "--name", "mf", *extra])
        return prepare(settings_from_args(args))[2]

    assert plan_of().max_failures == DEFAULT_MAX_FAILURES == 1
    plan = plan_of("--max-failures", "3")
    assert plan.max_failures == 3 and plan_of("--max-failures", "0").max_failures == 0
    run_config = tune_run_config("mf", str(tmp_path), None, plan, f"sqlite:///{tmp_path / 'm.db'}", "exp")
    assert run_config.failure_config.max_failures == 3
    assert main(["tune", "--space", "cpu-small", "--max-failures", "2", "--check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_failures"] == 2
    assert main(["tune", "--space", "cpu-small", "--max-failures", "-1", "--name", "x",
                 "--workdir", str(tmp_path / "w")]) == 2
    assert "--max-failures must be >= 0" in capsys.readouterr().err


@pytest.mark.ray
def test_a_trial_that_fails_once_restarts_from_its_checkpoint_and_finishes(ray_session, demo_shards, tmp_path, capsys):
    """--max-failures 1: a trial whose Train run dies (rank 0 crashes at step 5; the Train run has no failure
    budget of its own) is restarted by Tune, continues from its step-4 checkpoint and finishes, in one
    MLflow child run."""
    from pipeline.cli import main
    from pipeline.tracking import mlflow_run

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"search": "grid", "scheduler": "none",
                                          "parameters": {"langevin.step_size": {"choice": [0.3]}}}))
    workdir = tmp_path / "work"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = [item for item in FAST if not item.startswith(("training.max_steps", "run.checkpoint_every_steps"))]
    sets += ["training.max_steps=8", "run.checkpoint_every_steps=2", "run.max_failures=0", "run.crash_rank=0",
             "run.crash_at_step=5", "run.experiment=tune-retry"]
    args = ["tune", "--preset", "tiny", "--data", demo_shards, "--space", str(space_file), "--name", "retry",
            "--workdir", str(workdir), "--tracking-uri", uri, "--max-failures", "1", "--json",
            *sum((["--set", s] for s in sets), [])]
    code = main(args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["trials"] == 1 and summary["trials_finished"] == 1 and summary["max_failures"] == 1
    assert list((workdir / "faults").iterdir()), "the injected crash did not happen"

    client = mlflow_run.client(uri)
    experiment = client.get_experiment_by_name("tune-retry")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["sparsegen.trial_status"] == "finished"
    assert child.data.tags.get("sparsegen.trial_restarts") == "1"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "reconstruction_mse")]
    # Logged every 2 steps: 2 and 4 before the crash, then up to 8 after the restart from the latest checkpoint
    # Ray Train had registered: step 4's, or under load step 2's (its report of step 4 was still in flight when
    # rank 0 died at step 5; step 4 is then trained again). Never from scratch: step 2 is trained once.
    assert sorted(set(steps)) == [2, 4, 6, 8] and steps.count(2) == 1 and steps.count(4) <= 2, steps
