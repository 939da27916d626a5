"""Infrastructure for sparsegen: the local development stack (``infra.stack``) and the cluster image.

``infra.stack`` starts, checks and stops a loopback-only MLflow tracking server, an S3-compatible
server (moto) and a Ray head on one machine; ``sparsegen stack up|down|status`` is its CLI. The AWS
cluster itself is described by ``ray_cluster.yaml`` at the repository root and ``infra/Dockerfile``;
see ``docs/cluster.md``.
"""
