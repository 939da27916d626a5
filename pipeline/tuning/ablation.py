"""Table 4 as one command: a sparse and a dense generator trained alike, evaluated alike, side by side.

``run_ablation(AblationSettings(...))``:

1. validates the arms and every arm's config (``AblationError`` / ``ConfigError`` before Ray starts) and
   finds the data (shards, a folder of images ingested once, or the built-in demo data);
2. creates the ablation's parent MLflow run;
3. fits a Ray Tune grid over the arms (``tune.grid_search``), each trial a full Ray Train run
   (``pipeline.distributed.trainer.train`` with the report relay, as a search's trials) whose MLflow run
   ``<name>-<arm>`` is a nested child of the parent. Every arm has the same seed (``training.seed``), data and
   budget (``training.max_steps``); up to ``max_concurrent`` arms train at once;
4. in each trial, after training: evaluates the trained generator and — once per sparsity pattern — its
   untrained initialisation (the same seed, the weights before any step, exactly as the training loop builds
   them) with ``pipeline.evaluation.orchestration.evaluate``, logging both into the arm's child run (the
   untrained figures as ``untrained_<metric>``);
5. logs the table (``ablation.json``, ``ablation.md``), the sparse/dense ratios (also as parent metrics
   ``ratio.<a>_over_<b>.<metric>``) and a side-by-side PNG of every arm's part-level basis functions into the
   parent run.

Arms: ``sparse`` is the preset as it is (with ``--set`` applied); ``dense`` sets every ``model.sparsity`` k to
null and ``sparsity_schedule.kind`` to fixed; the suffix ``-nocritic`` sets ``training.critic_weight`` to 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.distributed.placement import trial_driver_resources
from pipeline.tuning import runs
from pipeline.tuning.settings import FINAL_KEY, TrialSetup, parse_overrides

# The default training budget of every arm per preset (``--max-steps``). None: the preset's own budget
# (``training.epochs``). The lead sets the measured figure for tiny; nothing else reads this table.
ABLATION_MAX_STEPS: dict[str, int | None] = {
    "tiny": 800,
    "paper64": None,
    "celeba64": None,
    "fashion64": None,
    "cars64": None,
    "bedroom64": None,
}

BASE_ARMS = ("sparse", "dense")
NOCRITIC = "-nocritic"
VALID_ARMS = BASE_ARMS + tuple(a + NOCRITIC for a in BASE_ARMS)
DEFAULT_ARMS = ("sparse", "dense")
UNTRAINED = "untrained"

ARM_TAG = "sparsegen.arm"
ABLATION_TAG = "sparsegen.ablation"
RESULT_KEY = "ablation_result"  # the trial's final Tune result: the arm's evaluation as a JSON string
# CPUs a trial's driver (training driver, then the evaluation) claims besides its Train workers (as search.py).
TRIAL_DRIVER_CPUS = 0.5
BASIS_UNITS_PER_LATENT, BASIS_LATENTS = 8, 2  # basis functions per arm in the PNG: the 8 strongest of 2 Z's


class AblationError(ValueError):
    """Bad input to the ablation (an unknown arm, a bad budget, an existing name): one line, exit 2."""


@dataclass
class ArmSetup:
    """What every arm's Tune trial needs besides its arm name (pickled into each trial)."""

    trial: TrialSetup  # trial.search_name is the ablation's name
    arm_overrides: dict[str, dict[str, Any]]
    metrics: list[str]
    untrained_owner: dict[str, str]


@dataclass
class AblationPlan:
    """What ``prepare`` resolved from the settings, before Ray starts: every arm's config and the budget."""

    arms: list[str]
    base: Any  # pipeline.config.Config of the preset with the --set overrides
    overrides: dict[str, dict[str, Any]]  # arm -> dotted overrides that make its config
    configs: dict[str, Any]  # arm -> its validated Config
    max_steps: int | None
    epochs: float | None  # the budget in epochs when max_steps is None
    untrained_owner: dict[str, str]  # sparsity pattern -> the arm that evaluates its untrained initialisation
    per_trial_cpus: float  # a trial driver's CPUs + its Train workers'
    layer: str  # the part layer scored (evaluation.matching_layer)
    seed: int
    workers: int


