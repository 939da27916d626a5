"""`sparsegen bench step`: the cost of one Algorithm 1 iteration, against a straightforward baseline and
against the machine's own dense throughput measured in the same process.

Timed, after warm-up, as the median of ``repeats`` (the full iteration and the baselines in turn,
repeat by repeat, so that a shared or throttled machine slows them alike):
  * the full iteration of ``ABPLearner.step`` (critic step, l_G Langevin steps, generator step);
  * the Langevin part alone (``langevin_infer``);
  * ``baseline_step`` ("naive"): the same algorithm written the obvious way -- Langevin through
    ``loss.backward()`` with parameter gradients on (then thrown away), top-k by ``torch.topk`` +
    ``scatter``, no compilation;
  * ``plain_step`` ("plain"): what a competent practitioner writes in plain PyTorch -- parameters frozen
    during Langevin (``torch.autograd.grad`` to Z only), g(Z^) computed once for the critic and the
    generator step, ``topk`` + ``scatter`` masks, default memory layout, dense convolutions, nothing
    cached. Same shapes and work as ``ABPLearner.step``.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one iteration (convolutions and
matmuls, forward and backward) with the sparse first conv switched to its dense form, so they are the
dense-equivalent FLOPs of the model (the sparse layer skips 99.75 % of its multiply-adds at paper64's k):
"achieved FLOP/s" is dense-equivalent FLOPs / measured time, and "fraction of peak" divides by the dense
conv/matmul throughput this process measured on large, well-shaped problems.

The host allocator setting (``configure_host_allocator``) is process-wide, so both baselines run with it
too (it favours them, if anything).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from pipeline.config import Config
from pipeline.host_memory import configure_host_allocator
from pipeline.learning.langevin import chain_options, langevin_infer
from pipeline.learning.latent_bank import LatentBank
from pipeline.learning.learner import ABPLearner, autocast_dtype, prepare_module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device) -> float:
    """Wall time of one call of ``fn`` (device work included)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> dict:
    """Dense throughput of this process on large conv and matmul problems (FLOP/s), the better of the two."""
    results = {}
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_flops = 2 * size**3
    results["matmul_flops_per_s"] = matmul_flops / _time_for(lambda: a @ b, device, seconds)
    # A 3x3 conv shaped like the generator's widest layers (512 channels at 16x16).
    batch = 8 if device.type == "cpu" else 256
    x = torch.randn(batch, 512, 16, 16, device=device, dtype=dtype)
    w = torch.randn(512, 512, 3, 3, device=device, dtype=dtype)
    conv_flops = 2 * batch * 512 * 512 * 9 * 16 * 16
    results["conv_flops_per_s"] = conv_flops / _time_for(
        lambda: torch.nn.functional.conv2d(x, w, padding=1), device, seconds
    )
    results["peak_flops_per_s"] = max(results["matmul_flops_per_s"], results["conv_flops_per_s"])
    return results


def _time_for(fn, device, seconds: float) -> float:
    fn()
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        fn()
        count += 1
    _sync(device)
    return (time.perf_counter() - start) / count


# -- the straightforward implementation -------------------------------------------------------------------

def _exact_topk_generator(cfg: Config, source) -> torch.nn.Module:
    """A copy of ``source`` whose top-k is topk + scatter ("exact" ties) and whose convolutions are all
    dense, as a first implementation would have them."""
    import copy

    generator = copy.deepcopy(source)
    generator.ties = "exact"
    generator.sparse_first_conv = False
    generator.fused_upsample_conv = False
    return generator


@contextlib.contextmanager
def dense_equivalent(generator):
    """The generator with its sparse first conv and its transposed upsample + conv switched to the dense
    forms (interpolate + conv2d), to count dense-equivalent FLOPs."""
    previous = generator.sparse_first_conv, generator.fused_upsample_conv
    generator.sparse_first_conv = generator.fused_upsample_conv = False
    try:
        yield generator
    finally:
        generator.sparse_first_conv, generator.fused_upsample_conv = previous


