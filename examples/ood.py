r"""Out-of-distribution detection with L>k and LLR>k: Gaussian prior vs the joint EBM prior.

``ebm-prior ood`` runs the same (see ``ebm_prior.apps.ood``).

    python examples/ood.py --in-dist fashion-mnist --out-dist mnist
"""

from ebm_prior.apps.ood import main

if __name__ == "__main__":
    main()
