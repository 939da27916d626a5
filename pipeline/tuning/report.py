"""What a finished search reports: the best trial, the Pareto front of two objectives, a table, a plot.

All functions work on plain trial records (dicts)::

    {"trial_id": str, "status": "finished" | "stopped" | "failed" | "unfinished",
     "params": {dotted key: value}, "metrics": {name: float}, "run_id": str | None, "run_name": str}
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable


def has_metrics(trial: dict, metrics: Iterable[str]) -> bool:
    values = trial.get("metrics") or {}
    return all(isinstance(values.get(m), (int, float)) and math.isfinite(values[m]) for m in metrics)


def best_trial(trials: list[dict], metric: str, mode: str) -> dict | None:
    """The best finished trial on ``metric``; trials a scheduler stopped count only if none finished."""
    for pool in ([t for t in trials if t["status"] == "finished"], [t for t in trials if t["status"] != "failed"]):
        candidates = [t for t in pool if has_metrics(t, [metric])]
        if candidates:
            key = (lambda t: t["metrics"][metric]) if mode == "min" else (lambda t: -t["metrics"][metric])
            return min(candidates, key=key)
    return None


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """a is at least as good as b on every objective and strictly better on one."""
    signed_a = [v if m == "min" else -v for v, m in zip(a, modes)]
    signed_b = [v if m == "min" else -v for v, m in zip(b, modes)]
    return all(x <= y for x, y in zip(signed_a, signed_b)) and any(x < y for x, y in zip(signed_a, signed_b))


def pareto_front(trials: list[dict], metrics: list[str], modes: list[str]) -> list[dict]:
    """Non-dominated finished trials (those with every objective), sorted by the first objective."""
    candidates = [t for t in trials if t["status"] == "finished" and has_metrics(t, metrics)]
    points = {t["trial_id"]: [float(t["metrics"][m]) for m in metrics] for t in candidates}
    front = [t for t in candidates
             if not any(dominates(points[o["trial_id"]], points[t["trial_id"]], modes) for o in candidates)]
    sign = 1 if modes[0] == "min" else -1
    return sorted(front, key=lambda t: sign * t["metrics"][metrics[0]])


def trials_table(trials: list[dict], keys: list[str], metrics: list[str], front_ids: set[str] = frozenset()) -> list[dict]:
    rows = []
    for t in sorted(trials, key=lambda t: t["trial_id"]):
        row: dict[str, Any] = {"trial_id": t["trial_id"], "status": t["status"]}
        row.update({k: t["params"].get(k) for k in keys})
        row.update({m: (t.get("metrics") or {}).get(m) for m in metrics})
        row["iterations"] = (t.get("metrics") or {}).get("training_iteration")
        if front_ids:
            row["pareto"] = t["trial_id"] in front_ids
        row["mlflow_run_id"] = t.get("run_id")
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (terminal output)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_metric_vs_params(trials: list[dict], keys: list[str], metric: str, path: str,
                          front_ids: set[str] = frozenset(), title: str | None = None) -> str | None:
    """One panel per searched parameter: ``metric`` of each trial against that parameter's value.

    Categorical (and mixed int/fraction k) values are placed at evenly spaced positions; stopped trials
    are drawn hollow, Pareto-front trials in red. Returns the path, or None when no trial has the metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [t for t in trials if has_metrics(t, [metric])]
    if not usable or not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for index, key in enumerate(keys):
        ax = axes[index // cols][index % cols]
        values = [t["params"].get(key) for t in usable]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        mixed = numeric and len({type(v) for v in values}) > 1  # k as ints and fractions
        if numeric and not mixed:
            xs = [float(v) for v in values]
        else:
            labels = sorted({repr(v) for v in values})
            xs = [labels.index(repr(v)) for v in values]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([label.strip("'") for label in labels], rotation=30)
        for x, t in zip(xs, usable):
            y = t["metrics"][metric]
            color = "tab:red" if t["trial_id"] in front_ids else "tab:blue"
            face = color if t["status"] == "finished" else "none"
            ax.scatter([x], [y], s=36, edgecolors=color, facecolors=face)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for index in range(len(keys), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.suptitle(title or f"{metric} per trial (hollow: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_pareto(trials: list[dict], metrics: list[str], modes: list[str], path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [t for t in trials if t["status"] == "finished" and has_metrics(t, metrics)]
    if not usable:
        return None
    front = pareto_front(trials, metrics, modes)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([t["metrics"][metrics[0]] for t in usable], [t["metrics"][metrics[1]] for t in usable],
               c="tab:blue", label="finished trials")
    ax.plot([t["metrics"][metrics[0]] for t in front], [t["metrics"][metrics[1]] for t in front],
            "o-", c="tab:red", label="Pareto front")
    ax.set_xlabel(f"{metrics[0]} ({modes[0]})")
    ax.set_ylabel(f"{metrics[1]} ({modes[1]})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
