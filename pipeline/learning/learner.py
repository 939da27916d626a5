"""One iteration of Algorithm 1 (alternating back-propagation with an energy critic).

    Step 1  critic:     Z^ ~ N(0, I), Y^ = g(Z^);  Phi -= lr * d/dPhi [ mean f(Y) - mean f(Y^) ]     (Eq. 21)
                        (+ critic_energy_l2 * mean of squared energies, which keeps Eq. 21 bounded)
    Step 2  inference:  Z_i <- l_G Langevin steps from the persistent Z_i                           (Eq. 13-14)
    Step 3  generator:  Theta -= lr * d/dTheta [ mean ||Y - g(Z)||^2 / (2 sigma^2)                  (Eq. 15)
                                                  + critic_weight * mean f(g(Z^)) ]                  (Eq. 20)

Eq. 20 uses Z^ from the prior (it approximates an expectation over p(Z), Eq. 19), the same Z^ as Step 1.
Theta does not change between Step 1 and Step 3, so g(Z^) is computed once, in Step 1, with its autograd
graph kept for Step 3 (the critic sees it detached). Step 3 runs the (DDP-wrapped) generator on Z only;
its backward reaches Theta through both graphs, and autograd sums the two contributions before each
parameter's gradient is accumulated, so DDP's per-parameter hooks fire once, on the full gradient. The
energy E(Z) after the Langevin chain is also read off Step 3's g(Z) instead of an extra forward pass.
The critic is used unwrapped in Step 3 with its parameters frozen: only Theta receives gradients there.

``critic_weight = 0`` is pure ABP: Step 1 is skipped and no critic is built or synchronised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import Config
from pipeline.learning.langevin import chain_options, frozen_parameters, langevin_infer
from pipeline.learning.latent_bank import LatentBank
from pipeline.model.sparsity import scheduled_k


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a DistributedDataParallel wrapper."""
    return getattr(module, "module", module)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (precision auto or bf16); fp32 elsewhere."""
    if cfg.training.precision == "fp32":
        return None
    if cfg.training.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def prepare_module(module: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Move a freshly built model to ``device`` in the configured memory layout (before any DDP wrap)."""
    module = module.to(device)
    if cfg.training.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def initial_generator(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The generator a run of ``cfg`` starts training from: seeded and built exactly as the training loop
    does (``torch.manual_seed(training.seed)``, then ``build_generator``, before the critic); in eval mode."""
    from pipeline.model import build_generator

    torch.manual_seed(cfg.training.seed)
    generator = prepare_module(build_generator(cfg), cfg, torch.device(device))
    generator.eval()
    return generator


@dataclass
class StepMetrics:
    generator_loss: torch.Tensor
    reconstruction_loss: torch.Tensor  # ||Y - g(Z)||^2 / (2 sigma^2), mean over the batch
    reconstruction_mse: torch.Tensor  # per pixel, images in [-1, 1]
    critic_loss: torch.Tensor
    energy_observed: torch.Tensor  # mean f(Y)
    energy_synthesized: torch.Tensor  # mean f(g(Z^))
    langevin_grad_norm: torch.Tensor
    langevin_energy_start: torch.Tensor
    langevin_energy_end: torch.Tensor
    langevin_step_size: float
    # Norms of the two terms of Step 3's gradient at Theta: Eq. 15 and critic_weight * Eq. 20.
    grad_norm_reconstruction: torch.Tensor
    grad_norm_critic: torch.Tensor
    batch_size: int

    def as_floats(self) -> dict[str, float]:
        """One host sync for all metrics of the step."""
        names = [n for n in self.__dataclass_fields__ if isinstance(getattr(self, n), torch.Tensor)]
        values = torch.stack([getattr(self, n).detach().float().reshape(()) for n in names]).cpu().tolist()
        out = dict(zip(names, values))
        out["langevin_step_size"] = self.langevin_step_size
        out["batch_size"] = float(self.batch_size)
        return out


def _is_kernel(parameter: torch.Tensor) -> bool:
    """Weight matrices and conv kernels (decayed); biases and other vectors are not."""
    return parameter.ndim > 1


class ABPLearner:
    """Holds the models, optimisers and RNG of Algorithm 1 and runs one iteration per ``step``."""

    def __init__(
        self,
        cfg: Config,
        generator: nn.Module,
        critic: nn.Module | None,
        bank: LatentBank,
        device: torch.device,
    ):
        self.cfg = cfg
        self.generator = generator
        self.critic = critic if cfg.training.critic_weight > 0 else None
        self.bank = bank
        self.device = device
        self.autocast_dtype = autocast_dtype(cfg, device)
        t = cfg.training
        # Weight decay acts on weight matrices and kernels only: a decayed bias would only pull the image
        # mean towards 0.
        weights = [p for p in unwrap(generator).parameters() if _is_kernel(p)]
        biases = [p for p in unwrap(generator).parameters() if not _is_kernel(p)]
        self.generator_optimizer = torch.optim.Adam(
            [{"params": weights, "weight_decay": t.generator_weight_decay}, {"params": biases, "weight_decay": 0.0}],
            lr=t.generator_lr, betas=tuple(t.generator_betas), decoupled_weight_decay=True,
        )
        self.critic_optimizer = (
            torch.optim.Adam(unwrap(self.critic).parameters(), lr=t.critic_lr, betas=tuple(t.critic_betas))
            if self.critic is not None
            else None
        )
        # The noise of Langevin and the prior samples Z^ come from this generator, so a run is
        # reproducible from (seed, rank) and the RNG state can be checkpointed.
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(t.seed)
        self.step_count = 0
        self.target_k = {name: cfg.resolved_k(name) for name in cfg.layer_names()}
        self.extents = {name: cfg.layer_extent(name) for name in cfg.layer_names()}

    # -- helpers ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def current_k(self, epoch: float) -> dict[str, int | None]:
        s = self.cfg.sparsity_schedule
        return scheduled_k(self.target_k, self.extents, s.kind, epoch, s.dense_epochs, s.anneal_epochs)

    def set_epoch(self, epoch: float) -> dict[str, int | None]:
        """Apply the sparsity schedule and the per-epoch learning-rate decay for progress ``epoch``."""
        k = self.current_k(epoch)
        unwrap(self.generator).set_sparsity(k)
        decay = self.cfg.training.lr_decay_per_epoch ** int(epoch)
        for group in self.generator_optimizer.param_groups:
            group["lr"] = self.cfg.training.generator_lr * decay
        if self.critic_optimizer is not None:
            for group in self.critic_optimizer.param_groups:
                group["lr"] = self.cfg.training.critic_lr * decay
        return k

    def sample_prior(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.latent_dim, generator=self.rng, device=self.device)

    # -- Algorithm 1 ------------------------------------------------------------------------------
    def step(self, indices: torch.Tensor, images: torch.Tensor) -> StepMetrics:
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        batch = images.shape[0]
        generator_module = unwrap(self.generator)
        z_prior = self.sample_prior(batch)

        # Step 1: critic update (Eq. 21) on observed vs g(Z^). g(Z^) keeps its graph for Step 3.
        zero = torch.zeros((), device=self.device)
        critic_loss = energy_observed = energy_synthesized = zero
        synthesized = None
        if self.critic is not None:
            with self._autocast():
                synthesized = generator_module(z_prior)
                energies = self.critic(torch.cat([images, synthesized.detach().to(images.dtype)])).float()
            energy_observed, energy_synthesized = energies[:batch].mean(), energies[batch:].mean()
            critic_loss = energy_observed - energy_synthesized
            if cfg.training.critic_energy_l2 > 0:
                critic_loss = critic_loss + cfg.training.critic_energy_l2 * energies.pow(2).mean()
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_optimizer.step()

        # Step 2: Langevin inference of the batch's persistent latents (Eq. 13-14).
        lv = cfg.langevin
        z_start = self.bank.gather(indices, self.device)
        inferred = langevin_infer(
            generator_module, z_start, images, **chain_options(lv),
            generator_rng=self.rng, autocast_dtype=self.autocast_dtype, compute_energy_end=False,
        )
        self.bank.scatter(indices, inferred.z)

        # Step 3: generator update (Eq. 15 + critic_weight * Eq. 20): g on Z here, g(Z^) from Step 1.
        with self._autocast():
            reconstruction = self.generator(inferred.z).float()
        squared_error = (images - reconstruction).flatten(1).pow(2).sum(1)
        reconstruction_loss = squared_error.mean() / (2 * lv.noise_sigma**2)
        # E(Z) after the chain (Eq. 14, batch mean) from this forward: no extra pass in the Langevin loop.
        energy_end = reconstruction_loss.detach() + inferred.z.pow(2).sum(1).mean() / 2
        generator_loss = reconstruction_loss
        backward_loss = reconstruction_loss
        parameters = [p for p in generator_module.parameters() if p.requires_grad]
        critic_gradients: list[torch.Tensor | None] = []
        if synthesized is not None:
            critic_module = unwrap(self.critic)
            with frozen_parameters(critic_module), self._autocast():
                critic_term = critic_module(synthesized.float()).float().mean()
            weighted_critic_term = cfg.training.critic_weight * critic_term
            generator_loss = generator_loss + weighted_critic_term
            # The Eq. 20 gradient on its own (for its norm), then fed into the one backward below through
            # sum(theta * grad) (whose gradient is grad), so DDP still averages the sum in one reduction.
            critic_gradients = list(torch.autograd.grad(weighted_critic_term, parameters, allow_unused=True))
            backward_loss = backward_loss + sum(
                (p * g).sum() for p, g in zip(parameters, critic_gradients) if g is not None
            )
        self.generator_optimizer.zero_grad(set_to_none=True)
        backward_loss.backward()
        grad_norm_reconstruction, grad_norm_critic = self._gradient_norms(parameters, critic_gradients)
        self.generator_optimizer.step()
        self.step_count += 1

        return StepMetrics(
            generator_loss=generator_loss.detach(),
            reconstruction_loss=reconstruction_loss.detach(),
            reconstruction_mse=(squared_error.detach().mean() / reconstruction[0].numel()),
            critic_loss=critic_loss.detach(),
            energy_observed=energy_observed.detach(),
            energy_synthesized=energy_synthesized.detach(),
            langevin_grad_norm=inferred.grad_norm,
            langevin_energy_start=inferred.energy_start,
            langevin_energy_end=energy_end,
            langevin_step_size=inferred.step_size,
            grad_norm_reconstruction=grad_norm_reconstruction,
            grad_norm_critic=grad_norm_critic,
            batch_size=batch,
        )

    @staticmethod
    def _gradient_norms(parameters, critic_gradients) -> tuple[torch.Tensor, torch.Tensor]:
        """(||d Eq.15 / d Theta||, ||d critic_weight * Eq.20 / d Theta||) of this step, no host sync.

        The total gradient sits in ``.grad`` after the backward; Eq. 15's part is the total minus the critic's.
        Under DDP ``.grad`` is the rank average while the critic gradient is this rank's, so the Eq. 15 figure
        is a per-rank estimate there (exact on one worker).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        if not critic_gradients:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            return total, torch.zeros((), device=total.device)
        critic = [c if c is not None else torch.zeros_like(p) for p, c in zip(parameters, critic_gradients)]
        critic_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c) for c in critic]))
        reconstruction_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g - c) for g, c in zip(grads, critic)]))
        return reconstruction_norm, critic_norm

    # -- state for checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "generator": unwrap(self.generator).state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "step": self.step_count,
            "rng": self.rng.get_state(),
        }
        if self.critic is not None:
            state["critic"] = unwrap(self.critic).state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def _regrouped(self, saved: dict) -> dict:
        """A generator optimiser state saved before weight decay (one group in ``parameters()`` order) in the
        current two-group layout (weights, then biases); any other state is returned as it is."""
        groups = self.generator_optimizer.param_groups
        if len(saved["param_groups"]) != 1:
            return saved
        position = {id(p): i for i, p in enumerate(unwrap(self.generator).parameters())}
        new_to_old = [position[id(p)] for group in groups for p in group["params"]]
        old_to_new = {old: new for new, old in enumerate(new_to_old)}
        regrouped, start = [], 0
        for group in groups:
            ids = list(range(start, start + len(group["params"])))
            regrouped.append({**saved["param_groups"][0], "weight_decay": group["weight_decay"],
                              "decoupled_weight_decay": True, "params": ids})
            start += len(ids)
        return {"state": {old_to_new[i]: v for i, v in saved["state"].items()}, "param_groups": regrouped}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.generator).load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(self._regrouped(state["generator_optimizer"]))
        # The run's config decides the decay, not the one saved with the optimiser (as set_epoch does for lr).
        # A group is told apart by what it holds, not by its position.
        for group in self.generator_optimizer.param_groups:
            kernels = all(_is_kernel(p) for p in group["params"])
            group["weight_decay"] = self.cfg.training.generator_weight_decay if kernels else 0.0
        if self.critic is not None and "critic" in state:
            unwrap(self.critic).load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.step_count = int(state["step"])
        self.rng.set_state(state["rng"].cpu() if hasattr(state["rng"], "cpu") else state["rng"])


