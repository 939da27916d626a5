"""Experiment tracking: MLflow runs, params, metrics, image-grid artifacts."""
