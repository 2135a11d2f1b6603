r"""Fit a joint EBM prior two-stage on a pretrained BIVA, then sample from it.

``ebm-prior finetune-biva`` runs the same (see ``ebm_prior.apps.finetune_biva``).

    python examples/finetune_biva.py --logdir runs/binmnist-biva-seed42 --data-file train.npy
"""

from ebm_prior.apps.finetune_biva import main

if __name__ == "__main__":
    main()