def inference_options(
    cfg: Config,
    *,
    steps: int | None = None,
    noise_free_steps: int | None = None,
    step_size: float | None = None,
) -> dict:
    """``langevin_infer`` keywords for unseen images: the ``evaluation.inference_*`` settings, then overrides.

    Training's chain (``langevin.*``) resumes persistent latents each epoch, so a few steps suffice there;
    an unseen image starts from the prior and needs ``evaluation.inference_steps``. The noise level sigma
    and the divergence guard stay training's: they define the posterior, not the chain. When the chain
    (configured or an explicit ``steps``) is shorter than the noise-free closing, the whole chain is
    noise-free: the returned Z never carries a noise kick when the config asks for a noise-free end.
    """
    e = cfg.evaluation
    options = chain_options(cfg.langevin)
    options["steps"] = e.inference_steps if steps is None else int(steps)
    if options["steps"] <= 0:
        raise ValueError(f"steps must be a positive number of Langevin steps, got {options['steps']}")
    if step_size is not None:
        options["step_size"] = float(step_size)
    elif e.inference_step_size is not None:
        options["step_size"] = e.inference_step_size
    quiet = e.inference_noise_free_steps if noise_free_steps is None else int(noise_free_steps)
    if quiet < 0:
        raise ValueError(f"noise_free_steps must be >= 0, got {quiet}")
    options["noise_free_steps"] = min(quiet, options["steps"])
    return options


