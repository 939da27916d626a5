"""The fast paths compute what the straightforward ones do, up to floating-point tolerance (issue: speed)."""

import json
import os
import subprocess
import sys

import torch

import pipeline
from pipeline.learning import ABPLearner, LatentBank, langevin_infer
from pipeline.learning.bench import _exact_topk_generator, baseline_step
from pipeline.learning.learner import prepare_module
from pipeline.model import relu_topk, spatial_relu_topk, topk_mask
from pipeline.model.sparsity import _kth_largest


def _cfg(*overrides):
    return pipeline.load_config("tiny", ["model.fc_channels=64", "model.widths=[32, 16, 8]", *overrides])


def test_langevin_matches_plain_backward_loop():
    cfg = _cfg()
    torch.manual_seed(0)
    generator = pipeline.build_generator(cfg)
    y = torch.rand(4, 3, 32, 32) * 2 - 1
    z0 = torch.randn(4, cfg.model.latent_dim)
    fast = langevin_infer(generator, z0, y, steps=5, step_size=0.2, noise_sigma=0.3,
                          generator_rng=torch.Generator().manual_seed(3)).z
    # Straightforward: loss.backward() with parameter gradients on, same noise sequence.
    rng = torch.Generator().manual_seed(3)
    z = z0.clone()
    for _ in range(5):
        z = z.detach().requires_grad_(True)
        energy = ((y - generator(z)) ** 2).flatten(1).sum(1) / (2 * 0.3**2) + (z**2).sum(1) / 2
        energy.sum().backward()
        z = z - (0.2**2 / 2) * z.grad + 0.2 * torch.randn(z.shape, generator=rng)
    torch.testing.assert_close(fast, z.detach(), rtol=1e-4, atol=1e-4)


def _reference_relu_topk(pre, k, dim):
    """ReLU, then the "keep" top-k mask found with torch.topk, as a first implementation would."""
    x = torch.relu(pre)
    kth = x.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return x * (x >= kth).to(x.dtype)


def test_fused_relu_topk_matches_relu_then_topk_values_and_gradients():
    torch.manual_seed(0)
    pre = torch.randn(6, 5, 40)
    pre[0, 0] = -torch.rand(40)  # every unit negative: the layer is all zeros
    pre[1, 1, :30] = -1.0  # fewer than k positive units: only ReLU zeros
    pre[2, 2, :10] = 0.7  # ties at the threshold: all kept
    pre[3, 3, :5] = 0.0  # exact zeros
    for k, dim in ((8, 2), (3, 1), (40, 2), (1, 2)):
        fast_in = pre.clone().requires_grad_(True)
        ref_in = pre.clone().requires_grad_(True)
        fast, mask = relu_topk(fast_in, k, dim=dim, return_mask=True)
        ref = _reference_relu_topk(ref_in, k, dim) if k < pre.shape[dim] else torch.relu(ref_in)
        assert torch.equal(fast, ref), (k, dim)
        weights = torch.randn_like(pre)
        (fast * weights).sum().backward()
        (ref * weights).sum().backward()
        assert torch.equal(fast_in.grad, ref_in.grad), (k, dim)
        # The combined mask is exactly "survives ReLU and top-k".
        assert torch.equal(mask.bool(), (ref != 0) | ((pre > 0) & (ref == 0) & (pre == 0)))
    assert (relu_topk(pre, 3, dim=1)[0] != 0).sum(1).max() <= 3
    spatial = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out, _ = spatial_relu_topk(spatial, 5)
    assert torch.equal(out, _reference_relu_topk(spatial.reshape(2, 3, 64), 5, 2).view(2, 3, 8, 8))


def test_kth_largest_selection_matches_topk():
    torch.manual_seed(1)
    values = torch.randn(4, 7, 33).contiguous(memory_format=torch.contiguous_format)
    for k in (1, 5, 33):
        for dim in (1, 2):
            if k > values.shape[dim]:
                continue
            expected = values.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
            assert torch.equal(_kth_largest(values, k, dim), expected)


def test_learner_step_matches_the_straightforward_implementation():
    # ABPLearner.step (parameters frozen in Langevin, fused top-k, g(Z^) reused from Step 1, no extra
    # forward for the final energy, channels-last) against ``baseline_step`` written from the paper.
    cfg = _cfg("langevin.steps=4", "training.critic_energy_l2=0")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    indices = torch.arange(8)
    torch.manual_seed(0)
    generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
    critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
    learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
    torch.manual_seed(0)
    base_generator = _exact_topk_generator(cfg, pipeline.build_generator(cfg))
    base_critic = pipeline.build_critic(cfg)
    t = cfg.training
    # Plain SGD on both sides, so parameters after a step are linear in the gradients: Adam with beta1 = 0
    # moves every weight by ~lr whatever its gradient's size, so a weight whose gradient is ~0 could
    # move either way and hide (or fake) a difference.
    learner.generator_optimizer = torch.optim.SGD(generator.parameters(), lr=t.generator_lr)
    learner.critic_optimizer = torch.optim.SGD(critic.parameters(), lr=t.critic_lr)
    opt_g = torch.optim.SGD(base_generator.parameters(), lr=t.generator_lr)
    opt_c = torch.optim.SGD(base_critic.parameters(), lr=t.critic_lr)
    base_bank = LatentBank(8, cfg.model.latent_dim)
    rng = torch.Generator().manual_seed(t.seed)
    for step in range(2):
        learner.step(indices, images)
        baseline_step(cfg, base_generator, base_critic, opt_g, opt_c, base_bank, indices, images, rng)
        torch.testing.assert_close(learner.bank.z, base_bank.z, rtol=1e-4, atol=1e-4, msg=f"Z after step {step}")
        for (name, fast), base in zip(generator.named_parameters(), base_generator.parameters()):
            torch.testing.assert_close(fast, base, rtol=1e-4, atol=1e-5, msg=f"generator {name}, step {step}")
        for (name, fast), base in zip(critic.named_parameters(), base_critic.parameters()):
            torch.testing.assert_close(fast, base, rtol=1e-4, atol=1e-5, msg=f"critic {name}, step {step}")


