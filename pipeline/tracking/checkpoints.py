"""Checkpoints in MLflow: a training run's final and best checkpoint as run artifacts, and the way back.

Ray storage (``run.storage``) keeps the rolling checkpoints that fault tolerance restores from; MLflow keeps
the ones a person comes back to, under ``checkpoints/final`` and ``checkpoints/best`` of the run (the same
files as in Ray storage: state.pt, config.json, latents parts, meta.json), uploaded through the tracking
store's artifact repository (on the stack, the server's proxied S3 store). Which ones: ``run.mlflow_checkpoints``.
"best" is the kept checkpoint (``run.checkpoints_to_keep``) with the lowest ``holdout_mse_pm1``.

``checkpoint_for_run`` resolves a run id to a checkpoint directory for ``train --resume-from RUN_ID``,
``evaluate --run`` and ``sample --run``: the run's checkpoint in Ray storage while it exists, else the MLflow
copy, downloaded once into a cache directory. ``resolve_generator`` is the one place that turns a run id, a
checkpoint URI or a model URI into ``(config, generator)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_ARTIFACT_DIR = "checkpoints"
CHECKPOINT_LABELS = ("final", "best")
CACHE_ENV = "SPARSEGEN_CHECKPOINT_CACHE"


def _client(tracking_uri: str | None):
    from pipeline.tracking.mlflow_run import client

    return client(tracking_uri)


def log_checkpoint(tracking_uri: str, run_id: str, checkpoint_uri: str, label: str) -> str:
    """Upload the checkpoint at ``checkpoint_uri`` (local or s3://) as ``checkpoints/<label>``; returns that
    artifact path."""
    from pipeline.distributed.checkpoint import copy_checkpoint

    if label not in CHECKPOINT_LABELS:
        raise ValueError(f"checkpoint label must be one of {CHECKPOINT_LABELS}, got {label!r}")
    artifact_path = f"{CHECKPOINT_ARTIFACT_DIR}/{label}"
    # Only the checkpoint's own files (Ray may leave markers of its own beside them), local or from S3.
    with tempfile.TemporaryDirectory(prefix="sparsegen-ckpt-") as directory:
        _client(tracking_uri).log_artifacts(run_id, copy_checkpoint(checkpoint_uri, directory), artifact_path)
    return artifact_path


def logged_checkpoints(tracking_uri: str | None, run_id: str) -> list[str]:
    """Labels of the checkpoints run ``run_id`` holds as MLflow artifacts."""
    entries = _client(tracking_uri).list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)
    return [Path(entry.path).name for entry in entries if entry.is_dir and Path(entry.path).name in CHECKPOINT_LABELS]


def _readable(uri: str) -> bool:
    from pipeline.data import storage
    from pipeline.distributed.checkpoint import META_FILE

    try:
        storage.read_bytes(storage.join(uri.removeprefix("file://"), META_FILE))
        return True
    except Exception:  # missing file, gone bucket, unreachable endpoint: fall back to the MLflow copy
        return False


def checkpoint_for_run(tracking_uri: str | None, run_id: str, label: str = "final") -> str:
    """A checkpoint directory of training run ``run_id`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_run import CHECKPOINT_TAG

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise LookupError(f"no MLflow run {run_id} at {tracking_uri or 'the default tracking URI'}") from exc
    tagged = run.data.tags.get(CHECKPOINT_TAG)
    if label == "final" and tagged and _readable(tagged):
        return tagged
    if label in logged_checkpoints(tracking_uri, run_id):
        cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "sparsegen-checkpoints")
        target = cache / run_id / label
        if not (target / "meta.json").exists():
            partial = cache / run_id / f".{label}-downloading-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            downloaded = client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACT_DIR}/{label}", str(partial))
            shutil.rmtree(target, ignore_errors=True)
            Path(downloaded).rename(target)
            shutil.rmtree(partial, ignore_errors=True)
        return str(target)
    where = f"its Ray storage checkpoint {tagged} is gone and " if tagged else ""
    raise LookupError(f"MLflow run {run_id} has no '{label}' checkpoint: {where}no "
                      f"'{CHECKPOINT_ARTIFACT_DIR}/{label}' artifact (was it made by `sparsegen train`?)")


def resolve_generator(*, run_id: str | None = None, checkpoint: str | None = None, model_uri: str | None = None,
                      tracking_uri: str | None = None, device: str = "cpu"):
    """(config, generator in eval mode) from exactly one of a run id, a checkpoint URI or a model URI."""
    given = [name for name, value in (("run", run_id), ("checkpoint", checkpoint), ("model-uri", model_uri)) if value]
    if len(given) != 1:
        raise ValueError("give exactly one of --run, --checkpoint or --model-uri"
                         + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    if model_uri:
        from pipeline.tracking.models import load_generator as load_model

        return load_model(model_uri, tracking_uri, device)
    from pipeline.distributed.checkpoint import load_generator

    uri = checkpoint or checkpoint_for_run(tracking_uri, run_id)
    return load_generator(uri, device)
