r"""Does the joint EBM prior work on real data? Sample quality, likelihood and anomaly detection.

Trains and evaluates, with a fixed seed per run, on the 8x8 scikit-learn digits, MNIST or
Fashion-MNIST (28 x 28, fixed binarisation, two latent groups):

* ``main``: (a) the reference backbone with its Gaussian prior; (b) the same backbone with the
  joint EBM prior, learned jointly (variational joint learning); (c) two-stage: the EBM prior
  fitted on the frozen model (a);
* ``scale``: Gaussian-prior models whose generator (decoder and prior networks) has about
  2x, 4x, 8x the parameters of (a) (the encoder keeps (a)'s width); with ``--plateau`` every
  size, 1x included, trains to its validation-ELBO plateau, the two-stage prior (c) is fitted on
  the plateau-trained 1x model, and every size is paired with that EBM row by seed (claim 2);
* ``nef``: the two-stage prior (c) with energy networks of width 10, 20, 50, 100;
* ``anomaly``: held-out-class anomaly detection (main paper Table 4): train without class k,
  score test images by the negative log-likelihood bound and by the negative unnormalised log
  joint at posterior samples (Pang et al., 2020), AUPRC with class k as positive;
* ``fig1``: supplement Fig. 1, a 2-group model with 2-D latents per group on digits 0 and 1.

Metrics (see ``benchmarks/metrics.py``), at the same number of samples for every row: FID, KID and
FID-infinity (FID at ``--fid-ns`` extrapolated in 1/N, Chong & Forsyth) with the Inception
network (``main`` only) and in the features of a small classifier trained on the dataset, the test
ELBO and importance-weighted bound in nats (EBM prior normalised by an importance-sampling
estimate of log Z), the reconstruction MSE. Prints markdown tables (mean +- std over seeds, and
for ``main`` the paired differences to (a) with 95% t intervals),
writes ``results_<dataset>_<parts>.json`` and figures into ``--out``. Every model trains through
:class:`ebm_prior.Trainer` (the shared runs of ``ebm_prior.apps.training``), checkpointed in
``<out>/<dataset>/models/<run>``: a stopped benchmark started again resumes every model where it
stopped, and a larger ``--epochs`` continues finished ones.

    python benchmarks/quality.py --dataset digits --parts main,nef,scale,fig1
    python benchmarks/quality.py --dataset mnist --parts main,nef --seeds 0,1,2,3
    python benchmarks/quality.py --dataset mnist --parts scale --plateau --max-epochs 60
    python benchmarks/quality.py --report --out runs/quality     # tables of every JSON there
    python benchmarks/quality.py --tiny --out /some/dir          # smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ebm_prior import (
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
    Trainer,
    TrainingDivergenceError,
    auprc,
    log_joint_score,
    log_likelihood,
    log_partition,
)
from ebm_prior.apps import data as _data
from ebm_prior.apps.compare_priors import paired as paired_interval
from ebm_prior.apps.images import save_grid as _save_grid
from ebm_prior.apps.training import fit_elbo, fit_elbo_to_plateau, fit_joint
from ebm_prior.apps.training import fit_two_stage as _fit_two_stage

if __package__:  # imported as benchmarks.quality (the tests, python -m benchmarks.quality)
    from . import metrics
else:  # run as a script: Python puts the script's folder on the path
    import metrics

PARTS = ("main", "scale", "nef", "anomaly", "fig1")
DATASETS = ("digits", "mnist", "fashion-mnist")
#: Backbone per dataset: the reference configs; 28 x 28 at a CPU-sized width.
BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "digits": ("digits", {}),
    "mnist": ("mnist", dict(hidden=128, channels=16)),
    "fashion-mnist": ("mnist", dict(hidden=128, channels=16)),
}


# -- arguments -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--parts", default="main", help=f"comma-separated subset of {PARTS}")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated model seeds")
    p.add_argument("--out", default="runs/quality", help="output folder (JSON, figures, caches)")
    p.add_argument("--tiny", action="store_true", help="tiny budget (checks the pipeline only)")
    p.add_argument("--report", action="store_true", help="only print the tables of --out")
    p.add_argument("--download", action="store_true", help="let torchvision download data")
    p.add_argument("--data-root", default="data", help="torchvision's data folder")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    g = p.add_argument_group("budget (defaults: 28x28 / digits)")
    g.add_argument("--train-size", type=int, help="training images (10000 / all 1500)")
    g.add_argument("--test-size", type=int, help="test images (1000 / all 297)")
    g.add_argument("--epochs", type=int, help="backbone epochs (6 / 150)")
    g.add_argument("--two-stage-epochs", type=int, help="EBM epochs on a frozen backbone")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate")
    g.add_argument("--ebm-lr", type=float, default=1e-4, help="energy learning rate (joint)")
    g.add_argument(
        "--two-stage-lr",
        type=float,
        default=5e-4,
        help="energy learning rate of two-stage fitting (frozen backbone)",
    )
    g.add_argument("--energy-reg", type=float, default=0.01, help="L2 penalty on energies")
    g.add_argument("--nef", type=int, default=100, help="energy width of (b) and (c)")
    g.add_argument("--nefs", default="10,20,50,100", help="energy widths of the nef sweep")
    g.add_argument("--scales", default="2,4,8", help="generator-parameter ratios of 'scale'")
    g.add_argument(
        "--plateau",
        action="store_true",
        help="'scale': train every model (1x too) to a validation-ELBO plateau",
    )
    g.add_argument("--max-epochs", type=int, help="--plateau: epoch cap (1000 / 100)")
    g.add_argument(
        "--patience",
        type=int,
        help="--plateau: epochs without gain (5 / 32: about 450 updates of 100 images each)",
    )
    g.add_argument("--min-delta", type=float, default=0.05, help="--plateau: gain in nats")
    g.add_argument("--val-fraction", type=float, default=0.1, help="--plateau: held out")
    g.add_argument("--langevin-steps", type=int, default=50, help="prior Langevin steps")
    g.add_argument("--step-size", type=float, default=0.3, help="Langevin step size s")
    g.add_argument("--eval-steps", type=int, help="Langevin steps for samples (default: train)")
    g.add_argument("--samples", type=int, help="generated images for classifier FID/KID")
    g.add_argument("--inception-samples", type=int, help="generated images for Inception FID")
    g.add_argument("--inception-real", type=int, help="real test images for Inception FID")
    g.add_argument("--fid-ns", help="sample sizes of FID-infinity (250,500,1000)")
    g.add_argument("--fid-draws", type=int, default=5, help="subsets per FID(N) below the max")
    g.add_argument("--iw-samples", type=int, help="importance samples K of the bound")
    g.add_argument("--log-z-samples", type=int, help="base-prior samples for log Z")
    g.add_argument(
        "--ais-chains",
        type=int,
        default=1000,
        help="chains of the AIS estimate of log Z recorded next to the IS one",
    )
    g.add_argument("--ais-temperatures", type=int, default=500, help="AIS temperatures")
    g.add_argument("--classifier-epochs", type=int, help="epochs of the feature classifier")
    g.add_argument("--anomaly-classes", default="1,4,5,7,9")
    g.add_argument("--anomaly-train-size", type=int, help="training images before removal")
    g.add_argument("--anomaly-iw-samples", type=int, help="posterior samples per image")
    args = p.parse_args(argv)
    small = args.dataset == "digits"
    defaults = dict(
        train_size=None if small else 10_000,
        test_size=None if small else 1_000,
        epochs=150 if small else 6,
        two_stage_epochs=50 if small else 6,
        samples=1_000,
        classifier_epochs=20 if small else 5,
        inception_samples=0 if small else 1_000,
        inception_real=1_000,
        fid_ns="250,500,1000",
        iw_samples=100 if small else 20,
        log_z_samples=50_000 if small else 20_000,
        anomaly_train_size=None if small else 6_000,
        anomaly_iw_samples=20 if small else 10,
        max_epochs=1000 if small else 100,
        # the same number of updates without gain: 5 epochs of 9,000 images, 32 of 1,350
        patience=32 if small else 5,
    )
    if args.tiny:
        defaults.update(
            train_size=200, test_size=64, epochs=1, two_stage_epochs=1, samples=64,
            inception_samples=0, inception_real=8, fid_ns="16,32,64", iw_samples=2,
            log_z_samples=200,
            anomaly_train_size=300, anomaly_iw_samples=2, max_epochs=3,
        )  # fmt: skip
        defaults["classifier_epochs"], args.langevin_steps = 1, 3
        args.ais_chains, args.ais_temperatures = 128, 10
        args.nefs, args.scales, args.anomaly_classes = "10,20", "2", "1"
        if args.seeds == "0,1,2,3":
            args.seeds = "0"
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.eval_steps is None:
        args.eval_steps = args.langevin_steps
    args.parts = [s for s in args.parts.split(",") if s]
    for part in args.parts:
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; available: {', '.join(PARTS)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.fid_ns = sorted(int(s) for s in str(args.fid_ns).split(","))
    if args.samples < args.fid_ns[-1]:
        raise SystemExit(f"--samples ({args.samples}) must be at least the largest --fid-ns "
                         f"({args.fid_ns[-1]})")  # fmt: skip
    args.nefs = [int(s) for s in str(args.nefs).split(",")]
    args.scales = [float(s) for s in str(args.scales).split(",")]
    args.anomaly_classes = [int(s) for s in str(args.anomaly_classes).split(",")]
    return args


# -- data ----------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    r"""Returns binarised train/test images, the grayscale images they were drawn from, labels.

    28 x 28: a fixed Bernoulli binarisation of the grayscale images (the decoder's mean
    estimates the grayscale image, which is the FID reference and the MSE target); digits:
    pixel >= 8 of 16, as ``examples/train_digits.py`` (the binary image is its own reference).
    Subsets are fixed (seed 0) across model seeds.
    """

    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images >= 8, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        tr, te = slice(0, 1500), slice(1500, None)
        out = dict(train=x[tr], train_gray=x[tr], train_y=y[tr])
        out.update(test=x[te], test_gray=x[te], test_y=y[te])
    else:
        out = {}
        for split in ("train", "test"):
            x = _data.load_images(args.dataset, split, args.data_root, args.download)
            y = _data.load_labels(args.dataset, split, args.data_root, args.download)
            out[split] = _data.binarize(x, seed=0 if split == "train" else 1)
            out[f"{split}_gray"], out[f"{split}_y"] = x, y
    for split, n in (("train", args.train_size), ("test", args.test_size)):
        if n is not None and n < len(out[split]):
            idx = torch.randperm(len(out[split]), generator=torch.Generator().manual_seed(0))[:n]
            for key in (split, f"{split}_gray", f"{split}_y"):
                out[key] = out[key][idx]
    return out


# -- models --------------------------------------------------------------------------------------


def new_backbone(dataset: str, **overrides: Any) -> HierarchicalVAE:
    r"""The reference backbone of a dataset (:data:`BACKBONES`), with keyword overrides."""

    name, base = BACKBONES[dataset]
    return HierarchicalVAE.from_config(name, **{**base, **overrides})


def generator_params(vae: HierarchicalVAE) -> int:
    r"""Parameters of the generator: the decoder and the prior networks (not the encoder)."""

    return sum(p.numel() for m in (vae.decoder, vae.prior_nets) for p in m.parameters())


def scaled_backbone(dataset: str, ratio: float) -> HierarchicalVAE:
    r"""A backbone whose generator has about ``ratio`` times the base generator's parameters.

    Decoder channels and prior-network width are multiplied by one factor, found by bisection
    on the parameter count; the encoder keeps the base width (its modules are the base ones).
    """

    name, base = BACKBONES[dataset]
    full = {**HierarchicalVAE.from_config(name, **base).config}
    ref = generator_params(new_backbone(dataset))

    def build(m: float) -> HierarchicalVAE:
        return new_backbone(
            dataset,
            hidden=max(1, round(full["hidden"] * m)),
            channels=max(1, round(full["channels"] * m)),
        )

    lo, hi = 1.0, 2.0
    while generator_params(build(hi)) < ratio * ref:
        lo, hi = hi, hi * 2
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if generator_params(build(mid)) < ratio * ref else (lo, mid)
    best = min((build(lo), build(hi)), key=lambda v: abs(math.log(generator_params(v) / ref)
                                                           - math.log(ratio)))  # fmt: skip
    small = new_backbone(dataset)
    best.encoder_x, best.encoder_z = small.encoder_x, small.encoder_z
    return best


def new_prior(vae: HierarchicalVAE, nef: int, args: argparse.Namespace) -> JointEBMPrior:
    return JointEBMPrior(
        vae.latent_shapes,
        nef=nef,
        sampler_config={"step_size": args.step_size, "steps": args.langevin_steps},
        backbone=vae.fingerprint(),
    )


def _folder(args: argparse.Namespace, name: str) -> str | None:
    r"""The trainer's checkpoint folder of a run (``None`` at the tiny budget: not kept)."""

    return None if args.tiny else os.path.join(args.out, args.dataset, "models", name)


