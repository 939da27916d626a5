"""`sparsegen compare`: training runs side by side, from the MLflow store.

``compare_runs`` gathers runs (by id, or every training run of an experiment, optionally only one search's
trials), keeps the params whose values differ between them and the chosen metrics (latest value of each),
and returns rows for a terminal table. ``side_by_side_png`` places each run's latest sample grid
(artifacts under ``samples/``) above its AND-OR tree (``evaluation/*tree*.png``) in one picture.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from pipeline.tuning.runs import KIND_TAG, SEARCH_TAG, STATUS_TAG, TRIAL_TAG

# Metrics shown first when --metrics is not given (when the runs have them).
PREFERRED_METRICS = ("holdout_mse_pm1", "holdout_mse_01", "fid", "reconstruction_mse", "langevin_mse", "step")
MAX_DEFAULT_METRICS = 6
# Params that always differ between runs and say nothing about how they trained.
IGNORED_PARAMS = ("run.name", "run.storage", "run.tracking_uri", "data.url", "data.manifest_sha256")


class CompareError(RuntimeError):
    pass


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: absolute on a tracking server, else relative to `mlflow ui`'s
    default address (local stores have no server of their own)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_runs(tracking_uri: str, *, experiment: str | None = None, run_ids: list[str] | None = None,
                 metrics: list[str] | None = None, search: str | None = None,
                 include_searches: bool = False) -> dict:
    from pipeline.tracking import mlflow_run

    client = mlflow_run.client(tracking_uri)
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception as exc:
                raise CompareError(f"no MLflow run {run_id} at {tracking_uri} ({type(exc).__name__})") from None
    else:
        name = experiment or "sparsegen"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise CompareError(f"no MLflow experiment {name!r} at {tracking_uri} (experiments: {', '.join(names) or 'none'})")
        filters = f"tags.`{SEARCH_TAG}` = '{search}'" if search else ""
        runs = client.search_runs([exp.experiment_id], filter_string=filters, max_results=1000,
                                  order_by=["attributes.start_time ASC"])
        if not include_searches:
            runs = [r for r in runs if r.data.tags.get(KIND_TAG) != "search"]
    if not runs:
        raise CompareError("no runs to compare")

    all_params = [r.data.params for r in runs]
    keys = sorted({k for p in all_params for k in p})
    differing = [k for k in keys if k not in IGNORED_PARAMS and len({p.get(k) for p in all_params}) > 1]
    available = sorted({m for r in runs for m in r.data.metrics})
    if metrics:
        chosen = list(metrics)
    else:
        chosen = [m for m in PREFERRED_METRICS if m in available]
        chosen += [m for m in available if m.startswith("matching_score_") and not m.endswith("image_mean")]
        chosen = chosen[:MAX_DEFAULT_METRICS]
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
            "trial": tags.get(TRIAL_TAG), "trial_status": tags.get(STATUS_TAG),
        }
        row["url"] = run_url(tracking_uri, run.info.experiment_id, run.info.run_id)
        row.update({k: _number(run.data.params.get(k)) for k in differing})
        row.update({m: run.data.metrics.get(m) for m in chosen})
        rows.append(row)
    return {"tracking_uri": tracking_uri, "experiment": experiment, "runs": rows, "params": differing,
            "metrics": chosen, "available_metrics": available,
            "ui": f"mlflow ui --backend-store-uri {tracking_uri} --port 5000"}


def side_by_side_png(tracking_uri: str, run_ids: list[str], out_path: str, titles: list[str] | None = None) -> dict:
    """One column per run: its latest sample grid above its AND-OR tree; missing pictures are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pipeline.tracking import mlflow_run

    client = mlflow_run.client(tracking_uri)
    found: dict[str, dict[str, str | None]] = {}
    with tempfile.TemporaryDirectory() as directory:
        pictures = []
        for run_id in run_ids:
            samples = _latest(_list_pngs(client, run_id, "samples"))
            tree = _latest([p for p in _list_pngs(client, run_id, "evaluation") if "tree" in Path(p).name])
            found[run_id] = {"samples": samples, "tree": tree}
            pictures.append([_download(client, run_id, a, directory) if a else None for a in (samples, tree)])
        rows = 2 if any(p[1] for p in pictures) else 1
        cols = len(run_ids)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
        for c, (run_id, pics) in enumerate(zip(run_ids, pictures)):
            for r in range(rows):
                ax = axes[r][c]
                ax.axis("off")
                path = pics[r]
                if path:
                    ax.imshow(Image.open(path).convert("RGB"))
                else:
                    ax.text(0.5, 0.5, "no " + ("samples" if r == 0 else "AND-OR tree"), ha="center", va="center")
                if r == 0:
                    ax.set_title((titles[c] if titles else run_id[:8]), fontsize=9)
        fig.tight_layout()
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
    return found


def _number(text: str | None) -> Any:
    """MLflow params are strings; numbers come back as numbers (tables format them compactly)."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _list_pngs(client, run_id: str, folder: str) -> list[str]:
    try:
        return [a.path for a in client.list_artifacts(run_id, folder) if a.path.endswith(".png")]
    except Exception:
        return []


def _latest(paths: list[str]) -> str | None:
    """The artifact with the highest step number in its name (samples_step0000040.png), else the last."""
    if not paths:
        return None
    def step(path: str) -> int:
        numbers = re.findall(r"(\d+)", Path(path).name)
        return int(numbers[-1]) if numbers else -1
    return max(paths, key=lambda p: (step(p), p))


def _download(client, run_id: str, artifact: str, directory: str) -> str | None:
    try:
        return client.download_artifacts(run_id, artifact, str(Path(directory) / run_id))
    except Exception:
        return None
