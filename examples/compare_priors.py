"""Gaussian vs joint EBM prior on the same MNIST backbone, paired over seeds.

The same program as ``ebm-prior compare-priors`` (see ``ebm_prior.apps.compare_priors``).
"""

from ebm_prior.apps.compare_priors import main

if __name__ == "__main__":
    main()
