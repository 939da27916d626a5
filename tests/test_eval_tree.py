"""The AND-OR tree (Fig. 1) of a tiny model, its JSON/PNG, MLflow logging and `sparsegen evaluate`."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.tree import build_tree, write_tree
from tests.test_eval_fixtures import demo_data, tiny_generator  # noqa: F401 - fixtures


def _walk(nodes):
    for n in nodes:
        yield n
        yield from _walk(n["children"])


def test_tree_structure_follows_the_definition(tiny_generator):
    cfg, generator = tiny_generator
    z = torch.randn(1, cfg.model.latent_dim, generator=torch.Generator().manual_seed(3))
    document, arrays = build_tree(generator, z, roots=4, children=2)
    assert document["layers"] == ["conv8", "conv16", "conv32"]
    _, activations = generator(z, return_activations=True)
    roots = document["nodes"]
    assert len(roots) == 4
    assert [r["activation"] for r in roots] == sorted((r["activation"] for r in roots), reverse=True)
    for node in _walk(roots):
        c, (y, x) = node["channel"], node["position"]
        assert node["activation"] == pytest.approx(activations[node["layer"]][0, c, y, x].item(), rel=1e-5)
        assert node["activation"] > 0  # only active units are nodes
        assert node["basis_key"] in arrays and len(node["basis_box"]) == 4
        assert len(node["children"]) <= 2
        for child in node["children"]:
            assert child["contribution"] > 0
            assert document["layers"].index(child["layer"]) == document["layers"].index(node["layer"]) + 1
            # A child lies within its parent's projective field: at most a few cells away (3x3 convs).
            assert abs(child["position"][0] - 2 * y) <= 4 and abs(child["position"][1] - 2 * x) <= 4
    assert document["num_nodes"] == len(list(_walk(roots)))
    json.dumps(document)  # plain JSON


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """(tracking URI, client, experiment id) of one sqlite store for the module (creating one costs seconds)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("eval-tests", artifact_location=str(root / "artifacts"))


def test_tree_artifacts_are_attached_to_an_mlflow_run(tmp_path, mlflow_store, tiny_generator):
    from pipeline.evaluation import evaluate, log_to_mlflow

    cfg, generator = tiny_generator
    uri, client, experiment = mlflow_store
    run_id = client.create_run(experiment).info.run_id
    metrics, artifacts = evaluate(cfg, generator, None, ["tree"], out_dir=tmp_path / "out", progress=False)
    assert {"tree_json", "tree_png", "tree_npz", "summary"} <= set(artifacts)
    with open(artifacts["tree_png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    log_to_mlflow(run_id, metrics, artifacts, tracking_uri=uri)
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/and_or_tree.json", "evaluation/and_or_tree.png", "evaluation/evaluation.json"} <= logged
    assert client.get_run(run_id).data.metrics["tree_nodes"] == metrics["tree_nodes"]


@pytest.fixture
def checkpoint_and_run(tmp_path, mlflow_store, tiny_generator):
    """A tiny checkpoint whose meta.json names an MLflow run tagged with it (as `sparsegen train` leaves it)."""
    from pipeline.distributed.checkpoint import write_checkpoint
    from pipeline.learning.latent_bank import LatentBank

    cfg, generator = tiny_generator
    uri, client, experiment = mlflow_store
    run_id = client.create_run(experiment).info.run_id
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, {"generator": generator.state_dict()},
                                  LatentBank(4, cfg.model.latent_dim), {"mlflow_run_id": run_id, "step": 1})
    client.set_tag(run_id, "sparsegen.checkpoint", checkpoint)
    return checkpoint, run_id, uri, client


def test_cli_evaluate_logs_into_the_checkpoints_run(tmp_path, capsys, checkpoint_and_run, demo_data):
    from pipeline.cli import main

    checkpoint, run_id, uri, client = checkpoint_and_run
    rc = main(["evaluate", "--checkpoint", checkpoint, "--data", demo_data, "--metrics", "tree,mse",
               "--tracking-uri", uri, "--out", str(tmp_path / "eval"), "--no-progress", "--json"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last)
    assert printed["holdout_mse_01"] == pytest.approx(printed["holdout_mse_pm1"] / 4)
    run = client.get_run(run_id)
    assert run.data.metrics["tree_nodes"] == printed["tree_nodes"]
    assert "evaluation/and_or_tree.png" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
    # The run had no model yet: evaluate logged the generator it evaluated (issue 14: "and at evaluate").
    import mlflow.pytorch

    from pipeline.tracking.models import model_uri_of_run

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(model_uri_of_run(uri, run_id))
    assert model(torch.randn(2, model.latent_dim)).shape[0] == 2


def test_cli_evaluate_by_run_id_and_missing_fid_weights(tmp_path, capsys, monkeypatch, checkpoint_and_run):
    from pipeline.cli import main

    monkeypatch.delenv("SPARSEGEN_INCEPTION_WEIGHTS", raising=False)
    checkpoint, run_id, uri, client = checkpoint_and_run
    rc = main(["evaluate", "--run", run_id, "--metrics", "fid,tree", "--tracking-uri", uri, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3 and "FID unavailable" in err and "--inception-weights" in err
    assert "tree_nodes" not in client.get_run(run_id).data.metrics  # failed before doing any work
    rc = main(["evaluate", "--run", run_id, "--metrics", "tree", "--tracking-uri", uri, "--no-progress", "--json",
               "--out", str(tmp_path / "eval")])
    assert rc == 0 and "tree_nodes" in client.get_run(run_id).data.metrics
    assert main(["evaluate", "--run", run_id, "--metrics", "bogus", "--tracking-uri", uri]) == 2


def test_tree_pages_fit_2000_px_with_48_px_tiles_and_the_or_view_matches_a_forward(tmp_path, tiny_generator):
    from PIL import Image

    from pipeline.evaluation import tree as tree_module
    from pipeline.evaluation.basis import forward_with_masks

    _, generator = tiny_generator
    assert tree_module.TILE_PX >= 48
    z = torch.randn(1, generator.latent_dim, generator=torch.Generator().manual_seed(0))
    paths, document = write_tree(generator, z, tmp_path, roots=8, children=3)
    pages = [paths["tree_png"], *(paths[k] for k in sorted(paths) if k.startswith("tree_png_p"))]
    leaves = sum(tree_module._subtree_leaves(r) for r in document["nodes"])
    assert len(pages) >= 2 or leaves * (tree_module.TILE_PX + tree_module.GAP_PX) < 2000  # paged when too wide
    for page in pages:
        width, height = Image.open(page).size
        assert width <= 2000 and height >= tree_module.TILE_PX * len(document["layers"])
    or_doc = json.loads(Path(paths["tree_or_json"]).read_text())
    assert Path(paths["tree_or_png"]).exists() and Image.open(paths["tree_or_png"]).size[0] <= 2000
    zs = torch.randn(or_doc["num_latents"], generator.latent_dim,
                     generator=torch.Generator().manual_seed(or_doc["seed"]))
    _, activations, _ = forward_with_masks(generator, zs)
    act = activations[or_doc["layer"]]
    root_positions = {tuple(r["position"]) for r in document["nodes"]}
    assert {tuple(p["position"]) for p in or_doc["positions"]} == root_positions
    for entry in or_doc["positions"]:
        y, x = entry["position"]
        for alt in entry["alternatives"]:
            fired = act[:, alt["channel"], y, x] > 0
            assert 0 < alt["frequency"] <= 1 and alt["frequency"] == pytest.approx(float(fired.float().mean()))
            assert fired[alt["strongest_sample"]]
