"""Training on Ray Train: 2 CPU workers, checkpoints, resume, fault injection, MLflow (issue: train on Ray)."""

import json
from pathlib import Path

import pytest

import pipeline
from pipeline.distributed.checkpoint import load_checkpoint
from pipeline.distributed.trainer import train
from pipeline.tracking import mlflow_run
from tests.conftest import FAST_TRAINING_OVERRIDES

pytestmark = pytest.mark.ray


def _cfg(demo_shards, *overrides):
    cfg = pipeline.load_config("tiny", [*FAST_TRAINING_OVERRIDES, *overrides])
    cfg.data.url = demo_shards
    return cfg


@pytest.fixture(scope="module")
def workdir(two_worker_run):
    return two_worker_run.workdir


@pytest.fixture(scope="module")
def two_worker_result(two_worker_run):
    """conftest's shared 2-worker run: 2 epochs of 4 steps, checkpoints at steps 4 and 8."""
    return two_worker_run.result


def _runs_named(result, name):
    client = mlflow_run.client(result["tracking_uri"])
    experiment = client.get_experiment_by_name("sparsegen")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{mlflow_run.RUN_NAME_TAG}` = '{name}'")


def test_two_workers_finish_and_log_to_mlflow(two_worker_result):
    result = two_worker_result
    assert result["metrics"]["step"] == 8
    client = mlflow_run.client(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["langevin.steps"] == "3" and params["run.workers"] == "2" and params["preset"] == "tiny"
    metrics = run.data.metrics
    for name in ("generator_loss", "critic_loss", "reconstruction_mse", "energy_observed", "energy_synthesized",
                 "langevin_grad_norm", "images_per_s", "active_fraction_conv8", "data_skipped_samples"):
        assert name in metrics, name
    # conv8 keeps k=16 of 64 positions per channel: at most a quarter active.
    assert 0 < metrics["active_fraction_conv8"] <= 0.25
    history = client.get_metric_history(result["run_id"], "reconstruction_mse")
    assert sorted({m.step for m in history}) == [2, 4, 6, 8]
    artifacts = [a.path for a in client.list_artifacts(result["run_id"], "samples")]
    assert any(path.endswith(".png") for path in artifacts)
    assert any(a.path.startswith("reconstructions") for a in client.list_artifacts(result["run_id"]))
    assert run.data.tags[mlflow_run.CHECKPOINT_TAG] == result["checkpoint"]
    listed = json.loads(Path(client.download_artifacts(result["run_id"], "checkpoints.json")).read_text())
    assert listed["latest"] == result["checkpoint"] and result["checkpoint"] in listed["kept"]
    loaded = load_checkpoint(result["checkpoint"])
    assert loaded.meta["step"] == 8 and loaded.meta["world_size"] == 2
    assert loaded.config.run.name == "two-workers"


def test_same_name_again_resumes_and_a_crash_restarts_from_the_last_checkpoint_in_one_mlflow_run(
        two_worker_result, demo_shards, workdir, capfd):
    """The same run name again resumes the shared 2-worker run (steps 8 -> 10); rank 1 dies at step 9 (the
    worker process exits) and Ray Train restarts the worker group from the step-8 checkpoint on the shared
    directory. One Train run serves both checks (each run costs a worker-group start)."""
    # Keep 3 checkpoints as the shared run does, so its steps 4 and 8 survive for test_latent_persistence
    # whichever of the two files runs first.
    cfg = _cfg(demo_shards, "run.workers=2", "training.max_steps=10", "run.name=two-workers",
               "run.crash_rank=1", "run.crash_at_step=9", "run.max_failures=2", "run.checkpoints_to_keep=3")
    result = train(cfg, workdir=str(workdir))
    assert result["resumed"] is True
    assert result["run_id"] == two_worker_result["run_id"]
    assert "resuming it from its latest checkpoint" in capfd.readouterr().out
    assert (Path(workdir) / "faults" / "two-workers-rank1-step9").exists(), "the fault was never injected"
    assert load_checkpoint(result["checkpoint"]).meta["step"] == 10
    runs = _runs_named(result, "two-workers")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # Step 9 ran twice (before the crash and after restoring the step-8 checkpoint); step 10 was reached.
    history = mlflow_run.client(result["tracking_uri"]).get_metric_history(result["run_id"], "reconstruction_mse")
    assert max(m.step for m in history) == 10


def test_progress_line_names_step_throughput_mse_and_eta():
    from pipeline.distributed.progress import make_progress, progress_line

    def line(step, total, logged, elapsed_s, steps_done):
        return progress_line(make_progress(step, total, logged, elapsed_s, steps_done))

    assert line(100, 400, {"images_per_s": 51.23, "reconstruction_mse": 0.04321}, 50.0, 100) == \
        "[sparsegen] step 100/400 (25%) | 51.2 images/s | reconstruction MSE 0.0432 | ETA 2m30s"
    assert line(10, 10, {}, 5.0, 10).endswith("ETA 0m00s")
    assert "ETA 2h00m" in line(1, 7201, {}, 1.0, 1)


def test_eta_is_at_most_what_is_left_of_the_time_budget():
    from pipeline.distributed.progress import make_progress

    # 10 of 1,000 steps in 60 s: 99 min at that pace, but only 4 min of a 5-minute budget are left.
    assert make_progress(10, 1000, {}, 60.0, 10).eta_s == pytest.approx(5940.0)
    assert make_progress(10, 1000, {}, 60.0, 10, budget_s=300.0).eta_s == pytest.approx(240.0)
    assert make_progress(10, 1000, {}, 400.0, 10, budget_s=300.0).eta_s == 0.0


def test_time_budget_stops_every_worker_at_the_same_step_and_ends_like_max_steps(ray_session, demo_shards, workdir):
    """training.max_train_minutes: both ranks stop at the first log interval past the budget (step 2 here,
    since any step outlasts 0.6 ms), with the final checkpoint of that step and the end-of-run report."""
    cfg = _cfg(demo_shards, "run.workers=2", "training.max_steps=40", "training.max_train_minutes=0.00001",
               "run.name=budget-run")
    result = train(cfg, workdir=str(workdir))
    assert result["metrics"]["step"] == 2
    loaded = load_checkpoint(result["checkpoint"])
    assert loaded.meta["step"] == 2 and loaded.state["step"] == 2
    # Both ranks wrote their latents part into the step-2 checkpoint (a rank that went on would have hung).
    assert loaded.meta["latents"]["world_size"] == 2 and len(loaded.meta["latents"]["parts"]) == 2
    run = mlflow_run.client(result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["sparsegen.stopped_by"] == "max_train_minutes"
    assert run.data.params["training.max_train_minutes"] == "1e-05"


def test_demo_reports_bad_limits_as_config_errors(capsys):
    from pipeline.cli import main

    assert main(["demo", "--max-minutes", "-1"]) == 2
    err = capsys.readouterr().err
    assert "training.max_train_minutes: must be positive or null, got -1.0" in err and "Traceback" not in err, err
    assert main(["demo", "--max-steps", "0"]) == 2
    assert "training.max_steps: must be positive or null, got 0" in capsys.readouterr().err


def test_bar_only_on_a_terminal_unless_forced(monkeypatch):
    import io

    from pipeline.distributed.progress import PROGRESS_BAR_ENV, bar_wanted

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(PROGRESS_BAR_ENV, raising=False)
    assert bar_wanted(Tty()) and not bar_wanted(io.StringIO())
    monkeypatch.setenv(PROGRESS_BAR_ENV, "0")
    assert not bar_wanted(Tty())
    monkeypatch.setenv(PROGRESS_BAR_ENV, "1")
    assert bar_wanted(io.StringIO())


def test_cli_train_on_a_folder_of_images_ingests_it_and_a_terminal_gets_a_bar(ray_session, workdir, tmp_path, monkeypatch,
                                                                             capfd):
    """`sparsegen train --data FOLDER` ingests raw images into shards once, then trains on them. With the
    driver on a terminal (forced here), rank 0 sends its records to the driver's bar: the bar reaches the last
    step, and no per-interval progress line is printed. One Train run serves both checks."""
    import numpy as np
    from PIL import Image

    import pipeline.distributed.progress as progress
    from pipeline.cli import main

    bars = []
    original = progress.ProgressBar

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setenv(progress.PROGRESS_BAR_ENV, "1")
    monkeypatch.setattr(progress, "ProgressBar", Recording)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    code = main(["train", "--preset", "tiny", *sum((["--set", o] for o in FAST_TRAINING_OVERRIDES), []),
                 "--set", "run.log_every_steps=2", "--data", str(folder), "--workers", "1", "--max-steps", "4",
                 "--name", "cli-run", "--workdir", str(workdir), "--json"])
    assert code == 0
    captured = capfd.readouterr().out
    assert "holds raw images: ingesting them" in captured
    report = json.loads(captured.strip().splitlines()[-1])
    assert set(report) >= {"run_id", "name", "checkpoint", "metrics"} and report["name"] == "cli-run"
    assert (Path(workdir) / "data" / "photos-32px" / "manifest.parquet").exists()
    assert len(bars) == 1 and bars[0].records >= 1
    assert bars[0].bar is not None and bars[0].bar.n == 4 and bars[0].bar.total == 4
    assert "[sparsegen] step 2/4" not in captured
