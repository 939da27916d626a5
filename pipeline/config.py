"""One typed configuration for everything sparsegen does.

A config is built from a preset (``PRESETS``), optionally a YAML file, and ``key=value`` overrides with
dotted keys (``langevin.steps=20``, ``model.sparsity.conv8=0.25``). It is validated before any work starts:
each mistake gets one message, all messages are reported together. The resolved config is plain data
(``to_dict``) and is saved inside every checkpoint and as MLflow params.

Units are in the names: ``langevin.step_size`` is δ of Eq. 13, ``langevin.noise_sigma`` is σ of Eq. 14,
``training.batch_size`` is images per optimiser step per worker.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

# A k value: int = units kept, float in (0, 1] = fraction of the layer's extent (H·W for spatial top-k,
# channels for the channel top-k of the first layer), None = dense (no top-k).
KValue = Union[int, float, None]


class ConfigError(ValueError):
    """One or more configuration mistakes; ``problems`` lists one message per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class ModelConfig:
    resolution: int = 64
    latent_dim: int = 100
    # Channels of the 4x4 map produced by the FC layer (Table 1: 3200).
    fc_channels: int = 3200
    # "dense": the paper's Table 1 reading, FC -> 4x4x3200 with top-k along the 3200 channels per cell.
    # "cells": the authors' demo reading, 3200 = cell_channels x 16 cells; each cell owns its own slot of
    # cell_channels channels (index v*16 + p), top-k over those per cell.
    first_layer: str = "dense"
    cell_channels: int = 200
    # Output channels of the conv block after each x2 upsampling (4 -> 8 -> ... -> resolution).
    widths: list[int] = field(default_factory=lambda: [512, 256, 128, 64])
    convs_per_block: int = 2
    # k per sparsified layer, keyed by layer name (fc4, conv8, conv16, ...). Missing or None = dense.
    sparsity: dict[str, KValue] = field(
        default_factory=lambda: {"fc4": 8, "conv8": 16, "conv16": 64, "conv32": 256, "conv64": None}
    )
    # "keep": every unit >= the k-th largest value survives (the authors' rule; ties may keep > k).
    # "exact": exactly k units survive (ties broken by torch.topk's order).
    sparsity_ties: str = "keep"
    # Which units a conv layer's top-k chooses among. "spatial" (Eq. 6's text): for each channel, the k
    # largest of the H*W positions. "channel" (Sec. 3.2 and Fig. 1's reading, where each position of the
    # grid is an OR-node choosing among the layer's d channels): at each position, the k largest channels.
    conv_sparsity_axis: str = "spatial"
    critic_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    critic_first_width: int = 64
    critic_convs_per_block: int = 2
    leaky_relu_slope: float = 0.2
    # Both start from the same function (He-normal weights). "equalized": N(0,1) weights scaled by
    # sqrt(2/fan_in) at run time (the authors' demo), so Adam moves every layer by ~lr relative to its
    # weights; "standard": the scaled weights are the parameters, so Adam's ~lr step is lr / sqrt(2/fan_in)
    # times larger relative to them (about 17x for tiny's 64-channel convs).
    weight_scaling: str = "equalized"


@dataclass
class SparsityScheduleConfig:
    # "fixed": the target k from the first step. "dense_then_anneal": dense for dense_epochs, then k goes
    # geometrically from the layer's full extent down to the target over anneal_epochs.
    kind: str = "fixed"
    dense_epochs: float = 0.0
    anneal_epochs: float = 0.0


