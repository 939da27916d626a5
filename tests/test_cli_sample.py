"""`sparsegen sample` and `sparsegen reconstruct` from a checkpoint, an MLflow run and a logged model (issue 14)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.distributed.checkpoint import write_checkpoint
from pipeline.learning import LatentBank
from tests.test_eval_fixtures import demo_data  # noqa: F401 - fixture

OVERRIDES = ["model.fc_channels=64", "model.widths=[32, 16, 8]", "evaluation.inference_steps=4",
             "evaluation.inference_noise_free_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint and an MLflow run (sqlite) holding it, plus a logged model of the same generator."""
    import os

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from pipeline.tracking import mlflow_run
    from pipeline.tracking.checkpoints import log_checkpoint
    from pipeline.tracking.models import log_generator

    root = tmp_path_factory.mktemp("sample")
    cfg = pipeline.load_config("tiny", OVERRIDES)
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    checkpoint = write_checkpoint(root / "ckpt", cfg, {"generator": generator.state_dict(), "step": 0}, LatentBank(4, cfg.model.latent_dim),
                                  {"step": 0, "world_size": 1})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id, _ = mlflow_run.get_or_create_run(uri, "sample-test", "r", {}, artifact_root=str(root / "art"))
    log_checkpoint(uri, run_id, checkpoint, "final")
    model_uri = log_generator(uri, run_id, generator, cfg)
    return {"cfg": cfg, "generator": generator, "checkpoint": checkpoint, "uri": uri, "run_id": run_id,
            "model_uri": model_uri, "root": root}


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("source", ["checkpoint", "run", "model-uri"])
def test_sample_grid_and_arrays_from_each_source(trained, source, tmp_path, capsys):
    value = {"checkpoint": trained["checkpoint"], "run": trained["run_id"], "model-uri": trained["model_uri"]}[source]
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    code = main(["sample", f"--{source}", value, "--tracking-uri", trained["uri"], "-n", "16", "--seed", "3",
                 "--out", str(out), "--npz", str(npz), "--json"])
    assert code == 0
    report = _last_json(capsys)
    assert report["n"] == 16 and report["resolution"] == 32
    # 8 columns x 2 rows of 32 px tiles with 2 px padding.
    assert Image.open(out).size == (8 * 34 + 2, 2 * 34 + 2)
    arrays = np.load(npz)
    assert arrays["z"].shape == (16, trained["cfg"].model.latent_dim) and arrays["images"].shape == (16, 3, 32, 32)
    with torch.no_grad():
        expected = trained["generator"](torch.from_numpy(arrays["z"]))
    np.testing.assert_allclose(arrays["images"], expected.numpy(), atol=1e-5)


