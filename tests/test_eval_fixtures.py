"""Shared fixtures of the evaluation tests (imported by the test_eval_* modules; no tests here)."""

import pytest
import torch

_CACHE: dict = {}


@pytest.fixture
def demo_data(tmp_path_factory):
    """A small demo dataset at 32 px (tiny's resolution), made once per session: 60 images, ~20% holdout."""
    if "demo" not in _CACHE:
        from pipeline.data import make_demo_data

        root = tmp_path_factory.mktemp("eval-demo")
        make_demo_data(str(root / "data"), n=60, size=32, seed=0, holdout_fraction=0.2)
        _CACHE["demo"] = str(root / "data")
    return _CACHE["demo"]


@pytest.fixture
def no_holdout_data(tmp_path):
    """10 demo images at 32 px, all in the train split (no holdout split)."""
    from pipeline.data import make_demo_data

    data = str(tmp_path / "no-holdout")
    make_demo_data(data, n=10, size=32, seed=0, holdout_fraction=0.0)
    return data


@pytest.fixture
def tiny_generator():
    """(cfg, randomly initialised tiny SparseGenerator in eval mode), cheap Langevin settings."""
    from pipeline.config import load_config
    from pipeline.model import build_generator

    cfg = load_config("tiny", ["langevin.steps=2", "evaluation.matching_images=20", "evaluation.mse_images=8",
                               "training.batch_size=16"])
    torch.manual_seed(0)
    return cfg, build_generator(cfg).eval()
