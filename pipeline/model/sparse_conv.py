"""The first convolution of the generator computed from the active channels only, and frozen-weight caching.

After fc4's channel top-k, ``paper64``'s 4x4x3200 map has k = 8 non-zero channels per cell (0.25 %). The
next layer is x2 nearest upsampling followed by a 3200 -> 512 3x3 same-padding convolution at 8x8: about
0.94 of the generator's 2.5 GMAC per image, of which 99.75 % multiply zeros. Here it is computed from the
active channels only, exactly (up to float rounding) as the dense layer:

    y[b, o, q] = bias[o] + sum_{t in 3x3} sum_{c} W[o, c, t] * up(x)[b, c, q + t - 1]

Every upsampled input pixel of cell p carries x[b, :, p], so grouping the sum by the cell that an input
pixel belongs to gives, per (sample, cell), the "cell kernel"

    M[b, p, o, t] = sum_{c active at (b, p)} x[b, c, p] * W[o, c, t]            (n rows of W, not C)

(gather the active channels' 3x3 weight slices and sum them weighted by the values: ``embedding_bag`` on
a cached channel-major copy of W, or a row gather from W and a batched matmul), and

    y[b, o, q] = sum_{(p, t)} M[b, p, o, t] * A[(p, t), q]

with A the constant 0/1 (16*9, 64) "assembly" matrix: A[(p, t), q] = 1 when the upsampled input pixel
q + t - 1 is inside the map and belongs to cell p (one small GEMM; at most 9 ones per output pixel).
Forward costs B * P * n * O * 9 multiply-adds (+ the assembly GEMM) instead of B * 4P * C * O * 9 (k = 8
of 3200: 1/1600 of the layer). Autograd differentiates these ops: to the values (a dot product per
active unit), to the weights (a scatter-add of n rows per cell) -- nothing is computed for the inactive
channels, whose gradient the top-k mask zeroes anyway (the layer's gradient to its *input* is exact on
the active units and 0 elsewhere; gradients to everything before the mask, Z included, are exact).

The number of active channels per cell n is read off the map itself (its largest count of non-zeros, one
host read per forward: free on CPU, a sync on CUDA), so the "keep" tie rule's rare extra survivors are
never dropped. Above ``SPARSE_MAX_FRACTION`` of the channels (k None, large k, the dense phase of a
sparsity schedule) the dense convolution runs instead: the crossover measured on the 2-core dev box
(README Performance) is well above every preset's k.

``frozen_weight_cache(module)``: while parameters are frozen (the Langevin loop), equalized-learning-rate
layers compute ``weight * scale`` once instead of in every forward of every step, and the first conv's
channel-major weight matrix above (and the other blocks' transposed-conv kernels, ``upsample_conv.py``) are
built once per chain instead of once per forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# (Its upsample_conv is this module's dense fallback; named apart from this module's own upsample_conv.)
from pipeline.model import upsample_conv as dense_forms

# Sparse path when the active channels per cell are at most this fraction of the input channels. Measured
# with ``python -m pipeline.model.sparse_conv 4`` (3200 -> 512 channels, batch 4, interleaved, on the
# shared 2-core dev box): sparse/dense speed-up 5.7x at 0.25 % active channels, 2.2x at 12.5 %, 1.2x
# (backward to the input only) and 1.0x (with the weight gradient) at 25 %, 0.7-0.8x at 50 %. 0.125 keeps
# a margin and covers tiny's fc4 (16 of 128 channels, where it also measured faster) and paper64's (8 of 3200).
SPARSE_MAX_FRACTION = 0.125


def channel_major_weight(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(C_in, C_out * 9) matrix of a 3x3 conv weight (C_out, C_in, 3, 3): row c holds every output
    channel's 3x3 slice of input channel c (contiguous once copied, for row gathers)."""
    out_channels, in_channels = weight.shape[:2]
    w = weight if scale == 1.0 else weight * scale
    return w.transpose(0, 1).reshape(in_channels, out_channels * 9)


