"""The sparsity-inducing function S(.; k) of Eq. 6 and the schedules that move k during training.

Two forms, both applied after the activation (ReLU) and both returning a 0/1 mask that is multiplied
into the activation, so gradients reach kept units only and the mask itself carries no gradient:

* channel top-k (Z -> O layer): at each spatial position keep the k largest of the C channels;
* spatial top-k (later layers): for each (sample, channel) keep the k largest of the H*W positions.

Tie rule ("keep", the authors' rule): a unit survives when its value is >= the k-th largest value, so
ties at the threshold are all kept and a layer may keep more than k units *only* among exactly-equal
values. After a ReLU the common tie is at 0, where extra kept units are zeros and change nothing: the
number of non-zero units is always <= k. "exact" keeps exactly k (ties broken by ``torch.topk``).
"""

from __future__ import annotations

import math

import torch


def _kth_largest(values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest entry along ``dim`` (kept as a size-1 dim for broadcasting)."""
    # topk of the k largest is cheaper than a full sort and is vectorised over all other dims.
    return values.topk(k, dim=dim, largest=True, sorted=True).values.narrow(dim, k - 1, 1)


def topk_mask(values: torch.Tensor, k: int | None, dim: int, ties: str = "keep") -> torch.Tensor | None:
    """0/1 mask (same dtype as ``values``) of the top-k entries along ``dim``; None when dense."""
    size = values.shape[dim]
    if k is None or k >= size:
        return None
    with torch.no_grad():
        if ties == "keep":
            return (values >= _kth_largest(values, k, dim)).to(values.dtype)
        indices = values.topk(k, dim=dim, largest=True, sorted=False).indices
        return torch.zeros_like(values).scatter_(dim, indices, 1.0)


def channel_topk(x: torch.Tensor, k: int | None, ties: str = "keep") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 6 at the Z -> O layer: keep the top-k channels at every position of ``x`` (B, C, H, W)."""
    mask = topk_mask(x, k, dim=1, ties=ties)
    return (x if mask is None else x * mask), mask


def spatial_topk(x: torch.Tensor, k: int | None, ties: str = "keep") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 6 at later layers: keep the top-k positions of every (sample, channel) of ``x`` (B, C, H, W)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    mask = topk_mask(flat, k, dim=2, ties=ties)
    if mask is None:
        return x, None
    mask = mask.view(b, c, h, w)
    return x * mask, mask


def scheduled_k(
    target_k: dict[str, int | None],
    extents: dict[str, int],
    kind: str,
    epoch: float,
    dense_epochs: float,
    anneal_epochs: float,
) -> dict[str, int | None]:
    """k per layer at training progress ``epoch`` (fractional epochs since the start).

    ``fixed``: the target from the start. ``dense_then_anneal``: dense (None) for ``dense_epochs``, then k
    falls geometrically from the layer's full extent to its target over ``anneal_epochs`` (geometric,
    because halving k is the same relative change of sparsity at every scale), then stays at the target.
    """
    if kind == "fixed":
        return dict(target_k)
    if kind != "dense_then_anneal":
        raise ValueError(f"unknown sparsity schedule {kind!r}")
    if epoch < dense_epochs:
        return {name: None for name in target_k}
    progress = 1.0 if anneal_epochs <= 0 else min(1.0, (epoch - dense_epochs) / anneal_epochs)
    out: dict[str, int | None] = {}
    for name, k in target_k.items():
        if k is None:
            out[name] = None
            continue
        extent = extents[name]
        out[name] = max(k, min(extent, int(round(math.exp(math.log(extent) + progress * (math.log(k) - math.log(extent)))))))
    return out
