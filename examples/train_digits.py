r"""Train the reference 2-layer VAE on scikit-learn's digits with a Gaussian and a joint EBM prior.

The digits tour of the three regimes: ``ebm-prior train-digits`` runs the same (see
``ebm_prior.apps.train_digits``).

    python examples/train_digits.py                 # full run, outputs in runs/digits
    python examples/train_digits.py --epochs 2 --eval-samples 4 --out /tmp/x   # smoke run
"""

from ebm_prior.apps.train_digits import main

if __name__ == "__main__":
    main()
