r"""The applications behind the ``ebm-prior`` command and the scripts in ``examples/``.

One module per subcommand (``ebm-prior train-digits`` runs :mod:`ebm_prior.apps.train_digits`),
each with a ``main(argv)`` that returns its results, plus the helpers they share: data sets
(:mod:`~ebm_prior.apps.data`, :mod:`~ebm_prior.apps.images`) and FID
(:mod:`~ebm_prior.apps.fid`). Optional dependencies (matplotlib, scikit-learn, torchvision,
Pillow, biva-pytorch, the Inception network) are imported only when a command needs them,
and a missing one is reported with the extra that installs it.
"""