def test_sample_interpolation_strip_runs_between_the_two_seeds(trained, tmp_path, capsys):
    npz = tmp_path / "i.npz"
    code = main(["sample", "--checkpoint", trained["checkpoint"], "--interpolate", "1,2", "--steps", "5",
                 "--out", str(tmp_path / "strip.png"), "--npz", str(npz), "--json"])
    assert code == 0 and _last_json(capsys)["n"] == 5
    z = np.load(npz)["z"]
    d = trained["cfg"].model.latent_dim
    np.testing.assert_allclose(z[0], torch.randn(d, generator=torch.Generator().manual_seed(1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(z[-1], torch.randn(d, generator=torch.Generator().manual_seed(2)).numpy(), atol=1e-5)
    assert Image.open(tmp_path / "strip.png").size == (5 * 34 + 2, 34 + 2)


def test_reconstruct_a_folder_reports_per_image_mse(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "recon.png"
    code = main(["reconstruct", "--checkpoint", trained["checkpoint"], str(folder), "--out", str(out), "--json"])
    assert code == 0
    report = _last_json(capsys)
    assert [item["image"].rsplit("/", 1)[-1] for item in report["per_image"]] == ["p0.png", "p1.png", "p2.png"]
    mses = [item["mse"] for item in report["per_image"]]
    assert all(np.isfinite(mses)) and report["mean_mse"] == pytest.approx(np.mean(mses))
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)


@pytest.mark.parametrize("argv, expected", [
    (["sample", "--checkpoint", "/nonexistent/ckpt", "--out", "x.png"], "not a sparsegen checkpoint"),
    (["sample", "--checkpoint", "a", "--run", "b", "--out", "x.png"], "exactly one of --run, --checkpoint"),
    (["sample", "--out", "x.png"], "exactly one of --run, --checkpoint"),
    (["sample", "--checkpoint", "a", "--interpolate", "1", "--out", "x.png"], "--interpolate wants two"),
    (["reconstruct", "--checkpoint", "a"], "give image files/folders or --data"),
])
def test_bad_input_is_one_line_exit_2(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_compare_links_each_run_to_its_mlflow_page_and_puts_sample_grids_side_by_side(trained, tmp_path, capsys):
    from pipeline.tracking import mlflow_run

    client = mlflow_run.client(trained["uri"])
    second, _ = mlflow_run.get_or_create_run(trained["uri"], "sample-test", "r2", {}, artifact_root=str(trained["root"] / "art"))
    for run_id, step in ((trained["run_id"], 4), (second, 8)):
        grid = tmp_path / f"samples_step{step:07d}.png"
        Image.new("RGB", (70, 36), (200, 10, 10)).save(grid)
        client.log_artifact(run_id, str(grid), "samples")
    out = tmp_path / "side.png"
    code = main(["compare", trained["run_id"], second, "--tracking-uri", trained["uri"], "--png", str(out), "--json"])
    assert code == 0
    result = _last_json(capsys)
    experiment_id = client.get_run(second).info.experiment_id
    assert [r["url"] for r in result["runs"]] == [
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}" for run_id in (trained["run_id"], second)]
    assert Image.open(out).size[0] >= 2 * 70


def test_compare_samples_grid_puts_each_runs_latest_grid_side_by_side_with_captions(trained, tmp_path, capsys):
    from pipeline.tracking import mlflow_run

    client = mlflow_run.client(trained["uri"])
    first, _ = mlflow_run.get_or_create_run(trained["uri"], "grid-test", "g1", {}, artifact_root=str(trained["root"] / "art"))
    second, _ = mlflow_run.get_or_create_run(trained["uri"], "grid-test", "g2", {}, artifact_root=str(trained["root"] / "art"))
    third, _ = mlflow_run.get_or_create_run(trained["uri"], "grid-test", "g3", {}, artifact_root=str(trained["root"] / "art"))
    # first: an older, larger grid (step 10) and the latest (step 120, whose number sorts after 10 only as a number).
    for run_id, step, size in ((first, 10, (300, 90)), (first, 120, (200, 60)), (second, 8, (200, 60))):
        folder = tmp_path / run_id
        folder.mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 10, 10)).save(folder / f"samples_step{step:07d}.png")
        client.log_artifact(run_id, str(folder / f"samples_step{step:07d}.png"), "samples")
    out = tmp_path / "grids.png"
    code = main(["compare", first, second, third, "--tracking-uri", trained["uri"], "--samples-grid", str(out), "--json"])
    assert code == 0
    result = _last_json(capsys)
    assert result["samples_grid"] == str(out)
    assert result["sample_grids"] == {first: "samples/samples_step0000120.png",
                                      second: "samples/samples_step0000008.png", third: None}
    assert all(r["url"].endswith(f"/runs/{r['run_id']}") for r in result["runs"])
    picture = Image.open(out)
    # Two 200-px grids and a 128-px 'no samples' tile with 8-px gaps; captions above the tallest (60 or 128 px).
    assert picture.size == (200 + 200 + 128 + 4 * 8, 18 + 128 + 2 * 8)
    # The first column shows the step-120 grid (red), not the larger step-10 one.
    assert picture.getpixel((8 + 100, 8 + 18 + 30)) == (200, 10, 10)
    assert picture.getpixel((8 + 100, 8 + 18 + 100)) == (255, 255, 255)
    # Table output: the links and, for a sqlite store, how to open them.
    assert main(["compare", first, second, "--tracking-uri", trained["uri"]]) == 0
    text = capsys.readouterr().out
    assert f"g1: http://127.0.0.1:5000/#/experiments/" in text and "mlflow ui --backend-store-uri" in text


def test_reconstruct_holdout_shards(trained, demo_data, tmp_path, capsys):
    out = tmp_path / "holdout.png"
    code = main(["reconstruct", "--checkpoint", trained["checkpoint"], "--data", demo_data, "--split", "holdout",
                 "-n", "4", "--out", str(out), "--json"])
    assert code == 0
    report = _last_json(capsys)
    assert [item["image"].split(":")[0] for item in report["per_image"]] == ["holdout"] * 4
    assert np.isfinite(report["mean_mse"]) and Image.open(out).size == (4 * 34 + 2, 2 * 34 + 2)