def train_gaussian(vae: HierarchicalVAE, x: torch.Tensor, epochs: int, args, seed: int,
                   name: str | None = None) -> Trainer:  # fmt: skip
    r"""Maximises the ELBO under the Gaussian prior (Adam, ``args.lr``; :func:`fit_elbo`),
    checkpointed in ``models/<name>`` so a stopped run resumes."""

    folder = None if name is None else _folder(args, name)
    return fit_elbo(vae, x, epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                    checkpoint_dir=folder, progress=False)  # fmt: skip


def _diagnostics(trainer: Trainer) -> dict[str, float]:
    last = trainer.history[-1]
    return {"f_pos": last["f_pos"], "f_neg": last["f_neg"], "train_s": _train_s(trainer)}


def train_joint(vae, prior, x: torch.Tensor, args, seed: int, name: str | None = None):
    r"""Variational joint learning of backbone and EBM prior (:func:`fit_joint`)."""

    trainer = fit_joint(
        vae, prior, x, args.epochs, batch_size=args.batch_size, lr=args.lr, ebm_lr=args.ebm_lr,
        reg=args.energy_reg, step_size=args.step_size, steps=args.langevin_steps, seed=seed,
        checkpoint_dir=None if name is None else _folder(args, name), progress=False,
    )  # fmt: skip
    return _diagnostics(trainer)


