"""The typed objects that cross module boundaries in ``pipeline/tuning`` (instead of untyped dicts).

* ``SearchSettings`` -- what `sparsegen tune` asks for (the CLI -> ``search.run_search``)
* ``SchedulerOptions`` / ``SearchPlan`` -- a search as resolved by ``search.prepare`` (space + flags + config)
* ``TrialSetup`` -- what every trial of a search (or arm of an ablation) needs; handed to the Tune trainable
* ``StartPlan`` -- where a PBT trial starts (``pbt.plan_start`` -> ``trial.run_trial`` / ``runs.attach_pbt_start``)
* ``FINAL_KEY`` -- the key of the one result a trial reports after training and evaluation
* ``plain`` / ``parse_overrides`` -- sampled values and ``--set`` items as plain Python values

Standard library only: every other tuning module imports this one, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FINAL_KEY = "sparsegen_final"
# The Train checkpoint's URI in a relayed Train report (pipeline.tuning.relay) that came with one.
CHECKPOINT_PATH_KEY = "checkpoint_path"
# A trial's failure budget when --max-failures is not given: a trial that fails (a lost node, a crashed
# driver) is restarted once; it continues from its latest Ray Train checkpoint.
DEFAULT_MAX_FAILURES = 1


@dataclass
class SearchSettings:
    name: str
    space: str
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    data_url: str | None = None
    workdir: str | None = None
    # Trial checkpoints (<storage>/runs) and Tune state (<storage>/tune): a path every node sees, or s3://.
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    trials: int | None = None
    max_concurrent: int | None = None
    scheduler: str | None = None
    search: str | None = None
    metric: list[str] | None = None
    mode: list[str] | None = None
    seed: int | None = None
    # Restarts of a failed trial (None: DEFAULT_MAX_FAILURES); each continues from its latest checkpoint.
    max_failures: int | None = None


@dataclass
class SchedulerOptions:
    """The trial scheduler: ``kind`` (asha | pbt | none), the intermediate ``metric`` / ``mode`` it acts on,
    and its own options from the space's ``scheduler`` mapping (grace_period, perturbation_interval, ...)."""

    kind: str
    metric: str | None = None
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> "SchedulerOptions":
        rest = {k: v for k, v in mapping.items() if k not in ("kind", "metric", "mode")}
        return cls(kind=mapping.get("kind", "asha"), metric=mapping.get("metric"), mode=mapping.get("mode"),
                   options=rest)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """As the space spells it: {kind, metric, mode, **options} (absent entries left out)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.metric is not None:
            out["metric"] = self.metric
        if self.mode is not None:
            out["mode"] = self.mode
        out.update(self.options)
        return out


@dataclass
class SearchPlan:
    """A search resolved before Ray starts (``search.prepare``)."""

    search: str  # optuna | random | grid
    scheduler: SchedulerOptions
    trials: int
    per_trial_cpus: float
    max_concurrent: int | None
    overrides: dict[str, Any]  # --set and the space's fixed values, as dotted key -> value
    max_failures: int = DEFAULT_MAX_FAILURES

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scheduler"] = self.scheduler.to_dict()
        return out


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled values (pickled into each Tune trial)."""

    preset: str
    overrides: dict[str, Any]
    data_url: str
    workdir: str
    tracking_uri: str
    experiment: str
    storage: str  # Ray Train storage of the trials' runs
    search_name: str  # the search (or ablation): MLflow tag sparsegen.search, prefix of the trials' run names
    parent_run_id: str
    scheduler: str = "none"  # asha | pbt | none


@dataclass
class StartPlan:
    """Where a (re)started trial trains: its Train run, the checkpoint it starts from (None: the run's own
    latest, or a fresh start), the donor trial of an exploit (None: no exploit) and the Tune checkpoint's
    pointer it was planned from."""

    train_run: str
    resume_from: str | None = None
    donor: str | None = None
    pointer: dict[str, Any] | None = None
    seed_step: int | None = None  # the step of the copied donor checkpoint (exploits only)


def plain(value: Any) -> Any:
    """numpy scalars (what some Tune domains sample) -> Python scalars, so config type checks pass."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: plain(v) for k, v in sorted(config.items())}


def parse_overrides(overrides: list[str] | dict | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {dotted key: value}; ``ConfigError`` listing every malformed item."""
    from pipeline.config import ConfigError, _parse_overrides

    problems: list[str] = []
    parsed = _parse_overrides(overrides, problems)
    if problems:
        raise ConfigError(problems)
    return parsed
