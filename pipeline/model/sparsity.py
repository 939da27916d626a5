"""The sparsity-inducing function S(.; k) of Eq. 6 and the schedules that move k during training.

Two forms, both applied after the activation (ReLU) and both returning a 0/1 mask that is multiplied
into the activation, so gradients reach kept units only and the mask itself carries no gradient:

* channel top-k (Z -> O layer): at each spatial position keep the k largest of the C channels;
* spatial top-k (later layers): for each (sample, channel) keep the k largest of the H*W positions.
  With ``model.conv_sparsity_axis = "channel"`` the later layers use the channel form instead (Sec. 3.2's
  reading, one OR-node per position); the generator then calls ``relu_topk`` along dim 1.

Tie rule ("keep", the authors' rule): a unit survives when its value is >= the k-th largest value, so
ties at the threshold are all kept and a layer may keep more than k units *only* among exactly-equal
values. After a ReLU the common tie is at 0, where extra kept units are zeros and change nothing: the
number of non-zero units is always <= k. "exact" keeps exactly k (ties broken by ``torch.topk``).

``relu_topk`` is the fused form the generator runs: ReLU and the "keep" top-k in one comparison on the
pre-activation (see its docstring), which saves the ReLU pass and its backward pass at every sparse
layer in every one of the l_G Langevin steps.
"""

from __future__ import annotations

import math

import torch


def _kth_largest(values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest entry along ``dim`` (kept as a size-1 dim for broadcasting)."""
    if values.device.type == "cpu":
        # Selection (kthvalue) instead of a partial sort: in a forward + backward microbenchmark of the
        # generator's layer shapes it was 4-25 % faster in 9 of 10 cases (14 % slower in one). Same value.
        return values.kthvalue(values.shape[dim] - k + 1, dim=dim, keepdim=True).values
    # topk of the k largest is cheaper than a full sort and is vectorised over all other dims.
    return values.topk(k, dim=dim, largest=True, sorted=True).values.narrow(dim, k - 1, 1)


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) value of ``dtype``: 2^-149 for float32."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


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


def relu_topk(
    pre: torch.Tensor, k: int | None, dim: int, ties: str = "keep", return_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ReLU, then top-k along ``dim``: the same values as ``relu(pre) * topk_mask(relu(pre), k, dim, ties)``.

    For the "keep" rule this is one comparison on the pre-activation. With t = k-th largest of ``pre``,
    the k-th largest of relu(pre) is max(t, 0) (ReLU is monotone), so a unit survives ReLU and top-k iff
    pre >= t when t > 0, and iff pre > 0 when t <= 0; both are ``pre >= max(t, smallest positive)``.
    The output is ``pre * keep``, whose gradient is 1 on kept units and 0 elsewhere, as for the unfused
    ReLU and mask. With ``return_mask`` also the combined 0/1 (ReLU * top-k) mask.
    """
    size = pre.shape[dim]
    if ties != "keep" or k is None or k >= size:
        x = torch.relu(pre)
        mask = topk_mask(x, k, dim, ties)
        out = x if mask is None else x * mask
        if not return_mask:
            return out, None
        relu_mask = (pre > 0).to(pre.dtype)
        return out, relu_mask if mask is None else relu_mask * mask
    with torch.no_grad():
        threshold = _kth_largest(pre, k, dim).clamp_min(_smallest_positive(pre.dtype))
        mask = (pre >= threshold).to(pre.dtype)
    # A multiply by the 0/1 mask, not torch.where: 11-30 % faster forward + backward on CPU in 9 of 10
    # layer shapes/layouts of a microbenchmark (11 % slower in one).
    return pre * mask, (mask if return_mask else None)


def spatial_relu_topk(
    pre: torch.Tensor, k: int | None, ties: str = "keep", return_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``relu_topk`` over the H*W positions of every (sample, channel) of ``pre`` (B, C, H, W)."""
    b, c, h, w = pre.shape
    out, mask = relu_topk(pre.reshape(b, c, h * w), k, dim=2, ties=ties, return_mask=return_mask)
    return out.view(b, c, h, w), (None if mask is None else mask.view(b, c, h, w))


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