@dataclass
class LangevinConfig:
    steps: int = 30  # l_G of Algorithm 1
    # delta of Eq. 13 and sigma of Eq. 14 (observation noise, pixels in [-1, 1]): the first author's later
    # ABP code (REFERENCE.md). sigma = 0.3 (the UCLA release) declares residuals of std 0.3 to be noise, so
    # the posterior never narrows below an MSE of ~0.09: on the demo data it left reconstructions grey
    # (holdout MSE 0.115 sparse / 0.063 dense after 400 steps, against 0.092 / 0.049 with 0.1). delta = sigma
    # keeps the drift delta^2 / (2 sigma^2) of Eq. 13 at 0.5 while the noise kick shrinks 3x.
    step_size: float = 0.1
    noise_sigma: float = 0.1
    # What a non-finite Z or energy does: "raise" (clear error naming step and settings) or "backoff"
    # (restart the batch's chain from its start with step_size halved, up to max_backoffs times, then raise).
    on_divergence: str = "raise"
    max_backoffs: int = 3
    # Clip the per-example gradient norm of Eq. 13's drift term (None = no clipping; the UCLA ABP code clips).
    grad_clip_norm: float | None = None


@dataclass
class TrainingConfig:
    batch_size: int = 100
    epochs: float = 2000.0
    max_steps: int | None = None
    # Wall-clock budget of the training loop in minutes (None = none): the run stops at the first log
    # interval (run.log_every_steps) past it, on every rank at the same step, and ends as at max_steps
    # (final checkpoint, end-of-training evaluation). Counted per invocation: a resumed run gets it anew.
    # For job slots with a time limit, and `sparsegen demo`'s fixed wall time on machines of any speed.
    max_train_minutes: float | None = None
    seed: int = 0
    generator_lr: float = 7e-4
    generator_betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    # Decoupled (AdamW) weight decay of the generator's weight matrices and kernels (not biases), per unit
    # of learning rate: each step multiplies them by (1 - generator_lr * generator_weight_decay). With
    # equalized weights the kernels start as N(0, 1) noise and Adam moves them ~lr per step, so after a few
    # thousand steps they are still mostly their random start; the decay fades it. On `tiny` decay 1 cleaned
    # the basis functions at 400 steps but collapsed the prior samples by 1,600 (docs/results.md "Why the basis
    # functions were colour speckle"), so it is off by default. 0 = plain Adam.
    generator_weight_decay: float = 0.0
    critic_lr: float = 7e-4
    critic_betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    # Weight of Eq. 20 in the generator update; 0 = pure alternating back-propagation (critic unused).
    # Eq. 15 sums D squared residuals / (2 sigma^2) per image, while the critic's energies stay near +-1
    # (critic_energy_l2), so at weight 1 Eq. 20 was 1e-4 of Step 3's gradient and changed nothing. The
    # share is logged per step (grad_norm_critic vs grad_norm_reconstruction); tiny's value was chosen on
    # SWD over 4 seeds (docs/results.md "A critic that matters"). Eq. 15 grows with the pixel count and Eq. 20 does
    # not: with the paper presets' own widths at 64 px, 1000 gave the critic 0.002-0.02 of the gradient over
    # the first 40 steps, 10000 gives 0.02-0.27, closing on tiny's 0.08-0.37 at 3000 over the same steps
    # (docs/results.md "The paper presets' critic weight"). Their effect on SWD at that scale is not measured.
    critic_weight: float = 10000.0
    # Weight of an L2 penalty on the critic's energies, mean f(Y)^2 + mean f(g(Z^))^2, added to Eq. 21.
    # Eq. 21 alone is unbounded below: without it the energies drift to +-1e4 within a few hundred steps
    # and the Eq. 20 term swamps reconstruction (seen on the demo data). The penalty is the usual energy
    # regulariser of EBM training (Du & Mordatch, 2019); 0 = Eq. 21 exactly.
    critic_energy_l2: float = 1.0
    lr_decay_per_epoch: float = 1.0
    # "auto": bf16 autocast on CUDA, fp32 on CPU.
    precision: str = "auto"
    # Keep conv weights and activations in channels-last layout: oneDNN (CPU) and cuDNN (bf16 tensor
    # cores) run 3x3 convs without layout reorders (measured 1.2-1.7x per Langevin step on CPU).
    channels_last: bool = True


