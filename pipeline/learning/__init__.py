"""Alternating back-propagation (Algorithm 1): Langevin inference, persistent latents, the learner step."""

from pipeline.learning.langevin import LangevinDivergenceError, langevin_infer, posterior_energy
from pipeline.learning.latent_bank import LatentBank
from pipeline.learning.learner import ABPLearner, StepMetrics, generate, infer_latents, reconstruct

__all__ = [
    "ABPLearner",
    "LangevinDivergenceError",
    "LatentBank",
    "StepMetrics",
    "generate",
    "infer_latents",
    "langevin_infer",
    "posterior_energy",
    "reconstruct",
]
