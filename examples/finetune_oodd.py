r"""Fit the joint EBM prior two-stage on an hvae-oodd checkpoint, then sample from it.

``ebm-prior finetune-oodd`` runs the same (see ``ebm_prior.apps.finetune_oodd``).

    OODD_ROOT=path/to/hvae-oodd python examples/finetune_oodd.py --checkpoint models/FMNIST-...
"""

from ebm_prior.apps.finetune_oodd import main

if __name__ == "__main__":
    main()
