r"""The supplement's figures (samples, Langevin transitions, temperature, fixed top groups) for a
prior fitted on a trained BIVA, hvae-oodd or NVAE checkpoint.

``ebm-prior prior-figures`` runs the same (see ``ebm_prior.apps.prior_figures``).

    python examples/prior_figures.py --backbone biva --checkpoint runs/binmnist-biva-seed42 \
        --prior runs/biva-prior/seed0/ebm-prior --data-file test.npy --out runs/biva-figures
"""

from ebm_prior.apps.prior_figures import main

if __name__ == "__main__":
    main()
