"""Adapters that make third-party hierarchical VAEs look like an ``ebm_prior.Backbone``."""