def infer_latents(
    generator: nn.Module,
    images: torch.Tensor,
    cfg: Config,
    *,
    steps: int | None = None,
    noise_free_steps: int | None = None,
    step_size: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Latents of unseen images: Langevin from the prior N(0, I) (no persistent Z).

    Chain settings come from ``inference_options`` (``evaluation.inference_steps``,
    ``inference_noise_free_steps``, ``inference_step_size``); the keyword arguments override them.
    ``seed`` fixes the initial Z and the noise, so a call is reproducible.
    """
    device = next(unwrap(generator).parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    z0 = torch.randn(images.shape[0], cfg.model.latent_dim, generator=rng, device=device)
    options = inference_options(cfg, steps=steps, noise_free_steps=noise_free_steps, step_size=step_size)
    return langevin_infer(unwrap(generator), z0, images.to(device), **options, generator_rng=rng).z


@torch.no_grad()
def reconstruct(
    generator: nn.Module,
    images: torch.Tensor,
    cfg: Config,
    *,
    steps: int | None = None,
    noise_free_steps: int | None = None,
    step_size: float | None = None,
    seed: int = 0,
):
    """(latents, reconstructed images) for unseen images; settings as ``infer_latents``."""
    z = infer_latents(generator, images, cfg, steps=steps, noise_free_steps=noise_free_steps, step_size=step_size,
                      seed=seed)
    return z, unwrap(generator)(z)


@torch.no_grad()
def generate(generator: nn.Module, n: int, cfg: Config, *, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """n images from Z ~ N(0, I), generated ``batch_size`` at a time (default: all at once).

    Z is drawn for all n up front, so the images do not depend on ``batch_size``; batching only bounds the
    activation memory of large sample sets (SWD, FID).
    """
    device = next(unwrap(generator).parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, cfg.model.latent_dim, generator=rng, device=device)
    module = unwrap(generator)
    if batch_size is None or batch_size >= n:
        return module(z)
    return torch.cat([module(chunk) for chunk in z.split(batch_size)])