def fit_two_stage(prior, vae, x: torch.Tensor, args, seed: int, name: str | None = None):
    r"""Fits the EBM prior on the frozen backbone (``training.fit_two_stage``)."""

    trainer = _fit_two_stage(
        prior, vae, x, args.two_stage_epochs, batch_size=args.batch_size, lr=args.two_stage_lr,
        reg=args.energy_reg, step_size=args.step_size, steps=args.langevin_steps, seed=seed,
        checkpoint_dir=None if name is None else _folder(args, name), progress=False,
    )  # fmt: skip
    return _diagnostics(trainer)


# -- evaluation ----------------------------------------------------------------------------------


def generate(vae, prior, n: int, args, seed: int, steps: int | None = None) -> torch.Tensor:
    r"""Decoded mean images of ``n`` prior samples: base prior, then eps-space Langevin if an EBM
    prior is given (``steps``, default ``args.eval_steps``, step size ``args.step_size``)."""

    g = torch.Generator().manual_seed(seed)
    eps = vae.sample_eps(n, generator=g)
    steps = args.eval_steps if steps is None else steps
    if prior is not None and steps > 0:
        sampler = EpsLangevin(prior, vae, step_size=args.step_size, steps=steps, generator=g,
                              trace=False)  # fmt: skip
        chunks = [sampler([e[i : i + 500] for e in eps]).x for i in range(0, n, 500)]
        eps = [torch.cat(c) for c in zip(*chunks)]
    with torch.no_grad():
        return torch.cat([vae.decode(vae.eps_to_z([e[i : i + 500] for e in eps]))
                          for i in range(0, n, 500)])  # fmt: skip