def active_channel_count(x: torch.Tensor) -> int:
    """The largest number of non-zero channels at any (sample, position) of ``x`` (B, C, H, W)."""
    if x.numel() == 0:
        return 0
    return int(torch.count_nonzero(x, dim=1).max())


def sparse_upsample_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    scale: float = 1.0,
    weight_cm: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv3x3(upsample_nearest_x2(x), weight * scale) + bias (same padding) from the ``n`` largest-magnitude
    channels of every (sample, position) of ``x`` (B, C, H, W). Exact when no position of ``x`` has more
    than ``n`` non-zero channels. ``weight_cm``: ``channel_major_weight(weight, scale)``, contiguous, when
    the caller has it (frozen weights); otherwise the active channels' slices are gathered from ``weight``
    itself (gradients to it as for the dense layer)."""
    b, c, h, w = x.shape
    out_channels = weight.shape[0]
    n = max(1, min(n, c))
    bags = b * h * w
    cells = x.reshape(b, c, h * w).transpose(1, 2)  # (B, P, C)
    with torch.no_grad():
        indices = cells.abs().topk(n, dim=2, sorted=False).indices  # (B, P, n)
    values = cells.gather(2, indices)
    # Where a position has fewer than n non-zeros, zeros fill its picks: keep their gradient 0 as well.
    values = (values * (values != 0)).to(weight.dtype)
    if weight_cm is None and bags * n > c:
        # More gathered rows than channels (large batches): one channel-major copy beats gathering rows.
        weight_cm = channel_major_weight(weight, scale).contiguous()
    if weight_cm is not None:
        # Gather + weighted sum in one op, without materialising the gathered rows.
        kernels = F.embedding_bag(indices.reshape(bags, n), weight_cm, per_sample_weights=values.reshape(bags, n),
                                  mode="sum")  # (B*P, O*9)
    else:
        # Few rows: gather the 3x3 slices of the active channels straight from the (scaled) parameter, and
        # scale the values instead of the 3200-channel weight.
        rows = weight.index_select(1, indices.reshape(-1)).transpose(0, 1).reshape(bags, n, out_channels * 9)
        if scale != 1.0:
            values = values * scale
        kernels = torch.bmm(values.reshape(bags, 1, n), rows).view(bags, out_channels * 9)
    # y[b, o, q] = sum over (cell p, tap t) of M[b, p, o, t] * A[(p, t), q]: one small GEMM with the 0/1
    # assembly matrix of the upsample + 3x3 window (at most 9 ones per output pixel).
    cell_kernels = kernels.view(b, h * w, out_channels, 9).transpose(1, 2).reshape(b * out_channels, h * w * 9)
    out = (cell_kernels @ _assembly(h, w, x.device, cell_kernels.dtype)).view(b, out_channels, 2 * h, 2 * w)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, out_channels, 1, 1)
    return out


_ASSEMBLY: dict[tuple, torch.Tensor] = {}


def _assembly(h: int, w: int, device, dtype) -> torch.Tensor:
    """(H*W*9, 4*H*W) 0/1 matrix: cell p's tap t feeds output pixel q of the x2-upsampled 3x3 same conv
    when the input pixel q + t - 1 (in bounds) lies in cell p."""
    key = (h, w, str(device), dtype)
    if key not in _ASSEMBLY:
        a = torch.zeros(h * w, 9, 4 * h * w)
        for qy in range(2 * h):
            for qx in range(2 * w):
                for ty in range(3):
                    for tx in range(3):
                        sy, sx = qy + ty - 1, qx + tx - 1
                        if 0 <= sy < 2 * h and 0 <= sx < 2 * w:
                            a[(sy // 2) * w + sx // 2, ty * 3 + tx, qy * 2 * w + qx] = 1.0
        _ASSEMBLY[key] = a.reshape(h * w * 9, 4 * h * w).to(device=device, dtype=dtype)
    return _ASSEMBLY[key]


def upsample_conv(conv: nn.Module, x: torch.Tensor, sparse: bool = True, fused: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a ``ScaledConv2d`` ``conv``, from the
    active channels of ``x`` when they are few (see the module docstring), otherwise as every other block's
    upsample + conv (``upsample_conv.upsample_conv``, transposed where that applies and ``fused``)."""
    c = x.shape[1]
    if sparse and conv.weight.shape[2:] == (3, 3):
        n = active_channel_count(x)
        if n <= SPARSE_MAX_FRACTION * c:
            out = sparse_upsample_conv3x3(x, conv.weight, conv.bias, n, conv.scale, conv.cached_channel_major())
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)
            return out
    return dense_forms.upsample_conv(conv, x, fused=fused)


