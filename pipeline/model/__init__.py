"""The sparse AND-OR generator, the energy critic and the top-k sparsity operators (Eq. 6, Table 1)."""

from pipeline.model.networks import (
    EnergyCritic,
    SparseGenerator,
    build_critic,
    build_generator,
    describe_layers,
)
from pipeline.model.sparsity import (
    channel_topk,
    relu_topk,
    scheduled_k,
    spatial_relu_topk,
    spatial_topk,
    topk_mask,
)

__all__ = [
    "EnergyCritic",
    "SparseGenerator",
    "build_critic",
    "build_generator",
    "channel_topk",
    "describe_layers",
    "relu_topk",
    "scheduled_k",
    "spatial_relu_topk",
    "spatial_topk",
    "topk_mask",
]