class Context:
    r"""Per-dataset state shared by all runs: data, feature extractors, real-image features."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = os.path.join(args.out, args.dataset)
        os.makedirs(self.dir, exist_ok=True)
        self.data = load_data(args)
        d = self.data
        t0 = time.time()
        tag = f"n{len(d['train_gray'])}_e{args.classifier_epochs}"
        self.classifier = metrics.ClassifierFeatures(
            d["train_gray"], d["train_y"], os.path.join(self.dir, f"classifier_{tag}.safetensors"),
            epochs=args.classifier_epochs,
        )  # fmt: skip
        self.classifier_accuracy = self.classifier.accuracy(d["test_gray"], d["test_y"])
        self.real_cls = self.classifier(d["test_gray"])
        print(f"[{args.dataset}] classifier: test accuracy {self.classifier_accuracy:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        self._inception = None
        self._real_inception = None

    def inception_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._inception is None:
            self._inception = metrics.InceptionFeatures()
        return self._inception(x)

    def real_inception(self) -> torch.Tensor:
        if self._real_inception is None:
            n = self.args.inception_real
            path = os.path.join(self.dir, f"inception_real_{n}_{len(self.data['test'])}.pt")
            if os.path.exists(path):
                self._real_inception = torch.load(path, weights_only=True)
            else:
                self._real_inception = self.inception_features(self.data["test_gray"][:n])
                torch.save(self._real_inception, path)
        return self._real_inception

    @torch.no_grad()
    def evaluate(self, vae, prior, seed: int, inception: bool = False, likelihood: bool = True):
        r"""Classifier FID/KID (and Inception FID), test bounds, log Z and reconstruction MSE."""

        a, d = self.args, self.data
        t0 = time.time()
        with torch.enable_grad():
            x = generate(vae, prior, a.samples, a, seed + 10_000)
        feats = self.classifier(x)
        fid = metrics.fid_infinity(feats, self.real_cls, a.fid_ns, a.fid_draws, seed)
        out = {
            "fid_cls": metrics.frechet_distance(feats, self.real_cls),
            "fid_inf_cls": fid["fid_inf"],
            "kid_cls": metrics.kernel_inception_distance(feats, self.real_cls, seed=seed),
        }
        if inception and a.inception_samples > 0:
            real = self.real_inception()
            inc = self.inception_features(x[: a.inception_samples])
            out["fid_inception"] = metrics.frechet_distance(inc, real)
            out["kid_inception"] = metrics.kernel_inception_distance(inc, real, seed=seed)
            ns = [n for n in a.fid_ns if n <= len(inc)]
            if len(ns) >= 2:  # FID-infinity needs two sample sizes at least
                fit = metrics.fid_infinity(inc, real, ns, a.fid_draws, seed)
                out["fid_inf_inception"] = fit["fid_inf"]
            out["inception_samples"] = len(inc)
        if likelihood:
            out.update(metrics.test_log_likelihood(
                vae, d["test"], prior, a.iw_samples, a.log_z_samples, seed
            ))  # fmt: skip
            if prior is not None:  # a second estimator of log Z, as a check of the first
                check = log_partition(prior, vae, generator=torch.Generator().manual_seed(seed),
                                      method="ais", num_chains=a.ais_chains,
                                      num_temperatures=a.ais_temperatures)  # fmt: skip
                out.update(log_z_ais=check.value, log_z_ais_se=check.std_error,
                           log_z_ais_ess=check.ess)  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out["mse"] = metrics.reconstruct(vae, d["test"], d["test_gray"])
        out["eval_s"] = time.time() - t0
        return out, x


# -- parts ---------------------------------------------------------------------------------------


#: Where each row is appended as it comes (JSON lines), so a stopped run keeps what it measured.
_PARTIAL: list[str] = []


def _record(results, part, model, seed, **values) -> dict:
    row = {"dataset": None, "part": part, "model": model, "seed": seed, **values}
    results.append(row)
    for path in _PARTIAL:
        with open(path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
    print(f"  {part:7s} {model:28s} seed {seed}: {shown}", flush=True)
    return row


def _train_s(trainer: Trainer) -> float:
    r"""Seconds of every step the model has had, over all the runs that resumed it."""

    return float(sum(h["seconds"] for h in trainer.history))


def _gaussian(ctx: Context, seed: int, cache: dict) -> tuple[HierarchicalVAE, float]:
    r"""Model (a) of a seed: trained once per process, through its trainer's checkpoints."""

    if seed in cache:
        return cache[seed]
    a = ctx.args
    torch.manual_seed(seed)
    vae = new_backbone(a.dataset)
    n = len(ctx.data["train"])
    trainer = train_gaussian(vae, ctx.data["train"], a.epochs, a, seed, f"a_n{n}_seed{seed}")
    vae.eval()
    cache[seed] = (vae, _train_s(trainer))
    return cache[seed]


def run_main(ctx: Context, results: list, cache: dict) -> None:
    a = ctx.args
    for seed in a.seeds:
        vae, train_s = _gaussian(ctx, seed, cache)
        params = generator_params(vae)
        m, x_a = ctx.evaluate(vae, None, seed, inception=True)
        _record(results, "main", "a Gaussian prior", seed, train_s=train_s, params=params, **m)

        torch.manual_seed(seed)  # same initialisation as (a)
        joint_vae = new_backbone(a.dataset)
        joint = new_prior(joint_vae, a.nef, a)
        n = len(ctx.data["train"])
        try:
            diag = train_joint(joint_vae, joint, ctx.data["train"], a, seed, f"b_n{n}_seed{seed}")
            m, x_b = ctx.evaluate(joint_vae, joint, seed, inception=True)
            _record(results, "main", "b joint EBM prior", seed, params=params, **diag, **m)
        except TrainingDivergenceError as e:
            x_b = None
            _record(results, "main", "b joint EBM prior", seed, diverged=str(e))

        torch.manual_seed(seed)
        prior = new_prior(vae, a.nef, a)
        diag = fit_two_stage(prior, vae, ctx.data["train"], a, seed,
                             f"c_nef{a.nef}_n{n}_seed{seed}")  # fmt: skip
        cache[("prior", seed, a.nef)] = (prior, diag)
        m, x_c = ctx.evaluate(vae, prior, seed, inception=True)
        _record(results, "main", "c two-stage EBM prior", seed, params=params, nef=a.nef,
                **diag, **m)  # fmt: skip
        if seed == a.seeds[0]:
            grids = {"data": ctx.data["test_gray"], "a_gaussian": x_a, "c_two_stage": x_c}
            if x_b is not None:
                grids["b_joint"] = x_b
            for name, x in grids.items():
                save_grid(x[:100], os.path.join(ctx.dir, f"samples_{name}.png"), name)
            langevin_figure(vae, prior, a, os.path.join(ctx.dir, "langevin_c_two_stage.png"),
                            seed)  # fmt: skip
            if x_b is not None:
                langevin_figure(joint_vae, joint, a, os.path.join(ctx.dir, "langevin_b_joint.png"),
                                seed)  # fmt: skip


