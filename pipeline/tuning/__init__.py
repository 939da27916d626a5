"""Hyperparameter search over full distributed training runs (Ray Tune over Ray Train) and run comparison.

* ``space``   -- the search-space YAML schema (``load_space``, ``SpaceError``); shipped spaces in ``spaces/``
* ``search``  -- ``run_search(SearchSettings(...))``: Tuner / Tuner.restore, MLflow parent + child runs
* ``trial``   -- the Tune trainable: a Ray Train driver reporting through ``TuneReportCallback``
* ``pbt``     -- ``--scheduler pbt``: Train checkpoints as Tune checkpoints, restarts from another trial's
                 checkpoint in a fresh Train run, mutations, refusal of shape-changing keys
* ``report``  -- best trial, Pareto front, tables, plots
* ``compare`` -- ``sparsegen compare``: a table of MLflow runs and a side-by-side PNG of their pictures

Heavy libraries (ray, mlflow, matplotlib) are imported inside functions.
"""