@dataclass
class DataConfig:
    # Local path or s3:// URL of shards made by `sparsegen ingest` / `make-demo-data`; None = built-in demo data.
    url: str | None = None
    # Name of the dataset in MLflow (the run's dataset input); None = "<folder of data.url>-<R>px".
    dataset: str | None = None
    limit: int | None = None
    holdout_fraction: float = 0.05
    on_error: str = "skip"
    demo_images: int = 2000


@dataclass
class RunConfig:
    name: str | None = None
    experiment: str = "sparsegen"
    storage: str | None = None
    tracking_uri: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    log_every_steps: int = 10
    eval_every_steps: int = 200
    checkpoint_every_steps: int = 200
    checkpoints_to_keep: int = 2
    # Checkpoints also kept as MLflow run artifacts at the end of training ("final", "best"; [] = none).
    mlflow_checkpoints: list[str] = field(default_factory=lambda: ["final", "best"])
    # Register the logged generator model under this name in the MLflow model registry (None = don't).
    register_model: str | None = None
    max_failures: int = 2
    # Fault injection for tests: crash this rank once when it reaches this step (-1 = off).
    crash_rank: int = -1
    crash_at_step: int = -1


@dataclass
class EvaluationConfig:
    # Metrics computed at the end of training (subset of fid, mse, matching, tree, parts, swd).
    at_end: list[str] = field(default_factory=lambda: ["mse", "matching", "tree"])
    matching_layer: str = "conv8"
    matching_images: int = 200
    mse_images: int = 1000
    fid_samples: int | None = None
    inception_weights: str | None = None
    # Langevin inference of *unseen* images (holdout MSE, parts, reconstruction grids). It starts from the
    # prior N(0, I), not from a persistent Z warmed over many epochs, so it needs a longer chain than
    # training's langevin.steps (provisional default; choose it from `python -m
    # pipeline.evaluation.inference_curve` on a trained model).
    inference_steps: int = 100
    # The last N of those steps are gradient steps without the delta * E kick, so the returned Z is a
    # posterior-mode estimate, not a sample carrying the last step's noise (0 = plain Langevin to the end;
    # N >= the chain length = gradient descent throughout, so a shorter explicit chain stays noise-free).
    inference_noise_free_steps: int = 20
    # delta of Eq. 13 for inference; None = langevin.step_size (the value the generator was trained with).
    inference_step_size: float | None = None
    # Sliced Wasserstein distance (Karras et al. 2018): generated images vs as many holdout images (train
    # images when there is no holdout split), at most this many.
    swd_images: int = 1000


