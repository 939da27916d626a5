"""Search-space files: a small YAML schema, validated against the real config before any trial starts.

Schema (every top-level key but ``parameters`` is optional)::

    description: free text
    metric: reconstruction_mse            # objective; or a list of two for a Pareto search
    mode: min                             # min | max, or a list matching metric
    trials: 8                             # default --trials
    max_concurrent: 2                     # default --max-concurrent
    search: optuna                        # optuna | random | grid
    scheduler: asha                       # asha | pbt | none, or a mapping:
    #   {kind: asha, metric: reconstruction_mse, mode: min, grace_period: 1, reduction_factor: 2}
    #   {kind: pbt, metric: holdout_mse_pm1, mode: min, perturbation_interval: 2, quantile_fraction: 0.25,
    #    resample_probability: 0.25, burn_in_period: 0}   # intervals count Ray Train checkpoints
    set:                                  # fixed overrides applied to every trial (dotted keys)
      training.max_steps: 600
    parameters:                           # dotted config key -> one distribution
      langevin.steps: {choice: [10, 20, 30]}
      langevin.step_size: {loguniform: [0.05, 0.5]}
      langevin.noise_sigma: {uniform: [0.1, 0.5]}
      model.sparsity.conv8: {choice: [8, 16, 0.5]}   # ints = k units, floats in (0, 1] = fraction of H*W
      sparsity_schedule.kind: {choice: [fixed, dense_then_anneal]}
      sparsity_schedule.dense_epochs: {randint: [0, 4]}           # inclusive bounds
      training.critic_weight: {choice: [0.0, 1.0]}

Distributions: ``choice: [v, ...]``, ``uniform: [lo, hi]``, ``loguniform: [lo, hi]`` (lo > 0),
``randint: [lo, hi]`` (integers, both ends included), ``value: v`` (a constant).

``load_space`` checks the file's shape, then builds the base config with sample values of every parameter
(each choice, both ends of each range) so unknown keys (with did-you-mean), bad distributions and values
that make an invalid config all surface together as one ``SpaceError`` before Ray starts.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "value")
SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "pbt", "none")
MODES = ("min", "max")
TOP_LEVEL = ("description", "metric", "mode", "trials", "max_concurrent", "search", "scheduler", "set", "parameters")
SCHEDULER_KEYS = {
    "asha": ("kind", "metric", "mode", "grace_period", "reduction_factor", "max_t"),
    "pbt": ("kind", "metric", "mode", "perturbation_interval", "quantile_fraction", "resample_probability",
            "burn_in_period"),
    "none": ("kind",),
}
# Keys a trial may not vary: they name where the trial's run lives, not how it trains.
NOT_SEARCHABLE = ("run.name", "run.storage", "run.tracking_uri", "run.experiment", "data.url", "preset")
# The metrics reported at every Ray Train checkpoint (the only ones available before the end of a trial):
# the training batch's reconstruction MSE, and the holdout MSE of a fixed holdout batch (Langevin from the
# prior; present when the data has a holdout split). INTERMEDIATE_METRIC is the default objective.
INTERMEDIATE_METRIC = "reconstruction_mse"
INTERMEDIATE_METRICS = ("reconstruction_mse", "holdout_mse_pm1")
# End-of-training evaluations that produce a metric (prefix -> evaluation.at_end entry).
METRIC_SOURCES = (("holdout_mse", "mse"), ("matching_", "matching"), ("fid", "fid"), ("parts_", "parts"),
                  ("tree_", "tree"))
SPACES_DIR = Path(__file__).parent / "spaces"


class SpaceError(ValueError):
    """A malformed search-space file; ``problems`` lists one message per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid search space {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class Param:
    key: str
    kind: str  # one of DISTRIBUTIONS
    args: Any

    def samples(self) -> list[Any]:
        """Values that stand for the distribution when validating (every choice, both ends of ranges)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "value":
            return [self.args]
        lo, hi = self.args
        if self.kind == "randint":
            return [int(lo), int(hi)]
        return [float(lo), float(hi)]

    def describe(self) -> str:
        if self.kind == "value":
            return f"value {self.args!r}"
        return f"{self.kind} {list(self.args)!r}"

    def is_categorical(self) -> bool:
        return self.kind in ("choice", "value")

    def to_tune(self, search: str):
        from ray import tune

        if search == "grid":
            values = list(self.args) if self.kind == "choice" else [self.args]
            return tune.grid_search(values)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "value":
            return self.args
        lo, hi = self.args
        if self.kind == "uniform":
            return tune.uniform(float(lo), float(hi))
        if self.kind == "loguniform":
            return tune.loguniform(float(lo), float(hi))
        return tune.randint(int(lo), int(hi) + 1)  # tune.randint excludes its upper bound


@dataclass
class SearchSpace:
    source: str
    parameters: list[Param]
    metric: list[str] = field(default_factory=lambda: [INTERMEDIATE_METRIC])
    mode: list[str] = field(default_factory=lambda: ["min"])
    trials: int | None = None
    max_concurrent: int | None = None
    search: str | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def param(self, key: str) -> Param:
        return next(p for p in self.parameters if p.key == key)

    def param_space(self, search: str) -> dict[str, Any]:
        """Ray Tune's ``param_space``: dotted config keys -> Tune domains."""
        return {p.key: p.to_tune(search) for p in self.parameters}

    def grid_size(self) -> int:
        size = 1
        for p in self.parameters:
            size *= len(p.args) if p.kind == "choice" else 1
        return size

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def resolve_space_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped space (``paper``, ``cpu-small``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = SPACES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.exists() and path.parent == Path("."):
        return shipped
    names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    raise SpaceError(name_or_path, [f"search space file not found: {name_or_path} (shipped spaces: {', '.join(names)})"])


def shipped_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(
    name_or_path: str,
    *,
    preset: str = "tiny",
    overrides: list[str] | dict[str, Any] | None = None,
    search: str | None = None,
    metric: list[str] | None = None,
    mode: list[str] | None = None,
) -> SearchSpace:
    """Parse and validate a search-space file against ``preset`` + ``overrides`` (+ the file's ``set``).

    ``search``/``metric``/``mode`` are the command-line choices (they win over the file); they take part
    in validation (grid search needs only ``choice`` parameters; metric and mode must pair up).
    """
    path = resolve_space_path(name_or_path)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(source, [f"not valid YAML: {exc}"]) from None
    return parse_space(raw, source=source, preset=preset, overrides=overrides, search=search, metric=metric,
                       mode=mode)


def parse_space(
    raw: Any,
    *,
    source: str = "<space>",
    preset: str = "tiny",
    overrides: list[str] | dict[str, Any] | None = None,
    search: str | None = None,
    metric: list[str] | None = None,
    mode: list[str] | None = None,
) -> SearchSpace:
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpaceError(source, ["expected a mapping at the top level with a 'parameters' section"])
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(_unknown("top-level key", key, list(TOP_LEVEL)))

    params = _parse_parameters(raw.get("parameters"), problems)
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        problems.append(f"set: expected a mapping of dotted config keys to values, got {fixed!r}")
        fixed = {}

    file_metric = raw.get("metric", INTERMEDIATE_METRIC)
    file_mode = raw.get("mode", "min")
    metrics = _as_list(metric if metric else file_metric, "metric", problems)
    modes = _as_list(mode if mode else file_mode, "mode", problems)
    if len(modes) == 1 and len(metrics) > 1 and not mode and "mode" not in raw:
        modes = modes * len(metrics)  # no mode given anywhere: minimise every objective
    for m in modes:
        if m not in MODES:
            problems.append(_unknown("mode", m, list(MODES)))
    if len(metrics) != len(modes):
        problems.append(f"metric/mode: {len(metrics)} metric(s) {metrics} but {len(modes)} mode(s) {modes}")
    if len(metrics) > 2:
        problems.append(f"metric: at most two objectives are supported, got {metrics}")
    if len(set(metrics)) != len(metrics):
        problems.append(f"metric: the objectives must differ, got {metrics}")

    search_kind = search or raw.get("search")
    if search_kind is not None and search_kind not in SEARCHES:
        problems.append(_unknown("search", search_kind, list(SEARCHES)))
    if search_kind == "grid":
        for p in params:
            if not p.is_categorical():
                problems.append(f"parameters.{p.key}: grid search needs 'choice' values, got {p.kind}")

    scheduler = _parse_scheduler(raw.get("scheduler"), problems)
    for name in ("trials", "max_concurrent"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{name}: expected a positive integer, got {value!r}")

    # Config-level checks of the well-formed parameters, so every mistake is reported in one go.
    problems.extend(_check_against_config(params, fixed, preset, overrides))
    if problems:
        raise SpaceError(source, problems)
    return SearchSpace(
        source=source, parameters=params, metric=metrics, mode=modes, trials=raw.get("trials"),
        max_concurrent=raw.get("max_concurrent"), search=raw.get("search"), scheduler=scheduler,
        fixed=dict(fixed), description=str(raw.get("description") or ""), raw=raw,
    )


def required_evaluations(metrics: list[str]) -> list[str]:
    """The ``evaluation.at_end`` entries that produce these metrics (none for training metrics)."""
    needed = []
    for metric in metrics:
        for prefix, evaluation in METRIC_SOURCES:
            if metric.startswith(prefix) and evaluation not in needed:
                needed.append(evaluation)
    return needed


# ---------------------------------------------------------------------------------------------------


def _parse_parameters(section: Any, problems: list[str]) -> list[Param]:
    if section is None:
        problems.append("parameters: missing; give at least one dotted config key with a distribution")
        return []
    if not isinstance(section, dict) or not section:
        problems.append(f"parameters: expected a non-empty mapping of dotted config keys, got {section!r}")
        return []
    params = []
    for key, spec in section.items():
        key = str(key)
        where = f"parameters.{key}"
        if key in NOT_SEARCHABLE or key.startswith("run.") and key.split(".")[-1] in ("name", "storage"):
            problems.append(f"{where}: cannot be searched (it says where a run lives, not how it trains)")
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            problems.append(f"{where}: expected one distribution like {{choice: [...]}} or {{loguniform: [lo, hi]}}, "
                            f"got {spec!r}")
            continue
        ((kind, args),) = spec.items()
        if kind not in DISTRIBUTIONS:
            problems.append(f"{where}: " + _unknown("distribution", kind, list(DISTRIBUTIONS)))
            continue
        problem = _check_distribution(kind, args)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        params.append(Param(key, kind, args))
    return params


def _check_distribution(kind: str, args: Any) -> str | None:
    if kind == "value":
        return None
    if kind == "choice":
        if not isinstance(args, list) or not args:
            return f"choice needs a non-empty list of values, got {args!r}"
        for value in args:
            if isinstance(value, (dict, list)):
                return f"choice values must be scalars, got {value!r}"
        if len({repr(v) for v in args}) != len(args):
            return f"choice lists a value twice: {args!r}"
        return None
    if not isinstance(args, list) or len(args) != 2:
        return f"{kind} needs [low, high], got {args!r}"
    lo, hi = args
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not numeric or not all(math.isfinite(v) for v in (lo, hi)):
        return f"{kind} bounds must be finite numbers, got {args!r}"
    if kind == "randint" and not all(isinstance(v, int) for v in (lo, hi)):
        return f"randint bounds must be integers, got {args!r}"
    if not lo < hi:
        return f"{kind} needs low < high, got {args!r}"
    if kind == "loguniform" and lo <= 0:
        return f"loguniform needs low > 0, got {args!r}"
    return None


def _parse_scheduler(value: Any, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict) or "kind" not in value:
        problems.append(f"scheduler: expected asha|pbt|none or a mapping with 'kind', got {value!r}")
        return {}
    kind = value["kind"]
    if kind not in SCHEDULERS:
        problems.append(_unknown("scheduler", kind, list(SCHEDULERS)))
        return {}
    for key in value:
        if key not in SCHEDULER_KEYS[kind]:
            problems.append(f"scheduler: " + _unknown(f"{kind} option", key, list(SCHEDULER_KEYS[kind])))
    for key in ("grace_period", "reduction_factor", "max_t", "perturbation_interval"):
        if key in value and (not isinstance(value[key], (int, float)) or value[key] <= 0):
            problems.append(f"scheduler.{key}: expected a positive number, got {value[key]!r}")
    if "mode" in value and value["mode"] not in MODES:
        problems.append(_unknown("scheduler mode", value["mode"], list(MODES)))
    for key, lo, hi, text in (("quantile_fraction", 0.0, 0.5, "in (0, 0.5]"),
                              ("resample_probability", 0.0, 1.0, "in [0, 1]"),
                              ("burn_in_period", 0.0, math.inf, ">= 0")):
        if key not in value:
            continue
        number = value[key]
        ok = isinstance(number, (int, float)) and not isinstance(number, bool) and lo <= number <= hi
        if key == "quantile_fraction" and ok and number == 0:
            ok = False
        if not ok:
            problems.append(f"scheduler.{key}: expected a number {text}, got {number!r}")
    return dict(value)


def _as_list(value: Any, what: str, problems: list[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    problems.append(f"{what}: expected a name or a list of names, got {value!r}")
    return []


def _check_against_config(params: list[Param], fixed: dict[str, Any], preset: str,
                          overrides: list[str] | dict[str, Any] | None) -> list[str]:
    """Build the config with each parameter's sample values; every distinct mistake once."""
    from pipeline.config import ConfigError, _parse_overrides, load_config

    problems: list[str] = []
    base = _parse_overrides(overrides, problems)
    base.update({str(k): v for k, v in fixed.items()})
    try:
        load_config(preset, base)
    except ConfigError as exc:
        return [f"set/--set: {p}" for p in exc.problems]

    seen: set[str] = set()

    def attempt(values: dict[str, Any], label: str) -> None:
        try:
            load_config(preset, {**base, **values})
        except ConfigError as exc:
            for problem in exc.problems:
                if problem not in seen:
                    seen.add(problem)
                    problems.append(f"{label}: {problem}")

    # Each value on its own first (unknown keys, out-of-range values), then with the other parameters
    # that passed alone, at their first and at their last values (k's and schedules interact).
    good = []
    for p in params:
        before = len(problems)
        for sample in p.samples():
            attempt({p.key: sample}, f"parameters.{p.key}={sample!r}")
        if len(problems) == before:
            good.append(p)
    if len(good) > 1 and len(good) == len(params):
        first = {p.key: p.samples()[0] for p in good}
        for p in good:
            for sample in p.samples()[1:]:
                attempt({**first, p.key: sample}, f"parameters.{p.key}={sample!r} with the others at their first values")
        attempt({p.key: p.samples()[-1] for p in good}, "parameters all at their last values")
    return problems


def _unknown(what: str, name: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(map(str, choices))}"
    return f"unknown {what} {name!r}{hint}"