def run_nef(ctx: Context, results: list, cache: dict) -> None:
    a = ctx.args
    for seed in a.seeds:
        vae, _ = _gaussian(ctx, seed, cache)
        for nef in a.nefs:
            if ("prior", seed, nef) in cache:
                prior, diag = cache[("prior", seed, nef)]
            else:
                torch.manual_seed(seed)
                prior = new_prior(vae, nef, a)
                n = len(ctx.data["train"])
                diag = fit_two_stage(prior, vae, ctx.data["train"], a, seed,
                                     f"c_nef{nef}_n{n}_seed{seed}")  # fmt: skip
            m, _ = ctx.evaluate(vae, prior, seed)
            n_e = sum(p.numel() for p in prior.parameters())
            _record(results, "nef", f"c nef={nef}", seed, nef=nef, energy_params=n_e, **diag,
                    **m)  # fmt: skip


def run_scale(ctx: Context, results: list, cache: dict) -> None:
    r"""Gaussian-prior models with 2x / 4x / 8x the generator. With ``--plateau`` every model,
    the 1x base included, trains until its validation ELBO (a held-out ``--val-fraction`` of
    the training images) stops improving (:func:`fit_elbo_to_plateau`), so that size is not
    confounded with under-training."""

    a = ctx.args
    if a.plateau:
        return _run_scale_plateau(ctx, results)
    base = generator_params(new_backbone(a.dataset))
    for ratio in a.scales:
        vae = scaled_backbone(a.dataset, ratio)
        cfg = vae.config
        print(f"  scale x{ratio:g}: generator params {generator_params(vae):,} "
              f"(base {base:,}; hidden {cfg['hidden']}, channels {cfg['channels']})")  # fmt: skip
    for seed in a.seeds:
        for ratio in a.scales:
            torch.manual_seed(seed)
            vae = scaled_backbone(a.dataset, ratio)
            n = len(ctx.data["train"])
            trainer = train_gaussian(vae, ctx.data["train"], a.epochs, a, seed,
                                     f"d_{ratio:g}x_n{n}_seed{seed}")  # fmt: skip
            train_s = _train_s(trainer)
            m, x = ctx.evaluate(vae, None, seed)
            p = generator_params(vae)
            _record(results, "scale", f"d Gaussian, {ratio:g}x generator", seed, train_s=train_s,
                    params=p, ratio=p / base, hidden=vae.config["hidden"],
                    channels=vae.config["channels"], **m)  # fmt: skip
            if seed == a.seeds[0]:
                save_grid(x[:100], os.path.join(ctx.dir, f"samples_d_{ratio:g}x.png"),
                          f"Gaussian prior, {ratio:g}x generator")  # fmt: skip


#: The model every ``--plateau`` row of ``scale`` is paired with (claim 2: a bigger Gaussian
#: generator against the small one with the EBM prior, both trained to their plateau).
PLATEAU_EBM = "c two-stage EBM prior, 1x generator, to plateau"


def _run_scale_plateau(ctx: Context, results: list) -> None:
    a = ctx.args
    base = generator_params(new_backbone(a.dataset))
    x = ctx.data["train"]
    n_val = max(1, int(a.val_fraction * len(x)))
    x_train, x_val = x[:-n_val], x[-n_val:]
    for seed in a.seeds:
        for ratio in [1.0, *[r for r in a.scales if r != 1]]:
            torch.manual_seed(seed)
            vae = new_backbone(a.dataset) if ratio == 1 else scaled_backbone(a.dataset, ratio)
            name = f"plateau_d_{ratio:g}x_n{len(x_train)}_seed{seed}"
            trainer, curve = fit_elbo_to_plateau(
                vae, x_train, x_val, max_epochs=a.max_epochs, patience=a.patience,
                min_delta=a.min_delta, batch_size=a.batch_size, lr=a.lr, seed=seed,
                checkpoint_dir=_folder(a, name), progress=False,
            )  # fmt: skip
            vae.eval()
            known = [v for v in curve if v is not None]
            m, x_gen = ctx.evaluate(vae, None, seed, inception=True)
            p = generator_params(vae)
            stats = dict(params=p, ratio=p / base, epochs=len(curve),
                         plateau=len(curve) < a.max_epochs, val_elbo=known[-1],
                         best_val_elbo=max(known))  # fmt: skip
            _record(results, "scale", f"d Gaussian, {ratio:g}x generator, to plateau", seed,
                    train_s=_train_s(trainer), **stats, **m)  # fmt: skip
            if seed == a.seeds[0]:
                save_grid(x_gen[:100], os.path.join(ctx.dir, f"samples_d_{ratio:g}x_plateau.png"),
                          f"Gaussian prior, {ratio:g}x generator, to plateau")  # fmt: skip
            if ratio != 1:
                continue
            # (c) on the plateau-trained 1x backbone: the row every larger generator is paired with
            torch.manual_seed(seed)
            prior = new_prior(vae, a.nef, a)
            diag = fit_two_stage(prior, vae, x_train, a, seed,
                                 f"plateau_c_nef{a.nef}_n{len(x_train)}_seed{seed}")  # fmt: skip
            m, x_gen = ctx.evaluate(vae, prior, seed, inception=True)
            diag["train_s"] += _train_s(trainer)
            _record(results, "scale", PLATEAU_EBM, seed, nef=a.nef, **stats, **diag, **m)
            if seed == a.seeds[0]:
                save_grid(x_gen[:100], os.path.join(ctx.dir, "samples_c_1x_plateau.png"),
                          "two-stage EBM prior on the 1x generator, to plateau")  # fmt: skip


