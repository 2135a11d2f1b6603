r"""Supplement Table 4's layout over seeds, from the rows ``ebm-prior ood`` writes per run.

Each run (one prior seed, ``ebm-prior ood ... --prior PRIOR --seed S --out DIR``) writes
``DIR/rows_<in>_vs_<out>.json``: AUROC / AUPRC / FPR80 of :math:`-L^{>0}` and
:math:`LLR^{>k}` for every k, for the Gaussian and the EBM prior scored with the same estimator
on the same test images. This prints, per score and k, each prior's mean ± s.d. over the runs
and the paired AUROC difference (EBM minus Gaussian of the same run) with its 95% t interval::

    python benchmarks/ood_seeds.py runs/biva-ood/seed0 runs/biva-ood/seed1 runs/biva-ood/seed2
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from collections.abc import Sequence

from ebm_prior.apps.compare_priors import paired


def load(folders: Sequence[str]) -> list[list[dict]]:
    runs = []
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "rows_*_vs_*.json")))
        if len(files) != 1:
            raise SystemExit(f"{folder}: expected one rows_<in>_vs_<out>.json, found {files}")
        with open(files[0]) as f:
            runs.append(json.load(f)["rows"])
    return runs


def _ms(values: list[float]) -> str:
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def table(runs: list[list[dict]]) -> str:
    ks = [r["k"] for r in runs[0] if r["prior"] == "Gaussian prior"]
    lines = [
        f"{len(runs)} runs; mean ± s.d. over runs; AUROC difference EBM - Gaussian of the same "
        "run with its 95% t interval",
        "",
        "| score | AUROC Gaussian | AUROC EBM | AUPRC Gaussian | AUPRC EBM | FPR80 Gaussian | "
        "FPR80 EBM | AUROC EBM - Gaussian [95% t] |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def get(prior: str, metric: str, k: int) -> list[float]:
        return [
            next(r[metric] for r in run if r["prior"] == prior and r["k"] == k) for run in runs
        ]

    for k in ks:
        g, e = "Gaussian prior", "EBM prior"
        diff = [b - a for a, b in zip(get(g, "auroc", k), get(e, "auroc", k))]
        mean, _, lo, hi = paired(diff)
        name = "L>0" if k == 0 else f"LLR>{k}"
        interval = f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" if len(runs) > 1 else f"{mean:+.4f}"
        lines.append(
            f"| {name} | {_ms(get(g, 'auroc', k))} | {_ms(get(e, 'auroc', k))} | "
            f"{_ms(get(g, 'auprc', k))} | {_ms(get(e, 'auprc', k))} | "
            f"{_ms(get(g, 'fpr80', k))} | {_ms(get(e, 'fpr80', k))} | {interval} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", help="the --out folders of the ood runs")
    args = p.parse_args(argv)
    text = table(load(args.folders))
    print(text)
    return text


if __name__ == "__main__":
    main()
