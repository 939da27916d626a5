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
