"""A training run tells its story in MLflow (issue 14): step-keyed images, a logged and registered model,
the dataset as a run input, code version tags, and checkpoints that outlive the Ray storage."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import pipeline
from pipeline.data import open_dataset
from pipeline.distributed.checkpoint import load_checkpoint
from pipeline.distributed.trainer import train
from pipeline.tracking import mlflow_run
from pipeline.tracking.checkpoints import checkpoint_for_run, logged_checkpoints
from tests.conftest import FAST_TRAINING_OVERRIDES

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def story_run(ray_session, demo_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("story-workdir")
    cfg = pipeline.load_config("tiny", [*FAST_TRAINING_OVERRIDES, "training.max_steps=8", "run.name=story",
                                        "run.register_model=sparsegen-story",
                                        "data.dataset=story-data"])
    cfg.data.url = demo_shards
    return train(cfg, workdir=str(workdir)), workdir


def test_images_are_logged_under_step_keys(story_run):
    result, _ = story_run
    client = mlflow_run.client(result["tracking_uri"])
    # MLflow names step-keyed images "<key>+step+<step>+timestamp+..." ("%" instead of "+" in some versions).
    names = [Path(a.path).name.replace("%", "+") for a in client.list_artifacts(result["run_id"], "images")]
    for key in ("samples", "reconstructions", "basis_functions_conv8"):
        steps = sorted({int(n.split("+")[2]) for n in names if n.startswith(f"{key}+step+") and n.endswith(".png")})
        assert steps == [4, 8], (key, names)
    # The downloadable grids stay as files too.
    assert any(a.path.endswith("samples_step0000008.png") for a in client.list_artifacts(result["run_id"], "samples"))


def test_logged_model_generates_images_and_is_registered(story_run):
    import mlflow.pytorch

    result, _ = story_run
    assert result["model_uri"].startswith("models:/")
    mlflow.set_tracking_uri(result["tracking_uri"])
    model = mlflow.pytorch.load_model(result["model_uri"])
    cfg = load_checkpoint(result["checkpoint"], latents=False).config
    with torch.no_grad():
        images = model(torch.randn(5, cfg.model.latent_dim))
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    client = mlflow_run.client(result["tracking_uri"])
    versions = client.search_model_versions("name='sparsegen-story'")
    assert [str(v.version) for v in versions] == ["1"]
    registered = mlflow.pytorch.load_model("models:/sparsegen-story/1")
    torch.testing.assert_close(registered.fc.weight, model.fc.weight)


def test_dataset_input_and_code_version_are_on_the_run(story_run, demo_shards):
    result, _ = story_run
    run = mlflow_run.client(result["tracking_uri"]).get_run(result["run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    info = open_dataset(demo_shards)
    assert dataset_input.dataset.digest == info.manifest_sha256[:20]
    assert json.loads(dataset_input.dataset.source)["uri"] == demo_shards
    assert dataset_input.dataset.name == "story-data"  # data.dataset
    profile = json.loads(dataset_input.dataset.profile)
    assert (profile["num_train"], profile["num_holdout"], profile["model_resolution_px"]) == (
        info.num_train, info.num_holdout, 32)
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["sparsegen.version"]


def test_checkpoints_outlive_ray_storage(story_run, demo_shards, monkeypatch, tmp_path):
    from pipeline.cli import main

    result, workdir = story_run
    assert sorted(logged_checkpoints(result["tracking_uri"], result["run_id"])) == ["best", "final"]
    monkeypatch.setenv("SPARSEGEN_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    shutil.rmtree(Path(workdir) / "runs" / "story")
    local = checkpoint_for_run(result["tracking_uri"], result["run_id"])
    assert Path(local).is_relative_to(tmp_path / "cache") and load_checkpoint(local).meta["step"] == 8
    # evaluate --run and train --resume-from RUN_ID from MLflow alone.
    code = main(["evaluate", "--run", result["run_id"], "--tracking-uri", result["tracking_uri"],
                 "--metrics", "mse", "--no-progress", "--json"])
    assert code == 0
    cfg = pipeline.load_config("tiny", [*FAST_TRAINING_OVERRIDES, "training.max_steps=9", "run.name=story-resumed",
                                        "run.mlflow_checkpoints=[]"])
    cfg.data.url = demo_shards
    resumed = train(cfg, workdir=str(workdir), resume_from=result["run_id"])
    assert load_checkpoint(resumed["checkpoint"]).meta["step"] == 9
    assert logged_checkpoints(resumed["tracking_uri"], resumed["run_id"]) == []