@dataclass
class Config:
    preset: str = "paper64"
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity_schedule: SparsityScheduleConfig = field(default_factory=SparsityScheduleConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (MLflow params, the tuner's search keys)."""
        return _flatten(self.to_dict())

    # -- derived architecture facts -------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Names of the sparsifiable layers, in generation order: fc4, conv8, conv16, ..."""
        return ["fc4"] + [f"conv{4 * 2 ** (i + 1)}" for i in range(len(self.model.widths))]

    def layer_extent(self, name: str) -> int:
        """How many units a top-k of this layer chooses among: channels for fc4; for convs H*W positions, or
        the layer's channels with ``conv_sparsity_axis = "channel"``."""
        if name == "fc4":
            return self.model.cell_channels if self.model.first_layer == "cells" else self.model.fc_channels
        if self.model.conv_sparsity_axis == "channel":
            return self.model.widths[self.layer_names().index(name) - 1]
        side = int(name[len("conv"):])
        return side * side

    def resolved_k(self, name: str, value: KValue = "unset") -> int | None:
        """The integer k of a layer (fractions resolved against the layer's extent), None when dense."""
        if value == "unset":
            value = self.model.sparsity.get(name)
        if value is None:
            return None
        extent = self.layer_extent(name)
        if isinstance(value, float):
            return max(1, int(round(value * extent)))
        return int(value)


# ---------------------------------------------------------------------------------------------------
# Presets. paper64 is Table 1 exactly; the dataset presets share it and differ in data defaults.

def _paper64() -> Config:
    return Config(preset="paper64")


def _dataset_preset(name: str, dataset: str, limit: int | None) -> Config:
    cfg = _paper64()
    cfg.preset = name
    cfg.data.dataset = dataset
    cfg.data.limit = limit
    return cfg


def _tiny() -> Config:
    # Sized so a useful run finishes in minutes on 2 CPU cores: 32x32 images, narrow layers, fewer
    # Langevin steps. The sparsity pattern follows Table 1 (H*W/4 per channel at each spatial layer).
    # k, learning rate and Langevin settings were chosen by the sparse-vs-dense ablation on the demo data
    # (docs/results.md "What makes the sparse model learn"): the part layer conv8 keeps Table 1's H*W/4; fc4 keeps
    # 16 of 128 channels (Table 1's 8 of 3200 has 25x more channels to choose from) and conv16 half its
    # positions, because with tiny's narrow layers the paper's ratios left the sparse arm 1.7x worse.
    # Standard weight scaling with lr 1e-3: with equalized weights Adam's step is ~lr of N(0, 1) kernels,
    # which after 1,600 steps were still 95-98 % their random draw; standard reached better holdout MSE
    # and part NMI in 800 steps than equalized (lr 2e-3) in 1,600 (docs/results.md "Where Adam's step lives").
    cfg = Config(preset="tiny")
    cfg.model = ModelConfig(
        resolution=32,
        latent_dim=32,
        fc_channels=128,
        cell_channels=32,
        widths=[64, 32, 16],
        sparsity={"fc4": 16, "conv8": 16, "conv16": 128, "conv32": None},
        critic_widths=[32, 64, 128],
        critic_first_width=16,
        weight_scaling="standard",
    )
    cfg.langevin = LangevinConfig(steps=10, step_size=0.1, noise_sigma=0.1)
    # critic_weight 3000: Eq. 15 sums D squared residuals per image while the energy penalty keeps f near +-1,
    # so the weight carries that scale; at 3000 the critic's share of Step 3's gradient is material and it beats
    # critic-off on SWD at equal steps over seeds, with both weight scalings (docs/results.md "A critic that matters").
    cfg.training = TrainingConfig(batch_size=32, epochs=30.0, generator_lr=1e-3, generator_betas=[0.5, 0.999],
                                  critic_weight=3000.0)
    cfg.data = DataConfig(demo_images=1024, holdout_fraction=0.1)
    cfg.run = RunConfig(log_every_steps=5, eval_every_steps=100, checkpoint_every_steps=100)
    cfg.evaluation = EvaluationConfig(matching_images=100, mse_images=200)
    return cfg


PRESETS = {
    "paper64": _paper64,
    "celeba64": lambda: _dataset_preset("celeba64", "celeba", 10_000),
    "fashion64": lambda: _dataset_preset("fashion64", "deepfashion", 78_979),
    "cars64": lambda: _dataset_preset("cars64", "stanford-cars", 16_000),
    "bedroom64": lambda: _dataset_preset("bedroom64", "lsun-bedroom", 100_000),
    "tiny": _tiny,
}


# ---------------------------------------------------------------------------------------------------
# Loading: preset -> YAML -> overrides -> validation.

def load_config(name_or_path: str = "paper64", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build and validate a config from a preset name or a YAML file, then ``key=value`` overrides.

    A YAML file may name its base with ``preset: NAME``; its other keys override that preset.
    Raises ``ConfigError`` listing every mistake.
    """
    problems: list[str] = []
    path = Path(name_or_path)
    if name_or_path in PRESETS:
        base = PRESETS[name_or_path]().to_dict()
        file_values: dict[str, Any] = {}
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError([f"config file not found: {name_or_path}"])
        file_values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_values, dict):
            raise ConfigError([f"{name_or_path}: expected a mapping at the top level"])
        preset = file_values.get("preset", "paper64")
        if preset not in PRESETS:
            raise ConfigError([_unknown("preset", preset, list(PRESETS))])
        base = PRESETS[preset]().to_dict()
    else:
        raise ConfigError([_unknown("preset", name_or_path, list(PRESETS)) + " (or give a path to a .yaml file)"])

    merged = copy.deepcopy(base)
    for key, value in _flatten(file_values).items():
        _set_dotted(merged, key, value, problems)
    for key, value in _parse_overrides(overrides, problems).items():
        _set_dotted(merged, key, value, problems)
    if problems:  # unknown keys were skipped: the values of the known ones are checked too, all reported at once
        try:
            validate(config_from_dict(merged))
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
        raise ConfigError(problems)
    cfg = config_from_dict(merged)
    validate(cfg)
    return cfg


# Keys older checkpoints carry that no longer exist (they did nothing): dropped when a saved config is read.
REMOVED_KEYS = {"training": ("device", "critic_reference_sigma")}


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (checkpoints, MLflow). Unknown keys are errors, except
    ``REMOVED_KEYS``."""
    problems: list[str] = []
    values = {section: ({k: v for k, v in body.items() if k not in REMOVED_KEYS.get(section, ())}
                        if isinstance(body, dict) else body) for section, body in values.items()}
    cfg = _build(Config, values, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _build(cls, values: dict[str, Any], prefix: str, problems: list[str]):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(_unknown("key", prefix + key, [prefix + f for f in fields]))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{prefix}{key}: expected a mapping, got {value!r}")
                continue
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", problems)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, problems)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check a leaf value against its annotation; ints are accepted where floats are expected."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    value = _yaml11_float(value, hint)
    if origin is Union or origin is types.UnionType:
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            if _matches(value, option):
                return float(value) if option is float and isinstance(value, int) and int not in options else value
        problems.append(f"{key}: {value!r} is not a valid {_type_name(hint)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        _, item = get_args(hint)
        return {str(k): _coerce(v, item, f"{key}.{k}", problems) for k, v in value.items()}
    if _matches(value, hint):
        return float(value) if hint is float else value
    problems.append(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    return value


def _yaml11_float(value: Any, hint: Any) -> Any:
    """``2e-3`` as a float where a float is expected: YAML 1.1 (PyYAML) reads an exponent without a dot as
    a string, and that is how people write learning rates, in YAML files and in ``key=value`` overrides."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if not isinstance(value, str) or float not in options or str in options:
        return value
    try:
        return float(value)
    except ValueError:
        return value


def _matches(value: Any, hint: Any) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = get_origin(hint)
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate(cfg: Config) -> None:
    """Check every value; raise one ConfigError listing each mistake with its own message."""
    p: list[str] = []
    m = cfg.model
    stages = math.log2(m.resolution / 4) if m.resolution >= 4 else -1
    if m.resolution not in (32, 64, 128) or stages != int(stages):
        p.append(f"model.resolution: {m.resolution} cannot be produced by this architecture (use 32, 64 or 128)")
    elif len(m.widths) != int(stages):
        p.append(
            f"model.widths: resolution {m.resolution} needs {int(stages)} upsampling blocks (4 -> {m.resolution}), "
            f"so {int(stages)} widths, got {len(m.widths)}"
        )
    if stages == int(stages) and len(m.critic_widths) != int(stages):
        # The critic average-pools resolution -> 4, one pool before each block of critic_widths.
        p.append(
            f"model.critic_widths: resolution {m.resolution} needs {int(stages)} downsampling blocks, "
            f"got {len(m.critic_widths)} widths"
        )
    for name, value in (("latent_dim", m.latent_dim), ("fc_channels", m.fc_channels),
                        ("convs_per_block", m.convs_per_block), ("critic_first_width", m.critic_first_width),
                        ("critic_convs_per_block", m.critic_convs_per_block)):
        if value <= 0:
            p.append(f"model.{name}: must be positive, got {value}")
    for i, w in enumerate(m.widths + m.critic_widths):
        if w <= 0:
            p.append(f"model widths must be positive, got {w}")
    if m.first_layer not in ("dense", "cells"):
        p.append(_unknown("model.first_layer", m.first_layer, ["dense", "cells"]))
    elif m.first_layer == "cells" and m.cell_channels * 16 != m.fc_channels:
        p.append(
            f"model.cell_channels: the 'cells' first layer needs fc_channels = cell_channels x 16, "
            f"got {m.cell_channels} x 16 != {m.fc_channels}"
        )
    if m.sparsity_ties not in ("keep", "exact"):
        p.append(_unknown("model.sparsity_ties", m.sparsity_ties, ["keep", "exact"]))
    if m.weight_scaling not in ("equalized", "standard"):
        p.append(_unknown("model.weight_scaling", m.weight_scaling, ["equalized", "standard"]))
    if m.conv_sparsity_axis not in ("spatial", "channel"):
        p.append(_unknown("model.conv_sparsity_axis", m.conv_sparsity_axis, ["spatial", "channel"]))
    if not p:
        names = cfg.layer_names()
        for name, value in m.sparsity.items():
            if name not in names:
                p.append(_unknown("model.sparsity layer", name, names))
                continue
            extent = cfg.layer_extent(name)
            what = "channels" if name == "fc4" or m.conv_sparsity_axis == "channel" else "H*W positions"
            if isinstance(value, float):
                if not 0.0 < value <= 1.0:
                    p.append(f"model.sparsity.{name}: fraction {value} is outside (0, 1]")
            elif isinstance(value, int):
                if value < 1:
                    p.append(f"model.sparsity.{name}: k must be >= 1, got {value}")
                elif value > extent:
                    p.append(f"model.sparsity.{name}: k={value} is larger than the layer ({extent} {what})")
    s = cfg.sparsity_schedule
    if s.kind not in ("fixed", "dense_then_anneal"):
        p.append(_unknown("sparsity_schedule.kind", s.kind, ["fixed", "dense_then_anneal"]))
    if s.dense_epochs < 0 or s.anneal_epochs < 0:
        p.append("sparsity_schedule: dense_epochs and anneal_epochs must be >= 0")
    lv = cfg.langevin
    if lv.steps <= 0:
        p.append(f"langevin.steps: must be a positive number of Langevin steps, got {lv.steps}")
    if lv.step_size <= 0:
        p.append(f"langevin.step_size: must be positive, got {lv.step_size}")
    if lv.noise_sigma <= 0:
        p.append(f"langevin.noise_sigma: must be positive, got {lv.noise_sigma}")
    if lv.on_divergence not in ("raise", "backoff"):
        p.append(_unknown("langevin.on_divergence", lv.on_divergence, ["raise", "backoff"]))
    if lv.grad_clip_norm is not None and lv.grad_clip_norm <= 0:
        p.append(f"langevin.grad_clip_norm: must be positive or null, got {lv.grad_clip_norm}")
    t = cfg.training
    if t.batch_size <= 0:
        p.append(f"training.batch_size: must be positive, got {t.batch_size}")
    if t.epochs <= 0:
        p.append(f"training.epochs: must be positive, got {t.epochs}")
    if t.max_steps is not None and t.max_steps <= 0:
        p.append(f"training.max_steps: must be positive or null, got {t.max_steps}")
    if t.max_train_minutes is not None and not t.max_train_minutes > 0:
        p.append(f"training.max_train_minutes: must be positive or null, got {t.max_train_minutes}")
    for name in ("generator_lr", "critic_lr"):
        if getattr(t, name) <= 0:
            p.append(f"training.{name}: must be positive, got {getattr(t, name)}")
    for name in ("generator_betas", "critic_betas"):
        betas = getattr(t, name)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            p.append(f"training.{name}: expected two values in [0, 1), got {betas}")
    if not 0 <= t.generator_weight_decay * t.generator_lr < 1:
        p.append(f"training.generator_weight_decay: must be >= 0 with generator_lr * decay < 1 (each step "
                 f"multiplies weights by 1 - lr * decay), got {t.generator_weight_decay}")
    if t.critic_energy_l2 < 0:
        p.append(f"training.critic_energy_l2: must be >= 0, got {t.critic_energy_l2}")
    if t.critic_weight < 0:
        p.append(f"training.critic_weight: must be >= 0, got {t.critic_weight}")
    if not 0 < t.lr_decay_per_epoch <= 1:
        p.append(f"training.lr_decay_per_epoch: must be in (0, 1], got {t.lr_decay_per_epoch}")
    if t.precision not in ("auto", "fp32", "bf16"):
        p.append(_unknown("training.precision", t.precision, ["auto", "fp32", "bf16"]))
    d = cfg.data
    if not 0.0 <= d.holdout_fraction < 1.0:
        p.append(f"data.holdout_fraction: must be in [0, 1), got {d.holdout_fraction}")
    if d.on_error not in ("skip", "raise"):
        p.append(_unknown("data.on_error", d.on_error, ["skip", "raise"]))
    if d.limit is not None and d.limit <= 0:
        p.append(f"data.limit: must be positive or null, got {d.limit}")
    if d.demo_images <= 0:
        p.append(f"data.demo_images: must be positive, got {d.demo_images}")
    r = cfg.run
    if r.workers < 1:
        p.append(f"run.workers: must be >= 1, got {r.workers}")
    for label in cfg.run.mlflow_checkpoints:
        if label not in ("final", "best"):
            p.append(f"run.mlflow_checkpoints: {label!r} is not one of final, best")
    for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "checkpoints_to_keep"):
        if getattr(r, name) <= 0:
            p.append(f"run.{name}: must be positive, got {getattr(r, name)}")
    if r.gpus_per_worker < 0 or r.cpus_per_worker <= 0:
        p.append("run: gpus_per_worker must be >= 0 and cpus_per_worker > 0")
    e = cfg.evaluation
    allowed = ["fid", "mse", "matching", "tree", "parts", "swd"]
    for metric in e.at_end:
        if metric not in allowed:
            p.append(_unknown("evaluation.at_end metric", metric, allowed))
    if e.inference_steps <= 0:
        p.append(f"evaluation.inference_steps: must be a positive number of Langevin steps, got {e.inference_steps}")
    if e.inference_noise_free_steps < 0:
        p.append(f"evaluation.inference_noise_free_steps: must be >= 0, got {e.inference_noise_free_steps}")
    if e.inference_step_size is not None and e.inference_step_size <= 0:
        p.append(f"evaluation.inference_step_size: must be positive or null, got {e.inference_step_size}")
    if e.swd_images <= 0:
        p.append(f"evaluation.swd_images: must be positive, got {e.swd_images}")
    if e.matching_layer not in cfg.layer_names() and not p:
        p.append(_unknown("evaluation.matching_layer", e.matching_layer, cfg.layer_names()))
    if p:
        raise ConfigError(p)


# ---------------------------------------------------------------------------------------------------
# helpers for dotted keys

def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        # Mappings merge key by key (a YAML file's model.sparsity.conv8 leaves fc4 as the preset has it).
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _parse_overrides(overrides: list[str] | dict[str, Any] | None, problems: list[str]) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: cannot parse value ({exc})")
    return parsed


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        path = ".".join(parts[: depth + 1])
        is_sparsity_map = ".".join(parts[:depth]) == "model.sparsity"
        if part not in node and not is_sparsity_map:
            problems.append(_unknown("key", path, [f"{'.'.join(parts[:depth]) + '.' if depth else ''}{k}" for k in node]))
            return
        if last:
            node[part] = value
        else:
            if not isinstance(node[part], dict):
                problems.append(f"key {path}: is a value, not a section")
                return
            node = node[part]


def _unknown(what: str, name: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(map(str, choices))}"
    return f"unknown {what} {name!r}{hint}"