@contextlib.contextmanager
def frozen_weight_cache(module: nn.Module):
    """Within the block every layer of ``module`` that supports it (``ScaledConv2d``, ``ScaledLinear``) uses
    a weight scaled once on entry. Only for frozen parameters: the cache is detached and not refreshed."""
    layers = [m for m in module.modules() if hasattr(m, "_frozen_weight")]
    for layer in layers:
        layer._frozen_weight = _scaled(layer).detach()
        layer._frozen_channel_major = None  # built on first use
        layer._frozen_phase_kernel = None
    try:
        yield module
    finally:
        for layer in layers:
            layer._frozen_weight = None
            layer._frozen_channel_major = None
            layer._frozen_phase_kernel = None


def _scaled(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return layer.weight if layer.scale == 1.0 else layer.weight * layer.scale


def interleaved_medians(cases, repeats: int) -> list[float]:  # pragma: no cover - for measuring scripts
    """Median seconds of each callable in ``cases`` after one warm-up, timed in turn repeat by repeat (so a
    shared machine slows all cases alike)."""
    import statistics
    import time

    for case in cases:
        case()
    times = [[] for _ in cases]
    for _ in range(repeats):
        for i, case in enumerate(cases):
            start = time.perf_counter()
            case()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _crossover(batch: int = 4, repeats: int = 5) -> None:  # pragma: no cover - a measuring script
    """Sparse vs dense upsample + conv over the fraction of active channels, timed interleaved: forward +
    backward to the input with a cached channel-major weight (a Langevin step), and forward + backward to
    input and weight (the generator step). ``python -m pipeline.model.sparse_conv [batch]``."""
    for c, o in ((3200, 512), (128, 64)):
        weight = torch.randn(o, c, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        cached = channel_major_weight(weight.detach()).contiguous()
        for fraction in (0.0025, 0.01, 0.05, 0.125, 0.25, 0.5):
            n = max(1, int(round(fraction * c)))
            pre = torch.randn(batch, c, 4, 4)
            kth = pre.topk(n, dim=1).values[:, n - 1:n]
            x = (pre * (pre >= kth)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            grad = torch.randn(batch, o, 8, 8)

            def dense(wrt):
                y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
                torch.autograd.grad(y, wrt, grad)

            def sparse(wrt, cm=None):
                torch.autograd.grad(sparse_upsample_conv3x3(x, weight, None, n, 1.0, cm), wrt, grad)

            d_in, s_in, d_all, s_all = interleaved_medians(
                (lambda: dense([x]), lambda: sparse([x], cached), lambda: dense([x, weight]),
                 lambda: sparse([x, weight])), repeats)
            print(f"C={c} n={n} ({fraction:.2%}): Langevin-like dense {d_in * 1e3:.1f} ms sparse {s_in * 1e3:.1f} ms "
                  f"({d_in / s_in:.2f}x); with weight grad dense {d_all * 1e3:.1f} ms sparse {s_all * 1e3:.1f} ms "
                  f"({d_all / s_all:.2f}x)", flush=True)


if __name__ == "__main__":  # pragma: no cover
    import sys

    _crossover(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
