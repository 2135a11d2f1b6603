r"""A joint latent-space energy-based prior for hierarchical VAEs."""

from ._version import __version__
from .backbone import Backbone, Posterior
from .prior import ConvEnergy, JointEBMPrior, MLPEnergy
from .reference import CONFIGS, HierarchicalVAE
from .sample import EpsLangevin, Langevin, LangevinDivergenceError, LangevinResult, PosteriorLangevin

__all__ = [
    "CONFIGS",
    "Backbone",
    "ConvEnergy",
    "EpsLangevin",
    "HierarchicalVAE",
    "JointEBMPrior",
    "Langevin",
    "LangevinDivergenceError",
    "LangevinResult",
    "MLPEnergy",
    "Posterior",
    "PosteriorLangevin",
    "__version__",
]
