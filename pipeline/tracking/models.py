"""The trained generator as an MLflow model: logged, registrable, loadable without this project's checkpoints.

``log_generator`` logs the generator with ``mlflow.pytorch.log_model`` (artifact name ``generator``) into a
training run: a signature latents (N, latent_dim) float32 -> images (N, 3, R, R) float32 in [-1, 1], an input
example, and the run's config as ``config.json`` among the model's extra files, so that ``sample`` and
``reconstruct`` (which needs the Langevin settings) can use a model URI alone. ``load_generator`` is the way
back: ``(config, generator in eval mode)`` from ``runs:/<run>/generator``, ``models:/<name>/<version>`` or a
local model directory.

The module is pickled by reference to ``pipeline.model``: loading needs this package installed (as serving any
custom PyTorch module does); ``pip_requirements`` name torch's version so MLflow does not try to infer them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, config_from_dict

MODEL_NAME = "generator"
MODEL_CONFIG_FILE = "config.json"
MODEL_URI_TAG = "sparsegen.model_uri"


class ModelLoadError(LookupError):
    pass


def log_generator(tracking_uri: str, run_id: str, generator: torch.nn.Module, cfg: Config, *,
                  registered_model_name: str | None = None, step: int = 0) -> str:
    """Log ``generator`` into run ``run_id``; returns the model URI (``models:/<model_id>``).

    ``registered_model_name`` also registers it as a new version of that registered model.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from pipeline.tracking import mlflow_run

    module = _plain_copy(generator)
    latents = torch.randn(2, cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = module(latents)
    example = latents.numpy().astype(np.float32)
    signature = infer_signature(example, images.numpy().astype(np.float32))
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        config_path = Path(directory) / MODEL_CONFIG_FILE
        config_path.write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
        # The fluent API logs into the active run: attach to the training run without ending it (the driver
        # sets its final status).
        active = mlflow.active_run()
        status_before = mlflow_run.client(tracking_uri).get_run(run_id).info.status
        if active is None or active.info.run_id != run_id:
            mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pytorch.log_model(
                module, name=MODEL_NAME, signature=signature, input_example=example,
                extra_files=[str(config_path)], registered_model_name=registered_model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], step=step,
                await_registration_for=60, serialization_format="pickle",
            )
        finally:
            if active is None:
                _detach_keeping_status(run_id, status_before)
    model_uri = info.model_uri
    mlflow_run.set_tags(tracking_uri, run_id, {MODEL_URI_TAG: model_uri})
    return model_uri


def _detach_keeping_status(run_id: str, status: str) -> None:
    """End the fluent run started above, then give the run back the status it had (``end_run`` marks it
    FINISHED; a training run is still RUNNING until its driver finishes it)."""
    import mlflow

    mlflow.end_run()
    mlflow.MlflowClient().update_run(run_id, status=status)


def _plain_copy(generator: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode CPU copy of the bare module (no DDP wrapper, no channels-last weights)."""
    import copy

    module = getattr(generator, "module", generator)
    module = copy.deepcopy(module).to("cpu").eval()
    for parameter in module.parameters():
        parameter.data = parameter.data.contiguous()
        parameter.requires_grad_(True)
    return module


def load_generator(model_uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu"):
    """(config, generator in eval mode) of a logged generator model."""
    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(model_uri) if Path(model_uri).is_dir() else Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri))
    except Exception as exc:  # MlflowException for an unknown run, model or version
        raise ModelLoadError(f"cannot load the model {model_uri}: {str(exc).splitlines()[0]}") from exc
    config_file = next(iter(local.rglob(MODEL_CONFIG_FILE)), None)
    if config_file is None:
        raise ModelLoadError(f"{model_uri} is not a sparsegen generator model (no {MODEL_CONFIG_FILE} in it)")
    cfg = config_from_dict(json.loads(config_file.read_text()))
    generator = mlflow.pytorch.load_model(str(local), map_location=device)
    generator.eval()
    return cfg, generator


def model_uri_of_run(tracking_uri: str, run_id: str) -> str | None:
    """The model URI a run logged (tag ``sparsegen.model_uri``), or None."""
    from pipeline.tracking import mlflow_run

    return mlflow_run.client(tracking_uri).get_run(run_id).data.tags.get(MODEL_URI_TAG)
