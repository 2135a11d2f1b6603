r"""Fit a joint EBM prior two-stage on a pretrained (frozen) NVAE, then sample from it.

``ebm-prior finetune-nvae`` runs the same (see ``ebm_prior.apps.finetune_nvae``).

    python examples/finetune_nvae.py --nvae-root NVAE --checkpoint cifar10/checkpoint.pt \
        --data cifar10 --download --out runs/nvae-cifar10 --steps 5000 --batch-size 64
    torchrun --nproc_per_node 2 examples/finetune_nvae.py ... --batch-size 64
"""

from ebm_prior.apps.finetune_nvae import main

if __name__ == "__main__":
    main()
