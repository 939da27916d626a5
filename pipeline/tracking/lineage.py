"""Where a run came from: its training data as an MLflow dataset input, the code version as tags, and
system metrics (CPU, memory, GPU) from rank 0.

* **Dataset input** (``log_dataset_input``): an ``mlflow.data`` ``MetaDataset`` whose source is the shards
  URL (a local path or ``s3://``), named ``data.dataset`` or else ``<folder>-<R>px``, digest = the manifest's SHA-256 (so two runs on
  the same bytes show the same dataset), profile = image counts per split, stored image size and the model
  resolution; logged with context ``training``. Reading the manifest already happened (``open_dataset``):
  nothing is re-read or hashed per image, so this costs the same for 10M images as for 100.
* **Code version** (``code_version_tags``): ``sparsegen.version`` (the installed package) and
  ``mlflow.source.git.commit`` (MLflow's own key, shown in the UI) when the code runs from a git checkout.
* **System metrics** (``system_metrics``): MLflow's ``SystemMetricsMonitor`` on rank 0's node, every
  ``interval_s`` seconds, into the training run (``system/cpu_utilization_percentage``, ...).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import warnings
from pathlib import Path

DATASET_CONTEXT = "training"


def log_dataset_input(tracking_uri: str, run_id: str, info, resolution: int, name: str | None = None) -> None:
    """Record the run's training data (a ``pipeline.data.DatasetInfo``) as an MLflow dataset input named
    ``name`` (``data.dataset``), by default after the shards' folder and image size."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    url = str(info.url)
    folder = Path(url.rstrip("/")).name or url
    name = name or (folder if folder.endswith(f"-{info.image_size}px") else f"{folder}-{info.image_size}px")
    with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either reading is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(url)
    described = MetaDataset(source=source, name=name, digest=info.manifest_sha256[:20]).to_dict()
    profile = {"num_examples": info.num_examples, "num_train": info.num_train, "num_holdout": info.num_holdout,
               "image_size_px": info.image_size, "model_resolution_px": resolution, "shards": len(info.shards),
               "kind": info.kind, "manifest_sha256": info.manifest_sha256}
    entity = Dataset(name=described["name"], digest=described["digest"], source_type=described["source_type"],
                     source=described["source"], profile=json.dumps(profile))
    from mlflow.exceptions import MlflowException

    dataset_input = DatasetInput(entity, tags=[InputTag("mlflow.data.context", DATASET_CONTEXT)])
    # Concurrent runs of one experiment on the same data (a search's trials, an ablation's arms) insert the
    # same dataset row at once; the loser's retry finds the row and only links it to its run.
    for attempt in range(3):
        try:
            MlflowClient(tracking_uri).log_inputs(run_id, datasets=[dataset_input])
            return
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def code_version_tags() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags: dict[str, str] = {}
    try:
        tags["sparsegen.version"] = version("sparsegen")
    except PackageNotFoundError:
        pass
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            tags["sparsegen.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0, enabled: bool = True):
    """MLflow's system-metrics monitor logging into ``run_id`` while the block runs."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
