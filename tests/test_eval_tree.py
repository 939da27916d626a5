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


def _pages(paths, key):
    """The pages of one picture in order: <key>, <key>_p2, <key>_p3, ..."""
    extra = sorted((k for k in paths if k.startswith(f"{key}_p")), key=lambda k: int(k.rsplit("_p", 1)[1]))
    return [paths[key], *(paths[k] for k in extra)]


def _assert_page_matches_layout(png, page, document, tile_px):
    """The PNG has the layout's size, at most 2000 px wide; every tile of the page lies inside it, is drawn
    (not blank) and tiles of one row do not overlap."""
    import numpy as np
    from PIL import Image

    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape[1::-1] == (page.width_px, page.height_px)
    assert page.width_px <= 2000 and page.height_px <= 2000
    rows = {}
    for x, y in page.tiles.values():
        assert 0 <= x and x + tile_px <= page.width_px and 0 <= y and y + tile_px <= page.height_px
        square = picture[y : y + tile_px, x : x + tile_px].astype(int)
        assert (np.abs(square - 255).sum(axis=-1) > 0).mean() > 0.5  # a drawn tile, not white page
        rows.setdefault(y, []).append(x)
    for xs in rows.values():
        xs.sort()
        assert all(b - a >= tile_px for a, b in zip(xs, xs[1:]))
    roots = [document["nodes"][i] for i in page.roots]
    assert {n["id"] for n in _walk(roots)} >= set(page.tiles)


def test_tree_page_has_48_px_tiles_within_2000_px_and_the_or_view_of_the_roots(tmp_path, tiny_generator):
    from PIL import Image

    from pipeline.evaluation.tree import tree_layout

    _, generator = tiny_generator
    z = torch.randn(1, generator.latent_dim, generator=torch.Generator().manual_seed(0))
    paths, document = write_tree(generator, z, tmp_path, roots=6, children=3, or_latents=16)
    assert {"tree_json", "tree_npz", "tree_png", "tree_or_json", "tree_or_npz", "tree_or_png"} <= set(paths)
    layout = tree_layout(document)
    assert layout.tile_px >= 48 and layout.children_cap is None
    assert len(layout.pages) == 1 and _pages(paths, "tree_png") == [tmp_path / "and_or_tree.png"]
    page = layout.pages[0]
    assert page.roots == list(range(len(document["nodes"])))
    assert set(page.tiles) == {n["id"] for n in _walk(document["nodes"])}  # every node drawn on the one page
    _assert_page_matches_layout(paths["tree_png"], page, document, layout.tile_px)
    # Parents sit above their children, one row per layer.
    for node in _walk(document["nodes"]):
        for child in node["children"]:
            assert page.tiles[child["id"]][1] > page.tiles[node["id"]][1]
    # The OR view: one row per distinct root position, labelled with the roots there.
    or_doc = json.loads(Path(paths["tree_or_json"]).read_text())
    assert [tuple(p["position"]) for p in or_doc["positions"]] == list(
        dict.fromkeys(tuple(r["position"]) for r in document["nodes"]))
    for entry in or_doc["positions"]:
        assert all(document["nodes"][k - 1]["position"] == entry["position"] for k in entry["roots"])
    assert Image.open(paths["tree_or_png"]).size[0] <= 2000


def test_many_roots_are_paged_and_a_narrow_page_draws_the_strongest_children(tmp_path, tiny_generator):
    from pipeline.evaluation.tree import render_tree, tree_layout

    _, generator = tiny_generator
    z = torch.randn(1, generator.latent_dim, generator=torch.Generator().manual_seed(0))
    paths, document = write_tree(generator, z, tmp_path, roots=30, children=3, or_latents=8)
    assert len(document["nodes"]) == 30
    layout = tree_layout(document)
    pages = _pages(paths, "tree_png")
    assert len(pages) == len(layout.pages) >= 2
    assert pages[1] == tmp_path / "and_or_tree_p2.png"
    assert [i for p in layout.pages for i in p.roots] == list(range(30))  # each root once, in order
    for png, page in zip(pages, layout.pages):
        _assert_page_matches_layout(png, page, document, layout.tile_px)
    or_pages = _pages(paths, "tree_or_png")
    assert len(or_pages) >= 2 and or_pages[1] == tmp_path / "and_or_tree_or_p2.png"
    from PIL import Image

    assert all(Image.open(p).size[0] <= 2000 and Image.open(p).size[1] <= 2000 for p in or_pages)

    # A page too narrow for a full subtree draws only the strongest children per node, still >= 48 px tiles.
    narrow = tree_layout(document, page_width_px=800)
    assert narrow.children_cap is not None and narrow.children_cap < 3
    written = render_tree(document, _arrays_of(tmp_path), tmp_path / "narrow.png",
                          page_width_px=800)
    assert len(written) == len(narrow.pages)
    for png, page in zip(written, narrow.pages):
        assert page.width_px <= 800
        _assert_page_matches_layout(png, page, document, narrow.tile_px)


def _arrays_of(directory):
    import numpy as np

    with np.load(directory / "and_or_tree.npz") as data:
        return {k: data[k] for k in data.files}


def test_or_alternatives_are_channels_that_fire_there_in_a_direct_forward(tiny_generator):
    from pipeline.evaluation.tree import or_alternatives

    _, generator = tiny_generator
    positions = [(0, 0), (3, 4), (7, 7)]
    document, arrays = or_alternatives(generator, "conv8", positions, num_latents=16, top=5, seed=1)
    json.dumps(document)
    assert document["num_latents"] == 16 and document["layer"] == "conv8"
    assert [tuple(p["position"]) for p in document["positions"]] == positions
    z = torch.randn(16, generator.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, activations, _ = generator(z, return_masks=True)
    act = activations["conv8"]
    for entry in document["positions"]:
        y, x = entry["position"]
        fires = act[:, :, y, x] > 0  # (Z, channels)
        assert entry["distinct_channels"] == int(fires.any(0).sum())
        assert entry["fires_fraction"] == pytest.approx(float(fires.any(1).float().mean()))
        alternatives = entry["alternatives"]
        assert len(alternatives) == min(5, entry["distinct_channels"]) and alternatives
        frequencies = [a["frequency"] for a in alternatives]
        assert frequencies == sorted(frequencies, reverse=True)
        for alt in alternatives:
            c = alt["channel"]
            assert 0 < alt["frequency"] <= 1
            assert alt["frequency"] == pytest.approx(float(fires[:, c].float().mean()))
            assert fires[alt["strongest_sample"], c]  # fires in at least one Z: its strongest one
            assert alt["activation"] == pytest.approx(float(act[:, c, y, x].max()), rel=1e-5)
            assert arrays[alt["basis_key"]].shape[0] == 3 and arrays[alt["basis_key"]].size > 0
            assert f"image_s{alt['strongest_sample']}" in arrays
        # No channel more frequent than the listed ones was left out.
        assert float(fires.float().mean(0).max()) == pytest.approx(frequencies[0])
    with pytest.raises(ValueError):
        or_alternatives(generator, "conv8", [(8, 0)], num_latents=2)
