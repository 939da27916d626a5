"""Population-based training (`sparsegen tune --scheduler pbt`) over Ray Train runs.

The fast tests check what is refused before Ray starts (shape-changing keys, Optuna) and the mutations.
The Ray test runs a 2-trial PBT search whose trials differ only in the Langevin step size (0.3 vs 0.001:
clearly different reconstruction errors from the first checkpoint on); with ``quantile_fraction: 0.5`` the
worse trial at a perturbation point (every checkpoint) restarts from the better one's checkpoint. MLflow
must still hold one parent and two child runs, one of them recording the exploit.
"""

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST_TRAINING_OVERRIDES


def _args(space_file, workdir, name, extra=()):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = ["tune", "--preset", "tiny", "--space", str(space_file), "--name", name, "--workdir", str(workdir),
            "--tracking-uri", uri, "--set", "run.experiment=tune-pbt", *extra]
    return args, uri


def test_pbt_refuses_shape_changing_keys_before_anything_starts(tmp_path, capsys):
    from pipeline.cli import main

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"parameters": {
        "langevin.step_size": {"choice": [0.3, 0.1]},
        "model.fc_channels": {"choice": [64, 128]},
        "model.latent_dim": {"choice": [16, 32]},
        "model.sparsity.conv8": {"choice": [8, 16]},      # k per layer changes no shape: fine
        "model.resolution": {"value": 32},                 # a constant: fine
    }}))
    workdir = tmp_path / "work"
    args, _ = _args(space_file, workdir, "refused", ["--scheduler", "pbt"])
    started = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "parameters.model.fc_channels: scheduler pbt cannot search" in err
    assert "parameters.model.latent_dim: scheduler pbt cannot search" in err
    assert "model.sparsity.conv8" not in err and "model.resolution" not in err
    assert not (workdir / "tune").exists() and not (workdir / "mlflow.db").exists()
    assert time.monotonic() - started < 30

    # PBT cannot be combined with Optuna; without a chosen search it samples the population at random.
    space_file.write_text(yaml.safe_dump({"parameters": {"langevin.step_size": {"loguniform": [0.1, 0.4]}}}))
    assert main(args + ["--search", "optuna", "--check"]) == 2
    assert "scheduler pbt needs search 'random'" in capsys.readouterr().err
    assert main(args + ["--check", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["search"] == "random" and plan["scheduler"]["kind"] == "pbt"
    assert plan["scheduler"]["perturbation_interval"] == 2


def test_pbt_mutations_stay_inside_the_space():
    from ray import tune

    from pipeline.tuning.pbt import clamp_to_space, mutations
    from pipeline.tuning.space import SpaceError, parse_space

    space = parse_space({"parameters": {
        "langevin.step_size": {"loguniform": [0.05, 0.5]}, "langevin.steps": {"randint": [3, 10]},
        "model.sparsity.conv8": {"choice": [8, 16, 0.5]}, "langevin.noise_sigma": {"value": 0.3}}})
    found = mutations(space)
    assert set(found) == {"langevin.step_size", "langevin.steps", "model.sparsity.conv8"}
    assert found["model.sparsity.conv8"] == [8, 16, 0.5]
    assert isinstance(found["langevin.step_size"], tune.search.sample.Float)
    clamped = clamp_to_space(space)({"langevin.step_size": 0.6, "langevin.steps": 12.4, "model.sparsity.conv8": 8})
    assert clamped == {"langevin.step_size": 0.5, "langevin.steps": 10, "model.sparsity.conv8": 8}
    with pytest.raises(SpaceError, match="quantile_fraction"):
        parse_space({"scheduler": {"kind": "pbt", "quantile_fraction": 0.7},
                     "parameters": {"langevin.steps": {"choice": [3, 5]}}})


def test_pbt_restart_plans(tmp_path):
    """Own checkpoint: continue the own Train run; another trial's: a fresh Train run from a private copy of
    the donor's checkpoint (its newest one before this trial's end when the pointed one was rotated away)."""
    from pipeline.distributed.checkpoint import CONFIG_FILE, LATENTS_FILE, META_FILE, STATE_FILE
    from pipeline.tuning.pbt import NothingToExploit, plan_start

    storage = tmp_path / "runs"
    donor_run = storage / "s-donor"
    for name, step in (("checkpoint_a", 4), ("checkpoint_b", 8), ("checkpoint_c", 12)):
        for file in (STATE_FILE, LATENTS_FILE, CONFIG_FILE):
            (donor_run / name).mkdir(parents=True, exist_ok=True)
            (donor_run / name / file).write_text(file)
        (donor_run / name / META_FILE).write_text(json.dumps({"step": step}))
    (donor_run / "checkpoint_manager_snapshot.json").write_text("{}")
    pointer = {"train_checkpoint": str(donor_run / "checkpoint_a"), "train_run_dir": str(donor_run),
               "train_run": "s-donor", "trial_id": "donor", "step": 4, "epoch": 0.5}

    assert plan_start(None, "me", "s-me", {}, str(storage)).train_run == "s-me"
    own = plan_start({**pointer, "trial_id": "me", "train_run": "s-me-pbt1"}, "me", "s-me", {}, str(storage))
    assert own.train_run == "s-me-pbt1" and own.donor is None

    plan = plan_start(pointer, "me", "s-me", {"langevin.step_size": 0.3}, str(storage), max_steps=12)
    assert plan.train_run.startswith("s-me-pbt") and plan.donor == "donor" and plan.seed_step == 4
    assert (Path(plan.resume_from) / STATE_FILE).read_text() == STATE_FILE
    # The same exploit again (a restored search) finds the same run; another config makes another run.
    assert plan_start(pointer, "me", "s-me", {"langevin.step_size": 0.3}, str(storage), 12) == plan
    assert plan_start(pointer, "me", "s-me", {"langevin.step_size": 0.1}, str(storage), 12).train_run != plan.train_run

    gone = {**pointer, "train_checkpoint": str(donor_run / "checkpoint_gone")}
    fallback = plan_start(gone, "other", "s-other", {}, str(storage), max_steps=12)
    assert fallback.seed_step == 8  # the newest before step 12 (a run ending there has nothing left after 12)
    with pytest.raises(NothingToExploit):
        plan_start(gone, "third", "s-third", {}, str(storage), max_steps=4)


def test_pbt_scheduler_never_perturbs_at_the_final_result():
    """PBT's clock is PBT_TIME_KEY, which only relayed Train reports carry: the final result (end-of-training
    metrics, FINAL_KEY) is no perturbation point, so PBT cannot restart a finished trial."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from pipeline.tuning.pbt import PBT_TIME_KEY, make_scheduler
    from pipeline.tuning.settings import FINAL_KEY, SchedulerOptions
    from pipeline.tuning.space import parse_space

    space = parse_space({"parameters": {"langevin.step_size": {"loguniform": [0.05, 0.5]}}})
    scheduler = make_scheduler(SchedulerOptions("pbt", "reconstruction_mse", "min", {"perturbation_interval": 1}), space)
    assert isinstance(scheduler, PopulationBasedTraining)
    final = {FINAL_KEY: 1.0, "reconstruction_mse": 0.01, "training_iteration": 99, "step": 24}
    # No controller, no trial state needed: a result without the clock is answered before either is read.
    assert scheduler.on_trial_result(None, None, final) == TrialScheduler.CONTINUE
    assert PBT_TIME_KEY not in final


PBT_SPACE = {
    "metric": "reconstruction_mse",
    "mode": "min",
    "search": "grid",  # the population: one trial per step size
    "scheduler": {"kind": "pbt", "metric": "reconstruction_mse", "mode": "min", "perturbation_interval": 1,
                  "quantile_fraction": 0.5, "resample_probability": 0.0},
    "parameters": {"langevin.step_size": {"choice": [0.3, 0.001]}},
}
PBT_STEPS = 24


@pytest.mark.ray
def test_pbt_search_exploits_a_checkpoint_and_keeps_one_child_run_per_trial(ray_session, demo_shards, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.tracking import mlflow_run

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(PBT_SPACE))
    workdir = tmp_path / "work"
    name = "pbt-search"
    sets = [item for item in FAST_TRAINING_OVERRIDES if not item.startswith("run.checkpoint_every_steps")]
    # Every Train checkpoint kept: the exploit copies the very checkpoint PBT scored (with the default 2
    # kept, the donor has rotated it away by the time the recipient restarts: test_pbt_restart_plans).
    sets += [f"training.max_steps={PBT_STEPS}", "run.checkpoint_every_steps=2", "run.eval_every_steps=100",
             f"run.checkpoints_to_keep={PBT_STEPS}"]
    extra = ["--data", demo_shards, "--max-concurrent", "2", "--seed", "0", "--json"]
    for item in sets:
        extra += ["--set", item]
    args, uri = _args(space_file, workdir, name, extra)

    started = time.monotonic()
    code = main(args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    elapsed = time.monotonic() - started
    print(f"\n[timing] 2-trial PBT search took {elapsed:.0f} s, {summary.get('pbt_exploits')} exploit(s)")
    assert code == 0, summary
    assert summary["scheduler"] == "pbt" and summary["search"] == "grid"
    assert summary["trials"] == 2 and summary["trials_finished"] == 2 and summary["trials_failed"] == 0
    assert summary["pbt_exploits"] >= 1

    client = mlflow_run.client(uri)
    experiment = client.get_experiment_by_name("tune-pbt")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sparsegen.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert {c.data.tags["sparsegen.trial_id"] for c in children} == set(summary["trial_runs"])
    assert all(c.info.status == "FINISHED" and c.data.tags["sparsegen.trial_status"] == "finished" for c in children)

    exploited = [c for c in children if c.data.metrics.get("pbt_exploits", 0) >= 1]
    assert exploited, [c.data.tags for c in children]
    for child in exploited:
        donor = child.data.tags["sparsegen.pbt_last_donor"]
        assert donor in summary["trial_runs"] and donor != child.data.tags["sparsegen.trial_id"]
        train_run = child.data.tags["sparsegen.run_name"]
        assert train_run.startswith(f"{name}-{child.data.tags['sparsegen.trial_id']}-pbt")
        assert child.data.tags["sparsegen.pbt_train_run"] == train_run
        # The restarted Train run started from (a private copy of) the donor's checkpoint, not from step 0.
        seed = json.loads((workdir / "runs" / "pbt-seeds" / train_run / "meta.json").read_text())
        assert seed["mlflow_run_id"] != child.info.run_id and 0 < seed["step"] < PBT_STEPS
        assert client.get_metric_history(child.info.run_id, "pbt_exploits")[-1].step == seed["step"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "reconstruction_mse")]
        assert max(steps) == PBT_STEPS
        assert json.loads(child.data.tags["sparsegen.pbt_config"])["langevin.step_size"] in (0.3, 0.001)
