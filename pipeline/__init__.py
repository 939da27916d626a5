"""sparsegen: sparse AND-OR generator networks (Xing et al., CVPR 2020) trained on Ray.

Public API::

    cfg = pipeline.load_config("paper64", overrides=["langevin.steps=20"])
    generator = pipeline.build_generator(cfg)
    critic = pipeline.build_critic(cfg)
    images, activations = generator(z, return_activations=True)
"""

from pipeline.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_generator", "build_critic"]


def build_generator(cfg: Config):
    """The sparse generator g(Z; Theta, k) of ``cfg`` (a ``torch.nn.Module``)."""
    from pipeline.model import build_generator as _build

    return _build(cfg)


def build_critic(cfg: Config):
    """The energy critic f(Y; Phi) of ``cfg`` (a ``torch.nn.Module``)."""
    from pipeline.model import build_critic as _build

    return _build(cfg)