@dataclass
class AblationSettings:
    name: str
    preset: str = "tiny"
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    data_url: str | None = None
    max_steps: int | None = None  # None: ABLATION_MAX_STEPS[preset]
    workers: int | None = None  # Train workers per arm (None: the preset's run.workers)
    max_concurrent: int | None = None  # arms training at once (None: as many as the CPUs allow)
    overrides: list[str] = field(default_factory=list)
    workdir: str | None = None
    tracking_uri: str | None = None
    address: str | None = None


# ---------------------------------------------------------------------------------------------------
# Arms


def parse_arms(text: str | list[str] | None) -> list[str]:
    """"sparse,dense" -> ["sparse", "dense"] (order kept, duplicates dropped); unknown arms raise."""
    if text is None:
        return list(DEFAULT_ARMS)
    items = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    unknown = [a for a in items if a not in VALID_ARMS]
    if unknown or not items:
        named = f"unknown arm(s) {', '.join(map(repr, unknown))}" if unknown else "no arms given"
        raise AblationError(f"{named}; --arms takes a comma-separated list of {', '.join(VALID_ARMS)}")
    return list(dict.fromkeys(items))


def pattern_of(arm: str) -> str:
    """The sparsity pattern of an arm ("sparse" or "dense"): arms sharing it share their initialisation."""
    return arm.removesuffix(NOCRITIC)


def arm_overrides(arm: str, layer_names: list[str]) -> dict[str, Any]:
    """The config overrides that make ``arm`` out of the base config (see the module docstring)."""
    overrides: dict[str, Any] = {}
    if pattern_of(arm) == "dense":
        overrides.update({f"model.sparsity.{name}": None for name in layer_names})
        overrides["sparsity_schedule.kind"] = "fixed"
    if arm.endswith(NOCRITIC):
        overrides["training.critic_weight"] = 0.0
    return overrides


def default_max_steps(preset: str) -> int | None:
    return ABLATION_MAX_STEPS.get(preset)


def ablation_metrics(has_ground_truth: bool) -> list[str]:
    """What each arm is evaluated on: mse, swd (when the evaluation layer has it), matching, parts (demo data)."""
    from pipeline.evaluation.orchestration import METRICS

    metrics = ["mse"] + (["swd"] if "swd" in METRICS else []) + ["matching"]
    return metrics + (["parts"] if has_ground_truth else [])


def headline_columns(layer: str, available: set[str] | None = None) -> list[str]:
    """The table's columns, in order (those not measured are dropped when ``available`` is given)."""
    columns = ["holdout_mse_pm1", "swd", f"matching_score_{layer}", f"matching_score_{layer}_image_mean",
               f"matching_score_{layer}_field", f"matching_score_{layer}_field_image_mean", f"matching_channels_{layer}",
               f"matching_reference_blob_{layer}", f"matching_reference_holdout_{layer}",
               f"parts_purity_{layer}", f"parts_purity_chance_{layer}", f"parts_nmi_{layer}"]
    if available is None:
        return columns
    return [c for c in columns if c in available]


def ratio_metrics(layer: str) -> list[str]:
    return [f"matching_score_{layer}", f"matching_score_{layer}_image_mean", f"matching_score_{layer}_field",
            f"matching_score_{layer}_field_image_mean", f"parts_nmi_{layer}", "holdout_mse_pm1"]


# ---------------------------------------------------------------------------------------------------
# Preparation (everything that can fail on bad input fails here, before Ray starts)


