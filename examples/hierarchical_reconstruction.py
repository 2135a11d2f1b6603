r"""Hierarchical reconstructions with a joint EBM prior (supplement Fig. 5).

``ebm-prior hierarchical-reconstruction`` runs the same (see
``ebm_prior.apps.hierarchical_reconstruction``).

    python examples/hierarchical_reconstruction.py --backbone biva
"""

from ebm_prior.apps.hierarchical_reconstruction import main

if __name__ == "__main__":
    main()