def run_anomaly(ctx: Context, results: list, cache: dict) -> None:
    r"""Train without class k (model (a) + two-stage prior (c)); AUPRC of two anomaly scores,
    each with the EBM prior and with the Gaussian prior of the same backbone:

    * the negative importance-weighted bound, :math:`-\log p(x)` (``auprc_*``);
    * the negative unnormalised log joint at posterior samples (the decision function of
      Pang et al., 2020, which the paper's Table 4 follows),
      :math:`-\mathbb{E}_{q(z|x)}[\log p(x|z) + \log p_b(z) + f_a(z)]`
      (:func:`ebm_prior.log_joint_score`; ``auprc_joint_*``).
    """

    a, d = ctx.args, ctx.data
    n = a.anomaly_train_size or len(d["train"])
    for seed in a.seeds:
        for k in a.anomaly_classes:
            keep = d["train_y"][:n] != k
            x = d["train"][:n][keep]
            torch.manual_seed(seed)
            vae = new_backbone(a.dataset)
            name = f"anomaly{k}_n{n}_seed{seed}"
            trainer = train_gaussian(vae, x, a.epochs, a, seed, f"{name}_a")
            torch.manual_seed(seed)
            prior = new_prior(vae, a.nef, a)
            diag = fit_two_stage(prior, vae, x, a, seed, f"{name}_c")
            train_s = _train_s(trainer) + diag["train_s"]
            out = {"train_s": train_s, "train_images": int(keep.sum())}
            pos = d["test_y"] == k
            for name, p in (("gaussian", None), ("ebm", prior)):
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    ll = torch.cat([log_likelihood(vae, c, p, 0.0, a.anomaly_iw_samples).value
                                    for c in d["test"].split(250)])  # fmt: skip
                    lj = torch.cat([log_joint_score(vae, c, p, samples=a.anomaly_iw_samples)
                                    for c in d["test"].split(250)])  # fmt: skip
                out[f"auprc_{name}"] = auprc(-ll[~pos], -ll[pos])
                out[f"auprc_joint_{name}"] = auprc(-lj[~pos], -lj[pos])
            out["positive_rate"] = pos.double().mean().item()
            _record(results, "anomaly", f"held-out {k}", seed, k=k, **out)