def _set_requires_grad(module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def plain_step(cfg: Config, generator, critic, opt_g, opt_c, bank: LatentBank, indices, images, rng,
               autocast_dtype_: torch.dtype | None = None):
    """One Algorithm 1 iteration as a competent practitioner writes it in plain PyTorch (no project tricks).

    Parameters frozen in Langevin and ``torch.autograd.grad`` to Z only; g(Z^) computed once with its graph,
    detached for the critic step (as in PyTorch's DCGAN example) and reused for Eq. 20; the critic frozen
    in the generator step. ``generator`` comes from ``plain_models``: topk + scatter masks, dense convs,
    default memory layout. Same losses as ``ABPLearner.step`` (Eq. 21 with the energy L2, Eq. 13-14,
    Eq. 15 + critic_weight * Eq. 20)."""
    t, lv = cfg.training, cfg.langevin
    batch = images.shape[0]
    sigma, delta = lv.noise_sigma, lv.step_size
    device = images.device
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype_) if autocast_dtype_ is not None
                else contextlib.nullcontext())
    z_prior = torch.randn(batch, cfg.model.latent_dim, generator=rng, device=device)
    synthesized = None
    if critic is not None:
        with autocast:
            synthesized = generator(z_prior)
            energies = critic(torch.cat([images, synthesized.detach().to(images.dtype)])).float()
        loss_c = energies[:batch].mean() - energies[batch:].mean()
        if t.critic_energy_l2 > 0:
            loss_c = loss_c + t.critic_energy_l2 * energies.pow(2).mean()
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()
    z = bank.gather(indices, device)
    _set_requires_grad(generator, False)
    for _ in range(lv.steps):
        z = z.detach().requires_grad_(True)
        with autocast:
            reconstruction = generator(z).float()
        energy = ((images - reconstruction) ** 2).sum() / (2 * sigma**2) + (z**2).sum() / 2
        (grad,) = torch.autograd.grad(energy, z)
        z = z.detach() - (delta**2 / 2) * grad + delta * torch.randn(z.shape, generator=rng, device=device)
    _set_requires_grad(generator, True)
    z = z.detach()
    bank.scatter(indices, z)
    with autocast:
        reconstruction = generator(z).float()
    loss_g = ((images - reconstruction) ** 2).flatten(1).sum(1).mean() / (2 * sigma**2)
    if synthesized is not None:
        _set_requires_grad(critic, False)
        with autocast:
            loss_g = loss_g + t.critic_weight * critic(synthesized.float()).float().mean()
        _set_requires_grad(critic, True)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()


def plain_models(cfg: Config, device: torch.device, seed: int = 0):
    """(generator, critic or None) for ``plain_step``: the preset's shapes, freshly initialised from ``seed``,
    default memory layout, topk + scatter masks ("exact" ties) and every convolution dense."""
    from pipeline.model import build_critic, build_generator

    torch.manual_seed(seed)
    generator = _exact_topk_generator(cfg, build_generator(cfg)).to(device)
    critic = build_critic(cfg).to(device) if cfg.training.critic_weight > 0 else None
    return generator, critic


def baseline_step(cfg: Config, generator, critic, opt_g, opt_c, bank: LatentBank, indices, images, rng):
    """Algorithm 1 written directly from the paper, without the optimisations of ``ABPLearner.step``."""
    batch = images.shape[0]
    sigma, delta = cfg.langevin.noise_sigma, cfg.langevin.step_size
    z_prior = torch.randn(batch, cfg.model.latent_dim, generator=rng, device=images.device)
    if critic is not None:
        synthesized = generator(z_prior).detach()
        loss_c = critic(images).mean() - critic(synthesized).mean()
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
    z = bank.gather(indices, images.device)
    for _ in range(cfg.langevin.steps):
        z = z.detach().requires_grad_(True)
        energy = ((images - generator(z)) ** 2).sum() / (2 * sigma**2) + (z**2).sum() / 2
        energy.backward()  # parameter gradients are computed too, and discarded below
        noise = torch.randn(z.shape, generator=rng, device=z.device)
        z = z - (delta**2 / 2) * z.grad + delta * noise
        opt_g.zero_grad()
    z = z.detach()
    bank.scatter(indices, z)
    reconstruction = generator(z)
    loss_g = ((images - reconstruction) ** 2).sum() / batch / (2 * sigma**2)
    if critic is not None:
        loss_g = loss_g + cfg.training.critic_weight * critic(generator(z_prior)).mean()
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    if critic is not None:
        opt_c.zero_grad()  # the critic's gradients from the generator step are discarded


