"""End-of-training evaluation runs as a Ray task with the training workers' resources, not in the driver
(issue 13 item 2); the multi-node test (tests/test_multinode.py) checks that its metrics land in MLflow."""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_TRAINING_OVERRIDES


def _cfg(*overrides):
    from pipeline.config import load_config

    return load_config("tiny", [*FAST_TRAINING_OVERRIDES, "evaluation.mse_images=8", *overrides])


def test_resources_are_the_training_workers():
    from pipeline.evaluation.orchestration import evaluation_resources

    # GPU runs: one worker's GPU share and CPUs.
    assert evaluation_resources(_cfg("run.workers=4", "run.gpus_per_worker=1", "run.cpus_per_worker=2")) == \
        {"num_cpus": 2.0, "num_gpus": 1.0}
    # CPU runs: the workers' CPUs together, as far as one node holds them, at least one worker's.
    cpu = _cfg("run.workers=2", "run.cpus_per_worker=1")
    assert evaluation_resources(cpu) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert evaluation_resources(cpu, cluster_node_cpus=[0.0, 1.0, 1.0]) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert evaluation_resources(_cfg("run.workers=1", "run.cpus_per_worker=3"), [2.0]) == \
        {"num_cpus": 3.0, "num_gpus": 0.0}


@pytest.fixture
def checkpoint(tmp_path):
    from pipeline.distributed.checkpoint import write_checkpoint
    from pipeline.learning import LatentBank
    from pipeline.model import build_generator

    cfg = _cfg()
    torch.manual_seed(0)
    generator = build_generator(cfg)
    bank = LatentBank(128, cfg.model.latent_dim, seed=0)
    return cfg, write_checkpoint(tmp_path / "checkpoint", cfg, {"generator": generator.state_dict()}, bank,
                                 {"step": 0})


@pytest.mark.ray
def test_evaluation_runs_as_a_ray_task_and_its_files_come_back(ray_session, checkpoint, demo_shards, tmp_path):
    from pipeline.evaluation.orchestration import evaluate_on_ray

    cfg, uri = checkpoint
    out = tmp_path / "evaluations" / "run"
    metrics, artifacts, where = evaluate_on_ray(cfg, uri, demo_shards, ["mse", "tree"], out_dir=out)
    assert where["pid"] != os.getpid(), "the evaluation ran in the driver process"
    assert where["node_id"] == ray_session.get_runtime_context().get_node_id()  # one node here
    assert where["device"] == "cpu" and where["assigned_resources"].get("CPU") == 1.0  # one tiny worker's CPU
    assert metrics["holdout_mse_pm1"] > 0 and metrics["tree_nodes"] > 0
    assert all(Path(path).is_file() and Path(path).is_relative_to(out) for path in artifacts.values())
    assert (out / "and_or_tree.png").is_file()
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["ran_on"]["pid"] == where["pid"] and summary["metrics"]["holdout_mse_pm1"] == metrics["holdout_mse_pm1"]


@pytest.mark.ray
def test_untrained_initialisation_is_evaluated_in_a_task_exactly_as_in_process(ray_session, demo_shards, tmp_path):
    """The ablation's untrained baseline: built in the task from the config, seeded as a run starts, so it
    scores what the same initialisation scores in-process."""
    from pipeline.evaluation.orchestration import evaluate, evaluate_on_ray
    from pipeline.learning.learner import initial_generator

    cfg = _cfg()
    metrics, _, where = evaluate_on_ray(cfg, None, demo_shards, ["mse"], out_dir=tmp_path / "task", untrained=True,
                                        seed=0)
    assert where["pid"] != os.getpid()
    local, _ = evaluate(cfg, initial_generator(cfg), demo_shards, ["mse"], out_dir=str(tmp_path / "local"),
                        progress=False, seed=0)
    assert metrics["holdout_mse_pm1"] == pytest.approx(local["holdout_mse_pm1"], rel=1e-5)
