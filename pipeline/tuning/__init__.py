"""Hyperparameter search over full distributed training runs (Ray Tune over Ray Train) and run comparison.

* ``space``    -- the search-space YAML schema (``load_space``, ``SpaceError``); shipped spaces in ``spaces/``
* ``settings`` -- the typed objects passed between these modules (``SearchSettings``, ``SearchPlan``,
                  ``TrialSetup``, ``StartPlan``, ``FINAL_KEY``); imports none of them
* ``search``   -- ``run_search(SearchSettings(...))``: orchestration (plan, Tuner / Tuner.restore, failure
                  budget, trial listing from the ``ResultGrid``, summary)
* ``trial``    -- the Tune trainable: a Ray Train driver whose reports reach Tune through ``relay``
* ``relay``    -- Train reports -> Tune results in order, then the trial's final result (public
                  ``ray.train.UserCallback`` + ``ray.util.queue``)
* ``pbt``      -- ``--scheduler pbt``: Train checkpoints as Tune checkpoints, restarts from another trial's
                  checkpoint in a fresh Train run, mutations, refusal of shape-changing keys
* ``runs``     -- a search's MLflow runs: tags, the parent run, child lookup and status, the PBT attachment
* ``report``   -- best trial, Pareto front, tables, plots
* ``compare``  -- ``sparsegen compare``: a table of MLflow runs and a side-by-side PNG of their pictures
* ``ablation`` -- ``sparsegen ablation``: Table 4's sparse vs dense arms as a Tune grid of Train runs

Imports: settings <- runs, pbt <- trial <- search, ablation (no circle). Heavy libraries (ray, mlflow,
matplotlib) are imported inside functions, except where a class subclasses a Ray class (``relay``'s Train
callback, ``pbt``'s scheduler, ``search``'s Tune callback); ``settings``, ``runs``, ``space`` and
``ablation`` stay cheap to import (the CLI's --help reads ``ablation``).
"""
