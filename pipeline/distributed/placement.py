"""Where drivers go on a cluster with spot workers.

A Ray Train run is driven by the process that calls ``fit()``, and Ray Train V2 attaches its controller to
that process's node: if that node is a spot instance that gets reclaimed, the run is gone with it, and
``FailureConfig`` cannot help (it restarts workers, not the driver). So drivers must sit on on-demand nodes:

* a Ray job's entrypoint (``sparsegen submit``) runs on the head node (Ray's default when the job asks for
  no entrypoint resources), which ``ray_cluster.yaml`` keeps on-demand;
* a Tune trial's driver (the trainable that builds the trial's ``TorchTrainer``) is an actor Tune places
  by its resources. On-demand nodes advertise ``DRIVER_RESOURCE`` (``ray_cluster.yaml``: the head, as many
  units as trial drivers it should host); a trial driver that asks for one unit of it (and no CPU: the
  head advertises none, and a driver only waits on its Train run and MLflow) can only land there.
  ``trial_driver_resources`` says what a trial driver should ask for on the cluster at hand: one unit
  where the cluster has the resource, else its usual CPUs (a laptop, the local stack, CI).
* the end-of-training evaluation runs as a Ray task with the training workers' resources (GPU workers,
  spot or not: it is retried once when its node disappears), see
  ``pipeline.evaluation.orchestration.evaluate_on_ray``.
"""

from __future__ import annotations

DRIVER_RESOURCE = "sparsegen_driver"


def trial_driver_resources(cpus: float, cluster_resources: dict[str, float] | None = None) -> dict[str, float]:
    """Resources for a Tune trial's driver: ``{"CPU": 0, DRIVER_RESOURCE: 1}`` where the cluster advertises
    ``DRIVER_RESOURCE`` (its on-demand nodes), else ``{"CPU": cpus}``. ``cluster_resources``: Ray's
    ``ray.cluster_resources()`` (read from the running Ray when None)."""
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources() if ray.is_initialized() else {}
    if cluster_resources.get(DRIVER_RESOURCE, 0) >= 1:
        return {"CPU": 0, DRIVER_RESOURCE: 1}
    return {"CPU": cpus}
