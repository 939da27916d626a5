"""x2 nearest upsampling followed by a 3x3 same-padded convolution, as one stride-2 transposed convolution.

Every generator block starts with ``conv3x3(upsample_nearest_x2(x))`` (Table 1). Along one axis, output
pixel 2i reads upsampled pixels 2i-1, 2i, 2i+1, i.e. input pixels i-1, i, i (taps 0, 1, 2), and output
pixel 2i+1 reads input pixels i, i, i+1. So each output phase needs only 2 input pixels per axis, with the
taps that read the same input pixel summed first:

    phase 0: x[i-1] * W[0] + x[i] * (W[1] + W[2])        phase 1: x[i] * (W[0] + W[1]) + x[i+1] * W[2]

which is ``conv_transpose2d(x, K, stride=2, padding=1)`` with the 4-tap kernel K = (W[2], W[1] + W[2],
W[0] + W[1], W[0]) on each axis (``phase_kernel``; out of range input pixels are zero, as the zero padding
of the upsampled map is). Same values up to float rounding (the summed taps), 4 instead of 9 multiply-adds
per output pixel, and no upsampled tensor in memory. Autograd differentiates ``phase_kernel``, so weight
gradients are those of the dense layer.

Which form runs is a rule (``fused_applies``), not a timing, from ``python -m pipeline.model.upsample_conv``
on CPU (README Performance): with frozen weights (the Langevin loop, where ``frozen_weight_cache`` builds K
once per chain) the transposed form measured 1.5-2.6x faster at every layer shape of ``tiny`` and
``paper64``; when the weight gradient is needed, building K and its backward cost more than the saving at
small maps, so it runs there only from ``FUSED_MIN_INPUT_POSITIONS`` (batch x H x W of the input) on. On
other devices the dense form runs: the transposed form has not been measured there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# With a weight gradient, the transposed form runs when batch * H * W of the (pre-upsampling) input is at
# least this: below it (paper64's 512-channel 8x8 input at batch 4: 256 positions) it measured 0.8-0.9x the
# dense form, from it on 1.2-2.2x (README Performance).
FUSED_MIN_INPUT_POSITIONS = 1024


def _four_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4-tap kernel (W[2], W[1] + W[2], W[0] + W[1], W[0]) along axis ``dim`` of a 3-tap one."""
    first, middle, last = weight.unbind(dim)
    return torch.stack([last, middle + last, first + middle, first], dim=dim)


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 4, 4) ``conv_transpose2d`` kernel equal to upsample x2 + ``conv2d(weight)`` (C_out, C_in,
    3, 3), same padding, in the weight's memory layout (a channels-last kernel measured 1.1-1.7x faster than
    a contiguous one under channels-last activations). Differentiable in ``weight``."""
    kernel = _four_taps(_four_taps(weight, 2), 3).transpose(0, 1)
    if weight.is_contiguous(memory_format=torch.channels_last):
        return kernel.contiguous(memory_format=torch.channels_last)
    return kernel.contiguous()


def upsample_conv3x3(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(upsample_nearest_x2(x), W, bias, padding=1)`` from ``kernel = phase_kernel(W)``."""
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


def fused_applies(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether the transposed form runs for input ``x`` (B, C, H, W) and a 3x3 ``ScaledConv2d``: on CPU, always
    under a frozen-weight cache, else from ``FUSED_MIN_INPUT_POSITIONS`` input positions on."""
    if x.device.type != "cpu" or conv.weight.shape[2:] != (3, 3):
        return False
    b, _, h, w = x.shape
    return conv.weight_frozen or b * h * w >= FUSED_MIN_INPUT_POSITIONS


def upsample_conv(conv: nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a ``ScaledConv2d``, as one transposed
    convolution where ``fused_applies`` (see the module docstring)."""
    if fused and fused_applies(x, conv):
        return upsample_conv3x3(x, conv.phase_kernel(), conv.bias)
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _crossover(repeats: int = 5) -> None:  # pragma: no cover - a measuring script
    """Transposed vs dense form, forward + backward to the input (a Langevin step) and to input and weight
    (the generator step), timed interleaved over the layer shapes of tiny and paper64 at a few batch sizes.
    ``python -m pipeline.model.upsample_conv``."""
    from pipeline.model.sparse_conv import interleaved_medians

    shapes = [(4, 512, 256, 8), (4, 256, 128, 16), (4, 128, 64, 32), (32, 64, 32, 8), (32, 32, 16, 16),
              (32, 128, 64, 4), (8, 64, 32, 8), (4, 32, 16, 16)]
    for batch, c, o, h in shapes:
        weight = (torch.randn(o, c, 3, 3) / (9 * c) ** 0.5).contiguous(memory_format=torch.channels_last)
        weight.requires_grad_(True)
        x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        grad = torch.randn(batch, o, 2 * h, 2 * h).contiguous(memory_format=torch.channels_last)
        frozen_kernel = phase_kernel(weight.detach())

        def dense(wrt):
            y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight if len(wrt) > 1 else
                         weight.detach(), padding=1)
            torch.autograd.grad(y, wrt, grad)

        def fused(wrt):
            kernel = phase_kernel(weight) if len(wrt) > 1 else frozen_kernel
            torch.autograd.grad(upsample_conv3x3(x, kernel, None), wrt, grad)

        d_in, f_in, d_all, f_all = interleaved_medians(
            (lambda: dense([x]), lambda: fused([x]), lambda: dense([x, weight]), lambda: fused([x, weight])), repeats)
        print(f"batch {batch}, {c} -> {o} at {h} -> {2 * h} ({batch * h * h} input positions): to the input "
              f"dense {d_in * 1e3:.2f} ms, transposed {f_in * 1e3:.2f} ms ({d_in / f_in:.2f}x); with the weight "
              f"gradient {d_all * 1e3:.2f} / {f_all * 1e3:.2f} ms ({d_all / f_all:.2f}x)", flush=True)


if __name__ == "__main__":  # pragma: no cover
    _crossover()
