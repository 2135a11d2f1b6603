r"""The ``ebm-prior`` command: one subcommand per application in :mod:`ebm_prior.apps`.

    ebm-prior --help
    ebm-prior train-digits --epochs 2 --out runs/x
    ebm-prior finetune-nvae --help

Each subcommand parses its own arguments (``ebm-prior COMMAND --help``) and runs the same
``main`` as the matching script in ``examples/``.
"""

from __future__ import annotations

__all__ = ["COMMANDS", "main"]

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._version import __version__

#: subcommand -> (module of :mod:`ebm_prior.apps`, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-digits": ("train_digits", "Gaussian vs EBM priors, three ways, on 8x8 digits"),
    "compare-priors": (
        "compare_priors",
        "Gaussian vs EBM prior on one MNIST backbone, paired over seeds",
    ),
    "sample-digits": ("sample_digits", "sample a saved or pulled prior on the digits VAE"),
    "hierarchical-reconstruction": (
        "hierarchical_reconstruction",
        "keep the inferred top groups, resample the lower ones (supplement Fig. 5)",
    ),
    "finetune-nvae": ("finetune_nvae", "fit a prior two-stage on a pretrained NVAE checkpoint"),
    "sample-nvae": ("sample_nvae", "sample a saved or pulled prior on an NVAE checkpoint"),
    "finetune-biva": ("finetune_biva", "fit a prior two-stage on a BIVA session"),
    "finetune-oodd": ("finetune_oodd", "fit a prior two-stage on an hvae-oodd checkpoint"),
    "prior-figures": (
        "prior_figures",
        "samples, transitions, temperature, fixed top groups for a fitted prior",
    ),
    "ood": ("ood", "OOD detection with L>k / LLR>k: Gaussian vs EBM prior"),
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    p = argparse.ArgumentParser(
        prog="ebm-prior",
        description="A joint latent-space EBM prior for hierarchical VAEs.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nebm-prior COMMAND --help: its options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="see below")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    r"""Runs ``ebm-prior COMMAND [options]`` (``argv`` defaults to ``sys.argv[1:]``)."""

    from .apps._common import MissingExtraError, program

    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    command = p.parse_args(argv[:1]).command  # --help, --version, or a known command
    module = importlib.import_module(f"ebm_prior.apps.{COMMANDS[command][0]}")
    with program(f"ebm-prior {command}"):
        try:
            module.main(argv[1:])
        except MissingExtraError as e:
            p.exit(2, f"ebm-prior {command}: error: {e}\n")


if __name__ == "__main__":
    main()
