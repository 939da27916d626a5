"""Langevin posterior inference of Z given Y (Eq. 13-14).

    Z <- Z + (delta^2 / 2) * d/dZ log p(Z, Y) + delta * E,   E ~ N(0, I)
    log p(Z, Y) = -||Y - g(Z)||^2 / (2 sigma^2) - ||Z||^2 / 2 + C

Only Z gets gradients: the generator's parameters are switched to ``requires_grad=False`` for the loop,
so autograd neither builds nor computes their gradient nodes and no ``.grad`` is touched. As they cannot
change during the chain, the equalized-learning-rate ``weight * scale`` of every layer is computed once
per chain, not in every forward of every step (``frozen_weight_cache``).

Noise-free closing (``noise_free_steps``): the last N steps drop the delta * E kick and are plain gradient
steps on log p(Z, Y) with step delta^2 / 2. Training keeps N = 0 (Algorithm 1 needs posterior *samples*
for the persistent chains); inference of unseen images uses N > 0 so the returned Z is a posterior-mode
estimate, not a sample carrying the last step's noise (which alone adds delta^2 * d to ||Z - Z*||^2).

Divergence guard: a non-finite Z or energy in any step is recorded on the device (no host sync inside
the loop) and checked once at the end. ``on_divergence="raise"`` raises ``LangevinDivergenceError``
naming the first bad step and the settings; ``"backoff"`` restarts the chain from its initial Z with
the step size halved, up to ``max_backoffs`` times, then raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.sparse_conv import frozen_weight_cache


class LangevinDivergenceError(FloatingPointError):
    pass


@dataclass
class LangevinResult:
    z: torch.Tensor
    # Mean over the batch of E(Z) = ||Y - g(Z)||^2 / (2 sigma^2) + ||Z||^2 / 2 before and after the chain.
    energy_start: torch.Tensor
    energy_end: torch.Tensor | None  # None when the caller asked not to compute it
    # Mean over steps and examples of || d/dZ log p(Z, Y) ||.
    grad_norm: torch.Tensor
    step_size: float


@contextlib.contextmanager
def frozen_parameters(module: nn.Module):
    """Temporarily mark every parameter as not requiring grad (restored afterwards)."""
    previous = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


def posterior_energy(generator: nn.Module, z: torch.Tensor, y: torch.Tensor, noise_sigma: float) -> torch.Tensor:
    """-log p(Z, Y) + C per example (Eq. 14), shape (B,)."""
    residual = (y - generator(z)).flatten(1)
    return residual.pow(2).sum(1) / (2 * noise_sigma**2) + z.pow(2).sum(1) / 2


def chain_options(langevin_config) -> dict:
    """``langevin_infer`` keywords from a config's ``langevin`` section (steps, step size, noise, guards)."""
    lv = langevin_config
    return {
        "steps": lv.steps,
        "step_size": lv.step_size,
        "noise_sigma": lv.noise_sigma,
        "on_divergence": lv.on_divergence,
        "max_backoffs": lv.max_backoffs,
        "grad_clip_norm": lv.grad_clip_norm,
    }


def langevin_infer(
    generator: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise_sigma: float,
    on_divergence: str = "raise",
    max_backoffs: int = 3,
    grad_clip_norm: float | None = None,
    generator_rng: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    compute_energy_end: bool = True,
    noise_free_steps: int = 0,
) -> LangevinResult:
    """Run ``steps`` Langevin steps on a batch of latents ``z`` (B, d) for images ``y`` (B, 3, H, W).

    The last ``noise_free_steps`` of them (0 <= N <= steps) omit the noise term: with N >= 1 the returned Z
    does not include a noise kick, with N == steps the chain is deterministic given ``z`` (no RNG draws).

    ``compute_energy_end=False`` skips the extra forward pass that measures E(Z) after the last step
    (``energy_end`` is then None): the learner gets it from its generator step, which runs g on the
    final Z anyway.
    """
    if not 0 <= noise_free_steps <= steps:
        raise ValueError(f"noise_free_steps must be in [0, steps={steps}], got {noise_free_steps}")
    z_start = z.detach()
    delta = float(step_size)
    for attempt in range(max_backoffs + 1):
        result, bad_step = _chain(
            generator, z_start, y, steps, delta, noise_sigma, grad_clip_norm, generator_rng, autocast_dtype,
            compute_energy_end, steps - noise_free_steps,
        )
        if bad_step < 0:
            return result
        message = (
            f"Langevin inference diverged at step {bad_step + 1} of {steps} (non-finite Z or energy) with "
            f"step_size={delta:g}, noise_sigma={noise_sigma:g}, batch of {z.shape[0]}"
        )
        if on_divergence != "backoff" or attempt == max_backoffs:
            raise LangevinDivergenceError(
                message + ("" if on_divergence != "backoff" else f" after {max_backoffs} back-offs")
                + "; lower langevin.step_size or raise langevin.noise_sigma"
            )
        delta /= 2
    raise AssertionError("unreachable")


def _chain(generator, z_start, y, steps, delta, sigma, clip, rng, autocast_dtype, compute_energy_end, noisy_steps):
    device = z_start.device
    z = z_start.clone()
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    grad_norm_sum = torch.zeros((), device=device)
    energy_start = None
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    # Parameters are frozen for the whole chain, so scaled weights are computed once (frozen_weight_cache).
    with frozen_parameters(generator), frozen_weight_cache(generator), torch.enable_grad():
        for step in range(steps):
            z.requires_grad_(True)
            with autocast:
                energy = posterior_energy(generator, z, y, sigma).float()
            # backward(inputs=[z]) computes d/dZ only (like autograd.grad) and also works under
            # FlopCounterMode, which the benchmark uses to count FLOPs.
            energy.sum().backward(inputs=[z])
            grad_energy = z.grad
            if energy_start is None:
                energy_start = energy.detach().mean()
            with torch.no_grad():
                # d/dZ log p = -dE/dZ
                drift = -grad_energy.float()
                norms = drift.norm(dim=1, keepdim=True)
                grad_norm_sum += norms.mean()
                if clip is not None:
                    drift = drift * torch.clamp(clip / (norms + 1e-12), max=1.0)
                z = z.detach() + (delta**2 / 2) * drift
                # A Python-level branch on the step index: no host sync, and the noise-free tail draws no
                # random numbers, so a chain's first noisy_steps kicks are the same for any tail length.
                if step < noisy_steps:
                    z = z + delta * torch.randn(z.shape, generator=rng, device=device, dtype=z.dtype)
                finite = torch.isfinite(z).all() & torch.isfinite(energy).all()
                bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, step), bad_step)
        energy_end = None
        if compute_energy_end:
            with torch.no_grad(), autocast:
                energy_end = posterior_energy(generator, z, y, sigma).float().mean()
    bad = int(bad_step.item())  # the one host sync of the chain
    if bad < 0 and energy_end is not None and not torch.isfinite(energy_end):
        bad = steps - 1
    return LangevinResult(z.detach(), energy_start, energy_end, grad_norm_sum / steps, delta), bad