def prepare(settings: AblationSettings) -> "AblationPlan":
    """Validate arms, budget and configs; returns the plan (no data is touched)."""
    from pipeline.config import load_config

    arms = parse_arms(settings.arms)
    for flag, value in (("--max-steps", settings.max_steps), ("--workers", settings.workers),
                        ("--max-concurrent", settings.max_concurrent)):
        if value is not None and value < 1:
            raise AblationError(f"{flag} must be >= 1, got {value}")
    overrides = parse_overrides(settings.overrides)
    base = load_config(settings.preset, overrides)  # ConfigError on a bad preset or --set
    max_steps = settings.max_steps if settings.max_steps is not None else default_max_steps(settings.preset)
    common = dict(overrides)
    if max_steps is not None:
        common["training.max_steps"] = max_steps
    if settings.workers is not None:
        common["run.workers"] = settings.workers
    # Each arm is evaluated by the ablation itself (step 4), not by train()'s evaluation.at_end.
    common["evaluation.at_end"] = []
    per_arm = {arm: {**common, **arm_overrides(arm, base.layer_names())} for arm in arms}
    configs = {arm: load_config(settings.preset, values) for arm, values in per_arm.items()}
    # The first arm of each sparsity pattern evaluates that pattern's untrained initialisation.
    untrained_owner: dict[str, str] = {}
    for arm in arms:
        untrained_owner.setdefault(pattern_of(arm), arm)
    first = configs[arms[0]]
    per_trial_cpus = TRIAL_DRIVER_CPUS + first.run.workers * first.run.cpus_per_worker
    return AblationPlan(arms=arms, base=base, overrides=per_arm, configs=configs, max_steps=max_steps,
                        epochs=None if max_steps is not None else first.training.epochs,
                        untrained_owner=untrained_owner, per_trial_cpus=per_trial_cpus,
                        layer=base.evaluation.matching_layer, seed=first.training.seed, workers=first.run.workers)


def resolve_data(settings: AblationSettings, base, workdir: Path) -> tuple[str, Any]:
    """(shards URL, DatasetInfo): the given shards, a folder of images ingested once, or the demo data."""
    from pipeline.data import DataError, open_dataset, storage
    from pipeline.runtime import ensure_demo_data, ensure_shards

    url = settings.data_url or base.data.url
    if url is None:
        url = ensure_demo_data(base, workdir)
    else:
        if not storage.is_s3(url) and not Path(url).exists():
            raise DataError(f"--data {url} does not exist: give a shards folder or s3:// URL made by `sparsegen "
                            f"ingest`, a folder of images, or leave --data out for the built-in demo data")
        base.data.url = url
        url = ensure_shards(base, workdir)
    return url, open_dataset(url)


