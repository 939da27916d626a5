"""Evaluation layer: FID (TF reference Inception), holdout reconstruction MSE, basis functions, Table 4's
template-matching score, the AND-OR tree of Fig. 1 and ground-truth part interpretability on demo data.

Public API (imported lazily: ``import pipeline.evaluation`` costs nothing until used)::

    evaluate(cfg, generator, data_url, metrics, *, samples=None, inception_weights=None, out_dir,
             progress=True, strict=False, seed=0, ...) -> (metrics: dict[str, float], artifacts: dict[str, path])
    log_to_mlflow(run_id, metrics, artifacts, *, tracking_uri=None)
    checkpoint_of_run(run_id, tracking_uri=None) -> checkpoint URI (tag "sparsegen.checkpoint")
    parse_metrics("fid,mse") -> ["fid", "mse"]; METRICS; MetricUnavailable
    frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float
    FIDInceptionV3, load_inception(weights=None, device="cpu") -> (model, sha256); InceptionWeightsUnavailable
    basis_functions(generator, masks, units), active_units(activations, layer, top=None)
    matching_score(generator, images, layer, *, latent_dim, ...) -> dict; match_basis_functions(patterns, images)
    build_tree(generator, z, layers=None, *, roots=6, children=3) -> (document, arrays); write_tree(...)
    part_interpretability(generator, cfg, data_url, *, layer="conv8", num_images=200) -> (metrics, details)
    bench_evaluation(...) -> dict
"""

from __future__ import annotations

import importlib

_LAZY = {
    "evaluate": "pipeline.evaluation.orchestration",
    "log_to_mlflow": "pipeline.evaluation.orchestration",
    "checkpoint_of_run": "pipeline.evaluation.orchestration",
    "run_exists": "pipeline.evaluation.orchestration",
    "parse_metrics": "pipeline.evaluation.orchestration",
    "holdout_mse": "pipeline.evaluation.orchestration",
    "METRICS": "pipeline.evaluation.orchestration",
    "MetricUnavailable": "pipeline.evaluation.orchestration",
    "frechet_distance": "pipeline.evaluation.fid",
    "feature_statistics": "pipeline.evaluation.fid",
    "reference_statistics": "pipeline.evaluation.fid",
    "FIDInceptionV3": "pipeline.evaluation.inception",
    "load_inception": "pipeline.evaluation.inception",
    "InceptionWeightsUnavailable": "pipeline.evaluation.inception",
    "WEIGHTS_ENV": "pipeline.evaluation.inception",
    "basis_functions": "pipeline.evaluation.basis",
    "active_units": "pipeline.evaluation.basis",
    "Unit": "pipeline.evaluation.basis",
    "matching_score": "pipeline.evaluation.matching",
    "match_basis_functions": "pipeline.evaluation.matching",
    "build_tree": "pipeline.evaluation.tree",
    "write_tree": "pipeline.evaluation.tree",
    "render_tree": "pipeline.evaluation.tree",
    "part_interpretability": "pipeline.evaluation.parts",
    "bench_evaluation": "pipeline.evaluation.bench",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
