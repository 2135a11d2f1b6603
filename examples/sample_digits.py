r"""Sample from a joint EBM prior pulled from the Hub (or a folder) on the digits VAE.

``ebm-prior sample-digits`` runs the same (see ``ebm_prior.apps.sample_digits``).

    python examples/sample_digits.py --prior you/digits-ebm-prior \
        --backbone runs/digits/vae_A.safetensors --steps 200 --t 1.0
"""

from ebm_prior.apps.sample_digits import main

if __name__ == "__main__":
    main()
