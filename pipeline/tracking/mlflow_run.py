"""MLflow conventions: one MLflow run per training run, found again by its name on resume.

* The run is created by the driver before the Ray workers start and its id travels to them, so worker
  restarts log into the same run; resubmitting the same ``--name`` finds it by the tag
  ``sparsegen.run_name`` and reuses it (exactly one MLflow run per training run).
* Params are the full resolved config, flattened (``langevin.steps``...). Nothing that looks like a
  credential is ever logged: keys and values are screened by ``redact``.
* Default store for embedded runs: ``sqlite:///<workdir>/mlflow.db`` with artifacts in
  ``<workdir>/mlartifacts``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RUN_NAME_TAG = "sparsegen.run_name"
CHECKPOINT_TAG = "sparsegen.checkpoint"
PARENT_TAG = "mlflow.parentRunId"
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key|session_key)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(AKIA|ASIA)[A-Z0-9]{12,}|aws_secret_access_key", re.IGNORECASE)


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local sqlite store keeps artifacts beside it; a tracking server decides its own location.
    location = None
    if artifact_root and tracking_uri.startswith("sqlite:"):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def redact(params: dict[str, object]) -> dict[str, str]:
    """Stringified params with anything credential-like removed (keys by name, values by pattern)."""
    clean: dict[str, str] = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if _SECRET_KEY.search(key) or _SECRET_VALUE.search(text):
            continue
        clean[key] = text[:6000]
    return clean


def find_run(tracking_uri: str, experiment_id: str, run_name: str):
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=2
    )
    return runs[0] if runs else None


def get_or_create_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, object],
    *,
    artifact_root: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """(run_id, resumed). Params are logged once, at creation (MLflow params are immutable)."""
    from mlflow.entities import Param, RunTag

    experiment_id = ensure_experiment(tracking_uri, experiment, artifact_root)
    existing = find_run(tracking_uri, experiment_id, run_name)
    mlflow_client = client(tracking_uri)
    if existing is not None:
        mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    clean = redact(params)
    items = [Param(k, v) for k, v in clean.items()]
    for start in range(0, len(items), 100):  # MLflow's log_batch limit is 100 params per call
        mlflow_client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id, False


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client(tracking_uri).log_batch(run_id, metrics=batch)


def log_artifact(tracking_uri: str, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    client(tracking_uri).log_artifact(run_id, local_path, artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in redact(tags).items()])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)
