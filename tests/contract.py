"""The backbone contract suite now ships as :mod:`ebm_prior.testing`; this re-exports it."""

from ebm_prior.testing import BackboneContract, conditional_sigmas

__all__ = ["BackboneContract", "conditional_sigmas"]
