r"""A joint latent-space energy-based prior for hierarchical VAEs."""

from ._version import __version__
from .backbone import Backbone, GroupwiseBackbone, Posterior
from .hub import IncompatiblePriorError, PriorFileError, check_compatible, load_prior, push_prior
from .likelihood import (
    LikelihoodEstimate,
    LogPartition,
    LowESSWarning,
    log_likelihood,
    log_likelihood_bound,
    log_partition,
)
from .objectives import (
    EBMLoss,
    GeneratorLoss,
    JointLoss,
    MLELoss,
    PriorLoss,
    backbone_prior_loss,
    ebm_loss,
    generator_loss,
    joint_loss,
    mle_loss,
    sample_posterior,
    two_stage_loss,
)
from .ood import (
    OODMetrics,
    OODScore,
    auprc,
    auroc,
    fpr_at_tpr,
    hierarchical_bound,
    llr_score,
    log_joint_score,
    ood_metrics,
)
from .prior import ConvEnergy, JointEBMPrior, MLPEnergy
from .reference import CONFIGS, HierarchicalVAE
from .sample import (
    EpsLangevin,
    Langevin,
    LangevinDivergenceError,
    LangevinResult,
    PosteriorLangevin,
)
from .trainer import TrainingDivergenceError, TwoStageTrainer

__all__ = [
    "ood_metrics",
    "llr_score",
    "log_joint_score",
    "hierarchical_bound",
    "fpr_at_tpr",
    "auroc",
    "auprc",
    "OODScore",
    "OODMetrics",
    "GroupwiseBackbone",
    "CONFIGS",
    "Backbone",
    "ConvEnergy",
    "EBMLoss",
    "GeneratorLoss",
    "JointLoss",
    "MLELoss",
    "LikelihoodEstimate",
    "LogPartition",
    "LowESSWarning",
    "PriorFileError",
    "PriorLoss",
    "backbone_prior_loss",
    "check_compatible",
    "ebm_loss",
    "generator_loss",
    "joint_loss",
    "load_prior",
    "log_likelihood",
    "log_likelihood_bound",
    "log_partition",
    "mle_loss",
    "push_prior",
    "sample_posterior",
    "two_stage_loss",
    "EpsLangevin",
    "IncompatiblePriorError",
    "HierarchicalVAE",
    "JointEBMPrior",
    "Langevin",
    "LangevinDivergenceError",
    "LangevinResult",
    "MLPEnergy",
    "Posterior",
    "PosteriorLangevin",
    "TrainingDivergenceError",
    "TwoStageTrainer",
    "__version__",
]