def default_concurrency(arms: int, per_trial_cpus: float, cluster_cpus: float | None = None) -> int:
    """Arms training at once. On this machine: all of them when its cores hold their Train workers (the trial
    drivers mostly wait: 2 arms x 1 worker run together on 2 cores). On a cluster: as many as its CPUs hold."""
    if cluster_cpus is not None:
        return max(1, min(arms, int(cluster_cpus // per_trial_cpus)))
    cores = os.cpu_count() or 1
    return max(1, min(arms, int(cores // max(per_trial_cpus - TRIAL_DRIVER_CPUS, 1e-9))))


# ---------------------------------------------------------------------------------------------------
# The run


def run_ablation(settings: AblationSettings) -> dict:
    """Train, evaluate, tabulate and log the arms; returns the summary (see ``summary_json``)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.runtime import init_ray, resolve_workdir
    from pipeline.tracking import mlflow_run

    started = time.monotonic()
    plan = prepare(settings)
    workdir = resolve_workdir(settings.workdir)
    tune_root = workdir / "tune"
    if (tune_root / settings.name).exists():
        raise AblationError(f"an ablation named {settings.name!r} already ran in {tune_root}: choose another --name")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = plan.base
    data_url, info = resolve_data(settings, base, workdir)
    metrics = ablation_metrics(info.has_ground_truth)
    tracking_uri = settings.tracking_uri or base.run.tracking_uri or mlflow_run.default_tracking_uri(workdir)
    experiment = base.run.experiment
    arms = plan.arms

    parent_params = {
        "ablation.name": settings.name, "ablation.preset": settings.preset, "ablation.arms": ",".join(arms),
        "ablation.max_steps": plan.max_steps, "ablation.epochs": plan.epochs,
        "ablation.workers": plan.workers, "ablation.seed": plan.seed, "ablation.metrics": ",".join(metrics),
        "ablation.data": data_url, "data.num_train": info.num_train, "data.num_holdout": info.num_holdout,
        **{f"set.{k}": v for k, v in parse_overrides(settings.overrides).items()},
    }
    parent_id, _ = runs.open_parent_run(
        tracking_uri, experiment, settings.name, parent_params, kind="ablation",
        artifact_root=str(workdir / "mlartifacts"),
        tags={ABLATION_TAG: settings.name, "sparsegen.preset": settings.preset})
    budget = f"{plan.max_steps} steps" if plan.max_steps else f"{plan.epochs:g} epochs"
    print(f"[sparsegen] ablation '{settings.name}': arms {', '.join(arms)}, {budget} each, seed {plan.seed}, "
          f"parent MLflow run {parent_id} at {tracking_uri}", flush=True)

    import ray

    joined = ray.is_initialized() or bool(settings.address or os.environ.get("RAY_ADDRESS"))
    if joined:  # a cluster (or the caller's Ray): its CPUs decide
        init_ray(settings.address, 1)
        max_concurrent = settings.max_concurrent or default_concurrency(
            len(arms), plan.per_trial_cpus, ray.cluster_resources().get("CPU", 1))
    else:  # an embedded Ray sized for the concurrent arms; evaluations share this machine's cores
        max_concurrent = settings.max_concurrent or default_concurrency(len(arms), plan.per_trial_cpus)
        init_ray(None, math.ceil(min(max_concurrent, len(arms)) * plan.per_trial_cpus))
    max_concurrent = min(max_concurrent, len(arms))
    print(f"[sparsegen] training {len(arms)} arm(s), {max_concurrent} at a time, {plan.workers} Ray Train "
          f"worker(s) each; then evaluating {', '.join(metrics)} of each trained arm and of "
          f"{len(plan.untrained_owner)} untrained initialisation(s)", flush=True)
    setup = ArmSetup(
        trial=TrialSetup(preset=settings.preset, overrides={}, data_url=data_url, workdir=str(workdir),
                         tracking_uri=tracking_uri, experiment=experiment, storage=str(workdir / "runs"),
                         search_name=settings.name, parent_run_id=parent_id),
        arm_overrides=plan.overrides, metrics=metrics, untrained_owner=plan.untrained_owner)
    trainable = tune.with_resources(tune.with_parameters(run_arm, setup=setup), trial_driver_resources(TRIAL_DRIVER_CPUS))
    tuner = tune.Tuner(
        trainable,
        param_space={"arm": tune.grid_search(arms)},
        # (max_concurrent_trials is ignored next to an explicit BasicVariantGenerator: the limit goes in it.)
        tune_config=tune.TuneConfig(num_samples=1, search_alg=BasicVariantGenerator(max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name=settings.name, storage_path=str(tune_root),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    mlflow_run.set_tags(tracking_uri, parent_id, {"sparsegen.ablation_status": "running"})
    results = tuner.fit()
    trained, untrained, failures, children, checkpoints = _collect(results, arms)
    for arm, error in failures.items():
        runs.mark_failed_by_name(tracking_uri, experiment, f"{settings.name}-{arm}", error)

    layer = plan.layer
    ratios = compute_ratios(trained, untrained, layer)
    summary = {
        "name": settings.name, "preset": settings.preset, "arms": trained, "untrained": untrained,
        "ratios": ratios, "parent_run_id": parent_id, "child_runs": children, "checkpoints": checkpoints,
        "layer": layer, "tracking_uri": tracking_uri,
        "experiment": experiment, "metrics_evaluated": metrics, "max_steps": plan.max_steps,
        "epochs": plan.epochs, "seed": plan.seed, "workers": plan.workers,
        "max_concurrent": max_concurrent, "failed": failures,
    }
    print("[sparsegen] drawing the arms' basis functions and logging the table into the parent run", flush=True)
    png = None
    try:
        png = basis_figure(summary, plan, workdir / "ablations" / settings.name)
    except Exception as exc:  # noqa: BLE001 - a figure must not lose the table
        print(f"[sparsegen] could not draw the basis functions: {exc}", flush=True)
    summary["wall_time_s"] = round(time.monotonic() - started, 1)
    log_summary(summary, png, workdir / "ablations" / settings.name)
    return summary


def run_arm(config: dict, setup: ArmSetup) -> None:
    """The Tune trainable of one arm (a Train driver, as ``pipeline.tuning.trial.run_trial``): train, then
    evaluate the trained generator and (when this arm owns it) the untrained initialisation."""
    import ray.tune

    from pipeline.distributed.trainer import train
    from pipeline.evaluation.orchestration import log_to_mlflow
    from pipeline.tuning.relay import ReportRelay
    from pipeline.tuning.trial import trial_config

    arm = config["arm"]
    name = setup.trial.search_name
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup.trial, setup.arm_overrides[arm])
    cfg.run.name = f"{name}-{arm}"
    tags = {runs.TRIAL_TAG: trial_id, runs.SEARCH_TAG: name, ABLATION_TAG: name, ARM_TAG: arm,
            runs.STATUS_TAG: "running", runs.KIND_TAG: "ablation-arm"}
    relay = ReportRelay()
    try:
        result = train(cfg, workdir=setup.trial.workdir, parent_run_id=setup.trial.parent_run_id,
                       callbacks=[relay.callback()], extra_tags=tags)
        run_id, tracking_uri = result["run_id"], setup.trial.tracking_uri
        # At the last training step, so these (not the loop's holdout_mse_pm1 on one batch) are the run's latest.
        step = int(result["metrics"].get("step", 0))

        out = Path(setup.trial.workdir) / "ablations" / name / arm
        print(f"[sparsegen] arm {arm}: trained to step {step}; evaluating "
              f"{', '.join(setup.metrics)} as a Ray task", flush=True)
        trained, artifacts = _evaluate(cfg, result["checkpoint"], setup, out / "trained")
        log_to_mlflow(run_id, trained, artifacts, tracking_uri=tracking_uri, step=step)
        report = {"arm": arm, "run_id": run_id, "checkpoint": result["checkpoint"], "trained": trained}
        if setup.untrained_owner.get(pattern_of(arm)) == arm:
            print(f"[sparsegen] arm {arm}: evaluating its untrained initialisation (seed {cfg.training.seed})", flush=True)
            untrained, artifacts = _evaluate(cfg, None, setup, out / "untrained")
            log_to_mlflow(run_id, {f"{UNTRAINED}_{k}": v for k, v in untrained.items()}, artifacts,
                          tracking_uri=tracking_uri, artifact_path="evaluation-untrained", step=step)
            report["untrained"] = untrained
    except BaseException:
        relay.close()
        raise
    runs.mark_finished(tracking_uri, run_id)
    relay.finish({FINAL_KEY: 1.0, "mlflow_run_id": run_id, RESULT_KEY: json.dumps(report)})


def _evaluate(cfg, checkpoint_uri: str | None, setup: ArmSetup, out: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The arm's trained checkpoint (or, with ``checkpoint_uri=None``, its untrained initialisation) evaluated
    as a Ray task with the arm's worker resources (``evaluate_on_ray``), files written under ``out``."""
    from pipeline.evaluation.orchestration import evaluate_on_ray

    results, artifacts, _ = evaluate_on_ray(cfg, checkpoint_uri, setup.trial.data_url, setup.metrics,
                                            out_dir=str(out), untrained=checkpoint_uri is None, seed=0)
    return {k: float(v) for k, v in results.items()}, artifacts


def _collect(results, arms: list[str]):
    """Per arm: trained metrics, failures, child run ids, checkpoints; untrained metrics per pattern (from
    Tune's ``ResultGrid``: each ``Result``'s config, last metrics and error)."""
    trained: dict[str, dict] = {}
    untrained: dict[str, dict] = {}
    failures: dict[str, str] = {}
    children: dict[str, str] = {}
    checkpoints: dict[str, str] = {}
    for result in results:
        arm = (result.config or {}).get("arm")
        last = dict(result.metrics or {})
        if RESULT_KEY not in last:
            failures[arm] = _trial_error(result)
            continue
        report = json.loads(last[RESULT_KEY])
        trained[arm] = report["trained"]
        children[arm] = report["run_id"]
        checkpoints[arm] = report["checkpoint"]
        if "untrained" in report:
            untrained[pattern_of(arm)] = report["untrained"]
    for arm in arms:
        if arm not in trained and arm not in failures:
            failures[arm] = "the arm did not run"
    order = {a: i for i, a in enumerate(arms)}
    trained = dict(sorted(trained.items(), key=lambda kv: order[kv[0]]))
    untrained = dict(sorted(untrained.items(), key=lambda kv: BASE_ARMS.index(kv[0])))
    return trained, untrained, failures, children, checkpoints


def _trial_error(result) -> str:
    text = str(result.error) if result.error is not None else ""
    if text.strip():
        return text[-2000:]
    return f"trial {(result.metrics or {}).get('trial_id')} ended without a result"


# ---------------------------------------------------------------------------------------------------
# Table, ratios, figure, logging


def compute_ratios(trained: dict[str, dict], untrained: dict[str, dict], layer: str) -> dict[str, dict]:
    """``"<sparse arm>/<dense arm>"`` -> {metric: sparse / dense} for every sparse arm whose dense twin ran,
    and ``"untrained-sparse/untrained-dense"``; a ratio of a missing or non-finite value is None."""
    pairs = [(arm, "dense" + arm[len("sparse"):], trained) for arm in trained if arm.startswith("sparse")]
    pairs.append((f"{UNTRAINED}-sparse", f"{UNTRAINED}-dense", {f"{UNTRAINED}-{k}": v for k, v in untrained.items()}))
    ratios: dict[str, dict] = {}
    for a, b, rows in pairs:
        if a not in rows or b not in rows:
            continue
        ratios[f"{a}/{b}"] = {m: _ratio(rows[a].get(m), rows[b].get(m)) for m in ratio_metrics(layer)
                              if m in rows[a] or m in rows[b]}
    return ratios


def _ratio(a, b):
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def table_rows(summary: dict) -> list[tuple[str, dict]]:
    rows = list(summary["arms"].items())
    rows += [(f"{UNTRAINED}-{pattern}", metrics) for pattern, metrics in summary["untrained"].items()]
    return rows


def format_table(summary: dict, layer: str, markdown: bool = False) -> str:
    """The table (arms and untrained initialisations as rows, headline metrics as columns) and the ratios."""
    rows = table_rows(summary)
    available = {m for _, metrics in rows for m in metrics}
    columns = headline_columns(layer, available)
    cell = lambda v: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"  # noqa: E731
    lines: list[str] = []
    if markdown:
        lines.append("| arm | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        lines += ["| " + name + " | " + " | ".join(cell(m.get(c)) for c in columns) + " |" for name, m in rows]
        for pair, ratio in summary["ratios"].items():
            lines.append(f"| **{pair}** | " + " | ".join(cell(ratio.get(c)) for c in columns) + " |")
        return "\n".join(lines) + "\n"
    width = max([len(n) for n, _ in rows] + [len(p) for p in summary["ratios"]] + [3]) + 2
    widths = [max(len(c), 9) + 2 for c in columns]
    lines.append("arm".ljust(width) + "".join(c.rjust(w) for c, w in zip(columns, widths)))
    for name, metrics in rows:
        lines.append(name.ljust(width) + "".join(cell(metrics.get(c)).rjust(w) for c, w in zip(columns, widths)))
    if summary["ratios"]:
        lines.append("ratios".ljust(width))
        for pair, ratio in summary["ratios"].items():
            lines.append(pair.ljust(width) + "".join(cell(ratio.get(c)).rjust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def summary_json(summary: dict) -> dict:
    """The --json object: arms, untrained, ratios, parent_run_id, wall_time_s (+ where things are)."""
    keys = ("arms", "untrained", "ratios", "parent_run_id", "wall_time_s", "child_runs", "checkpoints", "name",
            "preset", "layer", "max_steps", "epochs", "seed", "workers", "max_concurrent", "metrics_evaluated",
            "failed", "tracking_uri", "experiment")
    # Strict JSON: a non-finite value (e.g. a NaN score with nothing scored) becomes null.
    return json.loads(json.dumps({k: summary[k] for k in keys if k in summary}, default=str),
                      parse_constant=lambda _: None)


def basis_figure(summary: dict, plan: "AblationPlan", out: Path) -> Path | None:
    """A PNG with one row per arm (trained, then untrained): the part-level basis functions of the same Z's
    (the ``BASIS_UNITS_PER_LATENT`` strongest units of ``BASIS_LATENTS`` Z's), each drawn at its true size."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.distributed.checkpoint import load_generator
    from pipeline.evaluation.basis import to_display
    from pipeline.learning.learner import initial_generator
    from pipeline.evaluation.matching import units_for_matching

    layer = plan.layer
    generators = []
    for arm in summary["arms"]:
        generators.append((arm, load_generator(summary["checkpoints"][arm])))
    for pattern in summary["untrained"]:
        cfg = plan.configs[plan.untrained_owner[pattern]]
        generators.append((f"{UNTRAINED}-{pattern}", (cfg, initial_generator(cfg))))
    if not generators:
        return None
    rows = []
    for name, (cfg, generator) in generators:
        bases = units_for_matching(generator, layer, latent_dim=cfg.model.latent_dim, num_latents=BASIS_LATENTS,
                                   units_per_latent=BASIS_UNITS_PER_LATENT, seed=0)
        rows.append((name, [b.image for b in bases]))
    side = max([max(img.shape[1], img.shape[2]) for _, images in rows for img in images] + [1])
    cols = max([len(images) for _, images in rows] + [1])
    fig = Figure(figsize=(cols * 0.75 + 1.6, len(rows) * 0.8 + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    for r, (name, images) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
            if c >= len(images):
                continue
            canvas = np.ones((side, side, 3), np.float32)  # white margin: every crop at the same pixel scale
            tile = to_display(images[c])
            y0, x0 = (side - tile.shape[0]) // 2, (side - tile.shape[1]) // 2
            canvas[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
            ax.imshow(canvas, interpolation="nearest")
    fig.suptitle(f"ablation '{summary['name']}': {layer} basis functions of the same {BASIS_LATENTS} Z's per arm "
                 f"(strongest {BASIS_UNITS_PER_LATENT} units each, cropped to their support)", fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"basis_functions_{layer}.png"
    fig.savefig(path, bbox_inches="tight")
    return path


def log_summary(summary: dict, png: Path | None, out: Path) -> None:
    """ablation.json, ablation.md and the PNG into the parent run; ratios as parent metrics; parent FINISHED
    (FAILED when an arm failed)."""
    from pipeline.tracking import mlflow_run

    tracking_uri, parent_id = summary["tracking_uri"], summary["parent_run_id"]
    layer = summary["layer"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(summary_json(summary), indent=1))
    (out / "ablation.md").write_text(f"# Ablation '{summary['name']}' ({summary['preset']})\n\n"
                                     + format_table(summary, layer, markdown=True))
    for name in ("ablation.json", "ablation.md"):
        mlflow_run.log_artifact(tracking_uri, parent_id, str(out / name))
    if png is not None:
        mlflow_run.log_artifact(tracking_uri, parent_id, str(png))
    ratio_metrics_flat = {f"ratio.{pair.replace('/', '_over_')}.{metric}": value
                          for pair, ratios in summary["ratios"].items() for metric, value in ratios.items()
                          if value is not None}
    if ratio_metrics_flat:
        mlflow_run.log_metrics(tracking_uri, parent_id, ratio_metrics_flat, step=0)
    mlflow_run.set_tags(tracking_uri, parent_id, {"sparsegen.ablation_status": "failed" if summary["failed"] else "finished",
                                                  **{f"sparsegen.arm_run.{a}": r for a, r in summary["child_runs"].items()}})
    mlflow_run.finish_run(tracking_uri, parent_id, "FAILED" if summary["failed"] else "FINISHED")
    summary["artifacts"] = {"table_json": str(out / "ablation.json"), "table_md": str(out / "ablation.md"),
                            **({"basis_png": str(png)} if png else {})}