def test_host_allocator_settings_apply_once():
    from pipeline.host_memory import configure_host_allocator

    first = configure_host_allocator()
    if sys.platform.startswith("linux"):
        assert first and first["trim_threshold_bytes"] >= 1 << 30
    assert configure_host_allocator() is first
    opted_out = subprocess.run(
        [sys.executable, "-c", "from pipeline.host_memory import configure_host_allocator as c; print(c())"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SPARSEGEN_HOST_ALLOCATOR": "default"},
    )
    assert opted_out.stdout.strip() == "None", opted_out.stderr


def test_channels_last_step_matches_contiguous_step():
    results = []
    for channels_last in (False, True):
        cfg = _cfg(f"training.channels_last={str(channels_last).lower()}", "langevin.steps=3")
        torch.manual_seed(0)
        generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
        critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
        learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
        # Plain SGD: parameters after a step are linear in the gradients. Adam moves every weight by ~lr
        # whatever its gradient's size, so a weight whose gradient is ~0 moves either way on rounding noise
        # and, through the top-k selection, flips which units survive.
        learner.generator_optimizer = torch.optim.SGD(generator.parameters(), lr=cfg.training.generator_lr)
        learner.critic_optimizer = torch.optim.SGD(critic.parameters(), lr=cfg.training.critic_lr)
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        first = learner.step(torch.arange(8), images).as_floats()
        z_first = learner.bank.z.clone()
        learner.step(torch.arange(8), images)
        with torch.no_grad():
            samples = generator(torch.randn(4, cfg.model.latent_dim, generator=torch.Generator().manual_seed(9)))
        results.append((first, z_first, samples))
    (metrics_a, z_a, samples_a), (metrics_b, z_b, samples_b) = results
    for name in metrics_a:
        assert abs(metrics_a[name] - metrics_b[name]) <= 1e-4 * max(1.0, abs(metrics_a[name])), name
    torch.testing.assert_close(z_a, z_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(samples_a, samples_b, rtol=0, atol=1e-4)


def test_bench_step_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "step", "--preset", "tiny", "--set", "langevin.steps=2",
         "--set", "model.widths=[16, 8, 8]", "--batch", "4", "--steps", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("iteration_images_per_s", "flops_per_image", "iteration_flops_per_s", "peak_flops_per_s",
                "langevin_fraction_of_peak", "speedup_vs_baseline"):
        assert report[key] > 0, key


def _ddp_rank(rank: int, world_size: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = _cfg("langevin.steps=3")
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
        mine = slice(rank * 4, rank * 4 + 4)
        learners = []
        for wrap in (True, False):
            torch.manual_seed(0)
            generator = prepare_module(pipeline.build_generator(cfg), cfg, torch.device("cpu"))
            critic = prepare_module(pipeline.build_critic(cfg), cfg, torch.device("cpu"))
            if wrap:
                generator = torch.nn.parallel.DistributedDataParallel(generator)
                critic = torch.nn.parallel.DistributedDataParallel(critic)
            learner = ABPLearner(cfg, generator, critic, LatentBank(8, cfg.model.latent_dim), torch.device("cpu"))
            # Step 1 moves the DDP critic by the rank-averaged gradient and the plain one by this rank's, and
            # Step 3 differentiates through that critic: hold it still so both Step 3s see the same critic.
            for group in learner.critic_optimizer.param_groups:
                group["lr"] = 0.0
            learner.rng.manual_seed(100 + rank)
            learner.step(torch.arange(8)[mine], images[mine])
            learners.append(learner)
        ddp, plain = learners
        worst = 0.0
        for module_ddp, module_plain in ((ddp.generator.module, plain.generator), (ddp.critic.module, plain.critic)):
            for p_ddp, p_plain in zip(module_ddp.parameters(), module_plain.parameters()):
                local = p_plain.grad.clone()
                dist.all_reduce(local)
                expected = local / world_size
                scale = expected.abs().max().clamp_min(1e-6)
                worst = max(worst, float((p_ddp.grad - expected).abs().max() / scale))
        queue.put((rank, worst))
        # Both ranks leave together: a rank tearing gloo down while its peer still talks to it aborts (seen
        # as exit code -6 under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_step_gradients_are_the_average_of_per_rank_gradients():
    # Step 3 runs the DDP-wrapped generator on Z only and reaches Theta through the graph of g(Z^) kept
    # from Step 1 as well: DDP must still all-reduce the full gradient of both terms, once.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_ddp_rank, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]
    results = dict(queue.get() for _ in range(2))
    assert max(results.values()) < 1e-4, results
