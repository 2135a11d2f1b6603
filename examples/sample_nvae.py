r"""Sample from a joint EBM prior on a pretrained NVAE (a prior from the Hub or a folder).

``ebm-prior sample-nvae`` runs the same (see ``ebm_prior.apps.sample_nvae``).

    python examples/sample_nvae.py --nvae-root NVAE --checkpoint cifar10/checkpoint.pt \
        --prior you/nvae-cifar10-ebm-prior --num-samples 64 --t 1.0 --steps 40
"""

from ebm_prior.apps.sample_nvae import main

if __name__ == "__main__":
    main()