def bench_step(cfg: Config, batch_size: int, device: str = "cpu", repeats: int = 3, with_baseline: bool = True,
               progress=None, with_plain: bool = True) -> dict:
    from pipeline.model import build_critic, build_generator

    device_obj = torch.device(device)
    configure_host_allocator()  # as in training processes; it applies to the baseline alike
    torch.manual_seed(0)
    say = progress or (lambda message: None)
    generator = prepare_module(build_generator(cfg), cfg, device_obj)
    critic = prepare_module(build_critic(cfg), cfg, device_obj) if cfg.training.critic_weight > 0 else None
    bank = LatentBank(batch_size, cfg.model.latent_dim)
    learner = ABPLearner(cfg, generator, critic, bank, device_obj)
    images = (torch.rand(batch_size, 3, cfg.model.resolution, cfg.model.resolution) * 2 - 1).to(device_obj)
    indices = torch.arange(batch_size)
    lv = cfg.langevin

    say("counting FLOPs (dense equivalent)")
    with dense_equivalent(generator):
        iteration_flops = count_flops(lambda: learner.step(indices, images))
    z0 = bank.gather(indices, device_obj)

    def langevin():
        # The chain exactly as ABPLearner.step runs it (its final energy comes from the generator step).
        return langevin_infer(generator, z0, images, **chain_options(lv), generator_rng=learner.rng,
                              autocast_dtype=learner.autocast_dtype, compute_energy_end=False)

    with dense_equivalent(generator):
        langevin_flops = count_flops(langevin)
    baseline = plain = None
    if with_baseline:
        torch.manual_seed(0)
        base_generator = _exact_topk_generator(cfg, build_generator(cfg)).to(device_obj)
        base_critic = build_critic(cfg).to(device_obj) if critic is not None else None
        opt_g = torch.optim.Adam(base_generator.parameters(), lr=cfg.training.generator_lr)
        opt_c = torch.optim.Adam(base_critic.parameters(), lr=cfg.training.critic_lr) if base_critic else None
        rng = torch.Generator(device=device_obj).manual_seed(0)
        base_bank = LatentBank(batch_size, cfg.model.latent_dim)

        def baseline():
            baseline_step(cfg, base_generator, base_critic, opt_g, opt_c, base_bank, indices, images, rng)

    if with_plain:
        plain_generator, plain_critic = plain_models(cfg, device_obj)
        t = cfg.training
        plain_opt_g = torch.optim.Adam(plain_generator.parameters(), lr=t.generator_lr, betas=tuple(t.generator_betas))
        plain_opt_c = (torch.optim.Adam(plain_critic.parameters(), lr=t.critic_lr, betas=tuple(t.critic_betas))
                       if plain_critic is not None else None)
        plain_rng = torch.Generator(device=device_obj).manual_seed(0)
        plain_bank = LatentBank(batch_size, cfg.model.latent_dim)

        def plain():
            plain_step(cfg, plain_generator, plain_critic, plain_opt_g, plain_opt_c, plain_bank, indices, images,
                       plain_rng, learner.autocast_dtype)

    # The fast iteration and the baselines are timed in turn, repeat by repeat, so that a shared or
    # throttled machine slows them alike and the speed-ups (medians of the per-repeat ratios) stay fair.
    names = [name for name, fn in (("naive", baseline), ("plain", plain)) if fn is not None]
    say("timing the iteration" + (f" and the {' and '.join(names)} baseline(s), in turn" if names else ""))
    def iteration():
        learner.step(indices, images)

    for warmup in (iteration, baseline, plain, langevin):
        if warmup is not None:
            warmup()
    iteration_times, baseline_times, plain_times = [], [], []
    for _ in range(repeats):
        iteration_times.append(_seconds(iteration, device_obj))
        if baseline is not None:
            baseline_times.append(_seconds(baseline, device_obj))
        if plain is not None:
            plain_times.append(_seconds(plain, device_obj))
    iteration_s = statistics.median(iteration_times)
    # Likewise the Langevin loop and the machine's dense throughput, alternately: a fraction of peak
    # divides two figures that must come from the same state of the machine.
    say("timing the Langevin loop and the machine's dense throughput, alternately")
    dtype = autocast_dtype(cfg, device_obj) or torch.float32
    langevin_times, peaks = [], []
    for _ in range(repeats):
        langevin_times.append(_seconds(langevin, device_obj))
        peaks.append(machine_peak_flops(device_obj, dtype, seconds=1.0))
    langevin_s = statistics.median(langevin_times)
    peak = {key: statistics.median(p[key] for p in peaks) for key in peaks[0]}
    result = {
        "preset": cfg.preset,
        "device": device,
        "device_name": torch.cuda.get_device_name(device_obj) if device_obj.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "langevin_steps": lv.steps,
        "precision": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "iteration_s": iteration_s,
        "iteration_images_per_s": batch_size / iteration_s,
        "langevin_s": langevin_s,
        "flops_per_image": iteration_flops / batch_size,
        "langevin_flops_per_image": langevin_flops / batch_size,
        "iteration_flops_per_s": iteration_flops / iteration_s,
        "langevin_flops_per_s": langevin_flops / langevin_s,
        **peak,
    }
    result["iteration_fraction_of_peak"] = result["iteration_flops_per_s"] / peak["peak_flops_per_s"]
    result["langevin_fraction_of_peak"] = statistics.median(
        langevin_flops / t / p["peak_flops_per_s"] for t, p in zip(langevin_times, peaks))
    # The target is stated against the conv throughput; "peak" above is the stricter max(conv, matmul).
    result["langevin_fraction_of_conv_peak"] = statistics.median(
        langevin_flops / t / p["conv_flops_per_s"] for t, p in zip(langevin_times, peaks))
    result["langevin_times_s"] = langevin_times
    result["conv_flops_per_s_each"] = [p["conv_flops_per_s"] for p in peaks]
    import resource

    # Peak resident memory of this process so far: one worker's footprint for this preset and batch
    # (with the baseline's models alongside, so an upper bound).
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bank_100k = LatentBank(100_000, cfg.model.latent_dim)
    result["latent_bank_100k_memory_mb"] = bank_100k.memory_bytes / 1e6  # Z + index, visits, checksum
    result["latent_bank_100k_parquet_mb"] = len(bank_100k.to_parquet_bytes()) / 1e6
    del bank_100k
    # Speed-ups: the median of the per-repeat ratios (each pair ran back to back), and the ratio of the best
    # times ("_best": the least-disturbed run of each side, robust to bursts of load on a shared machine).
    if baseline_times:
        result["baseline_iteration_s"] = statistics.median(baseline_times)
        result["speedup_vs_baseline"] = statistics.median(b / f for b, f in zip(baseline_times, iteration_times))
        result["speedup_vs_baseline_best"] = min(baseline_times) / min(iteration_times)
    if plain_times:
        result["plain_iteration_s"] = statistics.median(plain_times)
        result["plain_images_per_s"] = batch_size / result["plain_iteration_s"]
        result["speedup_vs_plain"] = statistics.median(p / f for p, f in zip(plain_times, iteration_times))
        result["speedup_vs_plain_best"] = min(plain_times) / min(iteration_times)
    result["iteration_times_s"] = iteration_times
    if baseline_times:
        result["baseline_times_s"] = baseline_times
    if plain_times:
        result["plain_times_s"] = plain_times
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