def run_fig1(ctx: Context, results: list, cache: dict) -> None:
    r"""Supplement Fig. 1: 2 groups of 2-D latents, digits 0 and 1; scatter of the base prior,
    the EBM prior (after Langevin) and the aggregate posterior, per group (one figure per seed,
    ``fig1_latents.png`` for the first).

    Besides the energies, each seed records how far the two priors are from the aggregate
    posterior: the unbiased squared MMD with a Gaussian kernel (:func:`metrics.gaussian_mmd`,
    on the 4-D concatenated latents) between posterior samples and base-prior samples
    (``mmd_base``) and EBM-prior samples (``mmd_ebm``). The paper's figure corresponds to
    ``mmd_ebm`` well below ``mmd_base``."""

    a, d = ctx.args, ctx.data
    keep = d["train_y"] <= 1
    x = d["train"][keep]
    fa = copy.copy(a)
    fa.epochs = a.epochs * max(1, len(d["train"]) // max(1, len(x)) // 2)
    fa.two_stage_epochs = fa.epochs
    n = min(len(x), 500)
    for seed in a.seeds:
        torch.manual_seed(seed)
        vae = new_backbone(a.dataset, latent_dims=(2, 2))
        train_gaussian(vae, x, fa.epochs, fa, seed, f"fig1_seed{seed}_a")
        torch.manual_seed(seed)
        prior = new_prior(vae, 32, a)
        diag = fit_two_stage(prior, vae, x, fa, seed, f"fig1_seed{seed}_c")
        with torch.no_grad():
            torch.manual_seed(seed)
            post = vae.posterior(x[:n]).z
            base = vae.eps_to_z(vae.sample_eps(n, generator=torch.Generator().manual_seed(seed)))
        g = torch.Generator().manual_seed(seed)
        sampler = EpsLangevin(prior, vae, step_size=a.step_size, steps=a.eval_steps * 4,
                              generator=g, trace=False)  # fmt: skip
        ebm = sampler(vae.sample_eps(n, generator=torch.Generator().manual_seed(seed))).z
        name = "fig1_latents.png" if seed == a.seeds[0] else f"fig1_latents_seed{seed}.png"
        latent_scatter(base, ebm, post, os.path.join(ctx.dir, name))
        cat = [torch.cat([z.reshape(n, -1) for z in zs], 1) for zs in (post, base, ebm)]
        mmd = {"mmd_base": metrics.gaussian_mmd(cat[0], cat[1]),
               "mmd_ebm": metrics.gaussian_mmd(cat[0], cat[2])}  # fmt: skip
        _record(results, "fig1", "2x2-D latents, digits 0/1", seed, images=len(x), **diag, **mmd)


RUNNERS = {"main": run_main, "nef": run_nef, "scale": run_scale, "anomaly": run_anomaly,
           "fig1": run_fig1}  # fmt: skip


# -- figures -------------------------------------------------------------------------------------


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("figures need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(x: torch.Tensor, path: str, title: str) -> None:
    r"""Writes the largest square grid of images in [0, 1] that ``x`` fills, as a PNG."""

    n = int(math.sqrt(len(x)))
    _save_grid(path, x[: n * n], nrow=n, title=title)


def langevin_figure(vae, prior, args, path: str, seed: int, rows: int = 8) -> None:
    r"""Eps-space Langevin from the base prior (step 0) to the EBM prior, decoded snapshots."""

    plt = _plt()
    g = torch.Generator().manual_seed(seed)
    eps = vae.sample_eps(rows, generator=g)
    total = max(args.eval_steps * 4, 8)
    every = max(1, total // 8)
    sampler = EpsLangevin(prior, vae, step_size=args.step_size, steps=every, generator=g,
                          trace=False)  # fmt: skip
    snaps, steps = [eps], [0]
    for k in range(every, total + 1, every):
        eps = sampler(eps).x
        snaps.append(eps)
        steps.append(k)
    fig, axes = plt.subplots(rows, len(snaps), figsize=(len(snaps) * 0.8, rows * 0.8))
    for j, (e, k) in enumerate(zip(snaps, steps)):
        with torch.no_grad():
            imgs = vae.decode(vae.eps_to_z(e))
        axes[0, j].set_title(str(k), fontsize=7)
        for i in range(rows):
            axes[i, j].imshow(imgs[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.suptitle(f"eps-space Langevin (s={args.step_size}): base prior -> EBM prior", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_scatter(base, ebm, post, path: str) -> None:
    r"""Scatter per latent group: base-prior and EBM-prior samples over posterior samples."""

    plt = _plt()
    groups = len(base)
    fig, axes = plt.subplots(2, groups, figsize=(3.2 * groups, 6.2), squeeze=False)
    titles = ("Gaussian prior p_b (before Langevin)", "EBM prior (after Langevin)")
    for row, (samples, title) in enumerate(zip((base, ebm), titles)):
        for i in range(groups):
            ax = axes[row, i]
            q, s = post[i].detach().numpy(), samples[i].detach().numpy()
            ax.scatter(q[:, 0], q[:, 1], s=3, c="tab:blue", alpha=0.5, label="posterior q(z|x)")
            ax.scatter(s[:, 0], s[:, 1], s=3, c="tab:red", alpha=0.5, label="prior samples")
            ax.set_title(f"group {i + 1} (top first): {title}", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- tables --------------------------------------------------------------------------------------


def _finite(v: float | None) -> bool:
    return v is not None and bool(np.isfinite(v))


def _ms(values: list[float], fmt: str) -> str:
    v = [x for x in values if _finite(x)]
    if not v:
        return "-"
    if len(v) == 1 or all(x == v[0] for x in v):
        return format(v[0], fmt)
    return f"{format(float(np.mean(v)), fmt)} +- {format(float(np.std(v, ddof=1)), fmt)}"


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["part"], r["model"]), []).append(r)
    return out


def tables(rows: list[dict]) -> str:
    r"""Markdown tables, mean +- std (ddof 1) over seeds, one per dataset and part."""

    cols = {
        "main": [("params", "generator params", ",.0f"), ("fid_inception", "FID Inception", ".1f"),
                 ("fid_inf_inception", "FID-inf Inception", ".1f"),
                 ("kid_inception", "KID Inception", ".4f"),
                 ("fid_cls", "FID cls", ".2f"), ("fid_inf_cls", "FID-inf cls", ".2f"),
                 ("kid_cls", "KID cls", ".1f"),
                 ("elbo", "test ELBO", ".2f"), ("iw", "log p(x) IW", ".2f"),
                 ("log_z", "log Z", ".3f"), ("log_z_se", "s.e.", ".3f"),
                 ("log_z_ess", "ESS", ",.0f"), ("log_z_ais", "log Z AIS", ".3f"),
                 ("mse", "MSE", ".4f"),
                 ("train_s", "train s", ".0f")],
        "nef": [("energy_params", "energy params", ",.0f"), ("fid_cls", "FID cls", ".2f"),
                ("fid_inf_cls", "FID-inf cls", ".2f"), ("kid_cls", "KID cls", ".1f"),
                ("iw", "log p(x) IW", ".2f"),
                ("log_z", "log Z", ".3f"), ("log_z_ess", "ESS", ",.0f"),
                ("log_z_ais", "log Z AIS", ".3f"), ("f_pos", "f(z+)", ".2f"),
                ("f_neg", "f(z-)", ".2f"),
                ("train_s", "train s", ".0f")],
        "scale": [("params", "generator params", ",.0f"), ("ratio", "ratio", ".2f"),
                  ("epochs", "epochs", ".0f"), ("best_val_elbo", "best val. ELBO", ".2f"),
                  ("fid_inf_inception", "FID-inf Inception", ".1f"),
                  ("kid_inception", "KID Inception", ".4f"), ("fid_cls", "FID cls", ".2f"),
                  ("fid_inf_cls", "FID-inf cls", ".2f"),
                  ("kid_cls", "KID cls", ".1f"), ("elbo", "test ELBO", ".2f"),
                  ("iw", "log p(x) IW", ".2f"), ("log_z", "log Z", ".3f"),
                  ("mse", "MSE", ".4f"), ("train_s", "train s", ".0f")],
        "anomaly": [("auprc_gaussian", "AUPRC bound, Gaussian", ".3f"),
                    ("auprc_ebm", "AUPRC bound, EBM", ".3f"),
                    ("auprc_joint_gaussian", "AUPRC log-joint, Gaussian", ".3f"),
                    ("auprc_joint_ebm", "AUPRC log-joint, EBM", ".3f"),
                    ("positive_rate", "positives", ".3f"), ("train_s", "train s", ".0f")],
        "fig1": [("images", "images", ".0f"), ("f_pos", "f(z+)", ".2f"),
                 ("f_neg", "f(z-)", ".2f"), ("mmd_base", "MMD^2 posterior-base", ".4f"),
                 ("mmd_ebm", "MMD^2 posterior-EBM", ".4f")],
    }  # fmt: skip
    lines = []
    groups = _groups(rows)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for part in PARTS:
            keys = [k for k in groups if k[0] == dataset and k[1] == part]
            if not keys:
                continue
            seeds = sorted({r["seed"] for k in keys for r in groups[k]})
            lines.append(f"\n{dataset}, {part} (seeds {','.join(map(str, seeds))}; "
                         "mean +- std over seeds)\n")  # fmt: skip
            # a column no row of the table has (e.g. Inception not computed) is left out
            shown = [
                c for c in cols[part] if any(_finite(r.get(c[0])) for k in keys for r in groups[k])
            ]
            head = ["model", "n"] + [c[1] for c in shown]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            for key in keys:
                rs = groups[key]
                div = sum("diverged" in r for r in rs)
                cells = [key[2] + (f" ({div} diverged)" if div else ""), str(len(rs) - div)]
                cells += [_ms([r.get(c) for r in rs], f) for c, _, f in shown]
                lines.append("| " + " | ".join(cells) + " |")
            if part in ("main", "scale"):
                lines += _paired(groups, dataset, part)
    return "\n".join(lines)


def _paired(groups: dict[tuple, list[dict]], dataset: str, part: str = "main") -> list[str]:
    r"""Paired differences, same seed. ``main``: each EBM model minus model (a). ``scale``: each
    plateau-trained model minus :data:`PLATEAU_EBM`, the two-stage EBM prior on the
    plateau-trained 1x generator, and each fixed-epoch size minus the ``main`` table's (c), the
    two-stage EBM prior on the 1x generator trained as long (claim 2: positive FID/KID and
    negative nats favour the EBM prior)."""

    if part == "main":
        title = (
            f"\n{dataset}, main: paired difference to (a), same seed (mean +- std over "
            "seeds [95% t interval] (seeds with a positive difference); negative FID/KID and "
            "positive nats favour the EBM)\n"
        )
        return _paired_block(groups, (dataset, "main", "a Gaussian prior"), "a", title,
                             lambda key: key[1] == "main")  # fmt: skip
    claim2 = (" (mean +- std over seeds [95% t interval] (seeds with a positive difference); "
              "positive FID/KID and negative nats favour the EBM prior)\n")  # fmt: skip
    plateau = _paired_block(
        groups, (dataset, "scale", PLATEAU_EBM), "c (1x, EBM)",
        f"\n{dataset}, scale to plateau: paired difference to the two-stage EBM prior on the "
        "1x generator, same seed" + claim2,
        lambda key: key[1] == "scale" and key[2].endswith("to plateau"),
    )  # fmt: skip
    fixed = _paired_block(
        groups, (dataset, "main", "c two-stage EBM prior"), "c (main)",
        f"\n{dataset}, scale: paired difference to the main table's two-stage EBM prior (c), "
        "the same seed and epochs" + claim2,
        lambda key: key[1] == "scale" and not key[2].endswith("to plateau"),
    )  # fmt: skip
    return plateau + fixed


def _paired_block(groups: dict[tuple, list[dict]], ref_key: tuple, label: str, title: str,
                  keep) -> list[str]:  # fmt: skip
    r"""One paired table: every group of ``ref_key``'s dataset that ``keep(key)`` accepts,
    minus the ``ref_key`` row of the same seed; rows without a reference seed or diverged are
    left out, and so is a table with no row."""

    ref = {r["seed"]: r for r in groups.get(ref_key, [])}
    cols = [("fid_inf_inception", "FID-inf Inception", ".1f"),
            ("kid_inception", "KID Inception", ".4f"), ("fid_inf_cls", "FID-inf cls", ".2f"),
            ("kid_cls", "KID cls", ".1f"), ("elbo", "test ELBO", ".2f"),
            ("iw", "log p(x) IW", ".2f")]  # fmt: skip
    cols = [c for c in cols if any(_finite(r.get(c[0])) for r in ref.values())]
    lines = []
    for key, rs in groups.items():
        if key[0] != ref_key[0] or key == ref_key or not keep(key):
            continue
        rs = [r for r in rs if r["seed"] in ref and "diverged" not in r]
        if not rs:
            continue
        if not lines:
            lines += [title, "| model | n | " + " | ".join(c[1] for c in cols) + " |",
                      "|" + "|".join("---" for _ in range(len(cols) + 2)) + "|"]  # fmt: skip
        cells = [f"{key[2]} - {label}", str(len(rs))]
        for c, _, f in cols:
            d = [r[c] - ref[r["seed"]][c] for r in rs if r.get(c) is not None
                 and ref[r["seed"]].get(c) is not None]  # fmt: skip
            if len(d) >= 2:
                m, sd, lo, hi = paired_interval(d)
                lo, hi = format(lo, f), format(hi, f)
                up = sum(x > 0 for x in d)
                cells.append(f"{format(m, f)} +- {format(sd, f)} [{lo}, {hi}] ({up}/{len(d)} > 0)")
            else:
                cells.append(_ms(d, f) if d else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def report(out: str) -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "results_*.json"))):
        with open(path) as f:
            rows += json.load(f)["rows"]
    text = tables(rows)
    print(text)
    return text


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        return {"tables": report(args.out)}
    t0 = time.time()
    ctx = Context(args)
    tag = "tiny_" if args.tiny else ""
    name = f"results_{tag}{args.dataset}_{'-'.join(args.parts)}"
    _PARTIAL[:] = [os.path.join(args.out, name + ".partial.jsonl")]
    results: list[dict] = []
    cache: dict = {}
    for part in PARTS:  # fixed order: main before nef reuses its priors
        if part in args.parts:
            print(f"[{args.dataset}] part {part}", flush=True)
            RUNNERS[part](ctx, results, cache)
    for r in results:
        r["dataset"] = args.dataset
    wall = time.time() - t0
    out = {
        "dataset": args.dataset,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "settings": {k: v for k, v in vars(args).items() if k not in ("report",)},
        "classifier_accuracy": ctx.classifier_accuracy,
        "wall_s": wall,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": [{k: _clean(v) for k, v in r.items()} for r in results],
    }
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(tables(results))
    print(f"\nwall time {wall:.0f} s; results in {path}")
    return out


if __name__ == "__main__":
    main()
