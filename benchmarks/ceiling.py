r"""How far is the two-stage fit from its ceiling? The KL gap a prior on a frozen VAE can close.

On a frozen backbone with aggregate posterior :math:`q_{agg}(z) = \mathbb{E}_x q(z \mid x)`, a
prior :math:`p_b(z) e^{f(z)} / Z` raises the average ELBO by exactly

.. math:: G(f) = \mathbb{E}_{q_{agg}}[f] - \log \mathbb{E}_{p_b}[e^{f}] \le
          \mathrm{KL}(q_{agg} \,\|\, p_b),

the Donsker-Varadhan bound, with equality at :math:`f = \log q_{agg} / p_b`. Two-stage fitting
(:class:`ebm_prior.Trainer`, ``regime="two_stage"``) follows the gradient of :math:`G`, so
:math:`G` is its progress and the KL its ceiling. This benchmark, on the ``gaussian_vae``
backbone of ``claim1.py`` (trained first, ``--backbone-epochs``):

* **ceiling**: the same energy network trained as a classifier (logistic loss, posterior
  samples of the training images against base-prior samples, the noise-contrastive estimate of
  the log-ratio), then :math:`G` of its logit on held-out posterior samples: a lower bound on
  :math:`\mathrm{KL}(q_{agg} \| p_b)` reached by this architecture without Langevin chains;
* **curve**: the Langevin two-stage fit, every ``--eval-every`` epochs: :math:`G` on held-out
  posterior samples (the test images), with :math:`\log Z` by
  :func:`ebm_prior.log_partition` (``method="auto"``: IS, or AIS below 100 effective samples;
  its ESS and standard error are recorded), the held-out :math:`f(z^+) - f(z^-)` (negatives by
  the training chain), and KID (:math:`\times 10^3`, classifier features) of decoded samples;
* repeated for every energy width of ``--nefs`` (claim 3 at convergence);
* ``--mala`` (Metropolis-adjusted negatives) or a ``--langevin-steps`` / ``--step-size`` other
  than the defaults make a *sampler variant*: its fits have their own checkpoints and rows (the
  rows' ``sampler``), its backbone, held-out samples and ceiling are the default fit's, and the
  report pairs it with the default fit of the same width and seed (is the gap the sampler's?).

Rows go to ``<out>/ceiling.jsonl`` as they are measured; the fits train through checkpoints (a
stopped run resumes, a larger ``--epochs`` continues). ``--report`` prints the table and draws
``ceiling.png``::

    python benchmarks/ceiling.py --seeds 0 --nefs 10,20,50,100 --epochs 40 --threads 1
    python benchmarks/ceiling.py --seeds 0 --nefs 100 --epochs 40 --mala --threads 1
    python benchmarks/ceiling.py --report --out runs/ceiling
    python benchmarks/ceiling.py --tiny --out /some/dir       # smoke run (tests)
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ebm_prior import EpsLangevin, JointEBMPrior, Trainer, log_partition

if __package__:  # imported as benchmarks.ceiling
    from . import claim1, metrics
else:
    import claim1
    import metrics


#: The negatives' chain of the claim-1 settings: steps and step size.
DEFAULT_CHAIN = (60, 0.4)
#: Its label: rows without a ``sampler`` (and every ceiling row) belong to it.
DEFAULT_SAMPLER = "ula"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=claim1.DATASETS)
    p.add_argument("--seeds", default="0")
    p.add_argument("--nefs", default="10,20,50,100", help="energy widths")
    p.add_argument("--out", default="runs/ceiling")
    p.add_argument("--backbone-epochs", type=int, default=10, help="gaussian_vae epochs")
    p.add_argument("--epochs", type=int, default=40, help="two-stage epochs")
    p.add_argument("--eval-every", type=int, default=2, help="epochs between evaluations")
    p.add_argument("--lr", type=float, default=1e-4, help="two-stage energy learning rate")
    p.add_argument("--langevin-steps", type=int, default=DEFAULT_CHAIN[0])
    p.add_argument("--step-size", type=float, default=DEFAULT_CHAIN[1])
    p.add_argument("--mala", action="store_true", help="Metropolis-adjusted negatives")
    p.add_argument("--classifier-epochs", type=int, default=20)
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=2000, help="held-out posterior samples")
    p.add_argument("--samples", type=int, default=1000, help="decoded samples for KID")
    p.add_argument("--log-z-samples", type=int, default=50_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent-dims", default="16,32")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--threads", type=int)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny budget (checks the pipeline only)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.nefs = [int(s) for s in args.nefs.split(",")]
    args.latent_dims = tuple(int(s) for s in args.latent_dims.split(","))
    args.train_size, args.vae_lr = None, 1e-3
    # the label of the chain asked for (--tiny shortens every chain, the default's too)
    args.sampler = sampler_label(args.langevin_steps, args.step_size, args.mala)
    if args.tiny:
        args.dataset, args.backbone_epochs, args.epochs, args.eval_every = "digits", 1, 2, 1
        args.nefs = args.nefs if args.nefs != [10, 20, 50, 100] else [8, 16]
        args.classifier_epochs, args.n_eval, args.samples, args.log_z_samples = 1, 64, 64, 500
        args.langevin_steps, args.hidden, args.checkpoint_every = 3, 32, 1
    return args


def sampler_label(steps: int, step_size: float, mala: bool) -> str:
    r""":data:`DEFAULT_SAMPLER` for the default chain (:data:`DEFAULT_CHAIN`, unadjusted), else
    e.g. ``"mala"``, ``"ula 200x0.4"``, ``"mala 200x0.2"``."""

    name = "mala" if mala else "ula"
    if (steps, step_size) == DEFAULT_CHAIN:
        return name
    return f"{name} {steps}x{step_size:g}"


def _width(row: dict) -> tuple[int, str]:
    return row["nef"], row.get("sampler", DEFAULT_SAMPLER)


def _order(width: tuple[int, str]) -> tuple[int, bool, str]:
    return width[0], width[1] != DEFAULT_SAMPLER, width[1]  # the default sampler first


def _width_name(width: tuple[int, str]) -> str:
    nef, sampler = width
    return str(nef) if sampler == DEFAULT_SAMPLER else f"{nef} {sampler}"


@torch.no_grad()
def posterior(vae, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = [vae.posterior(c).z for c in x.split(1000)]
    return [torch.cat(z) for z in zip(*parts)]


def gain(f, vae, z_test: list[torch.Tensor], args, seed: int) -> dict[str, float]:
    r""":math:`G = \overline{f(z^+_{test})} - \log Z` with the diagnostics of :math:`\log Z`."""

    with torch.no_grad():
        f_pos = f(z_test).mean().item()
    lz = log_partition(f, vae, args.log_z_samples, generator=torch.Generator().manual_seed(seed),
                       method="auto", keep_log_weights=False)  # fmt: skip
    return {"gain": f_pos - lz.value, "f_pos": f_pos, "log_z": lz.value,
            "log_z_se": lz.std_error, "log_z_ess": lz.ess, "log_z_method": lz.method}  # fmt: skip


def classifier_ceiling(vae, x: torch.Tensor, z_test, nef: int, args, seed: int) -> dict:
    r"""Trains the energy network as a logistic classifier of posterior against base-prior
    samples (fresh draws every batch, balanced) and returns :func:`gain` of its logit."""

    torch.manual_seed(seed + 50_000)
    net = JointEBMPrior(vae.latent_shapes, nef=nef)
    bias = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([*net.parameters(), bias], lr=args.classifier_lr)
    gen = torch.Generator().manual_seed(seed + 60_000)
    t0 = time.time()
    for _ in range(args.classifier_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            with torch.no_grad():
                z_pos = vae.posterior(x[idx]).z
                z_neg = vae.eps_to_z(vae.sample_eps(len(idx), generator=gen))
            logits = torch.cat([net(z_pos), net(z_neg)]) + bias
            labels = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError("the classifier's loss is not finite")
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        z_neg = vae.eps_to_z(vae.sample_eps(len(z_test[0]), generator=gen))
        acc = 0.5 * ((net(z_test) + bias > 0).double().mean()
                     + (net(z_neg) + bias < 0).double().mean()).item()  # fmt: skip
    return {**gain(net, vae, z_test, args, seed), "accuracy": acc, "train_s": time.time() - t0}


def run(args: argparse.Namespace) -> list[dict]:
    os.makedirs(args.out, exist_ok=True)
    data = claim1.load_data(args)
    x, test = data["train"] * 2 - 1, data["test"] * 2 - 1
    classifier = metrics.ClassifierFeatures(
        data["train"], data["train_y"], os.path.join(args.out, f"classifier_{args.dataset}"
                                                               ".safetensors"),
        epochs=1 if args.tiny else 5,
    )  # fmt: skip
    real = classifier(data["test"][: args.samples])
    path = os.path.join(args.out, "ceiling.jsonl")
    done = {(r["kind"], _width(r), r["seed"], r["epoch"]) for r in claim1.read_rows(path)}
    variant = "" if args.sampler == DEFAULT_SAMPLER else "_" + args.sampler.replace(" ", "_")
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        claim1.append_row(path, row)
        shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
        print(f"  {row['kind']} nef {_width_name(_width(row))} seed {row['seed']} "
              f"epoch {row['epoch']}: "
              f"{shown}", flush=True)  # fmt: skip

    def kid(vae, prior, seed: int) -> float:
        g = torch.Generator().manual_seed(seed + 10_000)
        eps = vae.sample_eps(args.samples, generator=g)
        if prior is not None:
            eps = EpsLangevin(prior, vae, generator=g, trace=False, **prior.sampler_config)(eps).x
        with torch.no_grad():
            img = ((vae.decode(vae.eps_to_z(eps)) + 1) / 2).clamp(0, 1)
        return 1e3 * metrics.kernel_inception_distance(classifier(img), real, seed=seed)

    for seed in args.seeds:
        backbone_args = argparse.Namespace(**{**vars(args), "epochs": args.backbone_epochs})
        vae, _, stats = claim1.train("gaussian_vae", seed, x, backbone_args,
                                     os.path.join(args.out, "models"))  # fmt: skip
        vae.requires_grad_(False)
        z_test = posterior(vae, test[: args.n_eval], seed + 70_000)
        if ("gaussian", (0, DEFAULT_SAMPLER), seed, 0) not in done:
            record({"kind": "gaussian", "nef": 0, "seed": seed, "epoch": 0, "gain": 0.0,
                    "kid_cls": kid(vae, None, seed),
                    "backbone_train_s": stats["train_s"]})  # fmt: skip
        for nef in args.nefs:
            if ("ceiling", (nef, DEFAULT_SAMPLER), seed, 0) not in done:
                record({"kind": "ceiling", "nef": nef, "seed": seed, "epoch": 0,
                        **classifier_ceiling(vae, x, z_test, nef, args, seed)})  # fmt: skip
            torch.manual_seed(seed + 1_000)
            prior = JointEBMPrior(
                vae.latent_shapes, nef=nef,
                sampler_config={"steps": args.langevin_steps, "step_size": args.step_size,
                                "mala": args.mala},
            )  # fmt: skip
            trainer = Trainer(
                prior, vae, x, regime="two_stage", batch_size=args.batch_size, lr=args.lr,
                langevin_steps=args.langevin_steps, step_size=args.step_size, mala=args.mala,
                seed=seed,
                checkpoint_dir=os.path.join(args.out, "models",
                                            f"two_stage_nef{nef}_seed{seed}{variant}"),
                checkpoint_every=args.checkpoint_every, progress=args.progress,
            )  # fmt: skip
            for epoch in range(args.eval_every, args.epochs + 1, args.eval_every):
                trainer.fit(epoch * trainer.steps_per_epoch)
                if ("two_stage", (nef, args.sampler), seed, epoch) in done:
                    continue
                prior.eval()
                row = {"kind": "two_stage", "nef": nef, "seed": seed, "epoch": epoch,
                       "sampler": args.sampler,
                       **gain(prior, vae, z_test, args, seed)}  # fmt: skip
                g = torch.Generator().manual_seed(seed + 80_000)
                eps = vae.sample_eps(len(z_test[0]), generator=g)
                chain = EpsLangevin(prior, vae, generator=g, trace=False, **prior.sampler_config)
                out = chain(eps)
                with torch.no_grad():
                    row["f_gap"] = row["f_pos"] - prior(out.z).mean().item()
                if out.acceptance is not None:  # MALA: the held-out chain's mean acceptance
                    row["acceptance"] = out.acceptance.mean().item()
                row["kid_cls"] = kid(vae, prior, seed)
                row["train_s"] = float(sum(h["seconds"] for h in trainer.history))
                record(row)
    return rows


def report(out: str) -> str:
    path = os.path.join(out, "ceiling.jsonl")
    rows = claim1.read_rows(path)
    if not rows:
        raise SystemExit(f"no rows in {path}: run the benchmark with --out {out} first")
    lines = ["| nef | seed | ceiling G (classifier) | accuracy | best two-stage G | at epoch | "
             "last epoch | last G | log Z (method, ESS) | f(z+) - f(z-) | KID cls x1e3 | "
             "MALA acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed in sorted({r["seed"] for r in rows}):
        base = [r for r in rows if r["kind"] == "gaussian" and r["seed"] == seed]
        if base:
            lines.append(f"| Gaussian | {seed} | 0 | - | - | - | - | - | - | - | "
                         f"{base[0]['kid_cls']:.2f} | - |")  # fmt: skip
        widths = {_width(r) for r in rows if r["kind"] in ("two_stage", "ceiling")}
        for width in sorted(widths, key=_order):
            nef = _width_name(width)
            # a sampler variant's ceiling is its width's (the same network)
            ceil = [r for r in rows if r["kind"] == "ceiling" and r["nef"] == width[0]
                    and r["seed"] == seed]  # fmt: skip
            curve = sorted((r for r in rows if r["kind"] == "two_stage" and _width(r) == width
                            and r["seed"] == seed), key=lambda r: r["epoch"])  # fmt: skip
            if not curve and (not ceil or width[1] != DEFAULT_SAMPLER):
                continue
            c = f"{ceil[0]['gain']:.3f}" if ceil else "-"
            a = f"{ceil[0]['accuracy']:.3f}" if ceil else "-"
            if curve:
                best, last = max(curve, key=lambda r: r["gain"]), curve[-1]
                acc = f"{last['acceptance']:.3f}" if "acceptance" in last else "-"
                lines.append(
                    f"| {nef} | {seed} | {c} | {a} | {best['gain']:.3f} | {best['epoch']} | "
                    f"{last['epoch']} | {last['gain']:.3f} | {last['log_z']:.3f} "
                    f"({last['log_z_method']}, {last['log_z_ess']:.0f}) | {last['f_gap']:.3f} | "
                    f"{last['kid_cls']:.2f} | {acc} |"
                )
            else:
                lines.append(f"| {nef} | {seed} | {c} | {a} | - | - | - | - | - | - | - | - |")
    text = "\n".join(lines + _across_seeds(rows))
    with open(os.path.join(out, "ceiling.md"), "w") as f:
        f.write(text + "\n")
    _figure(rows, os.path.join(out, "ceiling.png"))
    print(text)
    return text


def _across_seeds(rows: list[dict]) -> list[str]:
    r"""Lines of the across-seed tables at the last epoch ``E`` any fit reached: per width, the
    ceiling, the two-stage :math:`G` at ``E``, their ratio and gap (mean +- std over seeds [95% t
    interval]); then the paired difference between every two widths, the same seed (the same
    backbone and held-out posterior samples). A sampler variant counts as a width of its own,
    with its width's ceiling. Seeds whose fit has not reached ``E`` are left out; nothing is
    printed with fewer than two seeds."""

    fits = [r for r in rows if r["kind"] == "two_stage"]
    if not fits:
        return []
    last = max(r["epoch"] for r in fits)
    fit = {(_width(r), r["seed"]): r["gain"] for r in fits if r["epoch"] == last}
    # a sampler variant's ceiling is its width's (the same network, classifier-trained)
    by_nef = {(r["nef"], r["seed"]): r["gain"] for r in rows if r["kind"] == "ceiling"}
    ceil = {(w, s): by_nef[w[0], s] for w, s in fit if (w[0], s) in by_nef}
    base = {r["seed"]: r["kid_cls"] for r in rows if r["kind"] == "gaussian"}
    # KID of the fit at ``last`` as a share of the same seed's Gaussian-prior KID
    kid = {(_width(r), r["seed"]): r["kid_cls"] / base[r["seed"]] - 1
           for r in fits if r["epoch"] == last and r["seed"] in base}  # fmt: skip
    nefs = sorted({n for n, _ in fit}, key=_order)
    seeds = {n: sorted(s for m, s in fit if m == n and (n, s) in ceil) for n in nefs}
    if max(len(s) for s in seeds.values()) < 2:
        return []

    def cell(values: list[float]) -> str:
        m, sd, lo, hi = claim1.paired_interval(values)
        return f"{m:.3f} +- {sd:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"\nAcross seeds, two-stage G at epoch {last} (mean +- std [95% t interval])\n",
             "| nef | seeds | ceiling G | two-stage G | G / ceiling | ceiling - G | "
             "KID cls / Gaussian's - 1 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    ratio = {k: fit[k] / ceil[k] for k in fit if k in ceil}
    for n in nefs:
        c, g = [ceil[n, s] for s in seeds[n]], [fit[n, s] for s in seeds[n]]
        k = [kid[n, s] for s in seeds[n] if (n, s) in kid]
        lines.append(f"| {_width_name(n)} | {len(c)} | {cell(c)} | {cell(g)} | "
                     f"{cell([ratio[n, s] for s in seeds[n]])} | "
                     f"{cell([a - b for a, b in zip(c, g)])} | "
                     f"{cell(k) if k else '-'} |")  # fmt: skip
    lines += ["\nPaired difference between widths (and sampler variants), the same seed (the "
              "second minus the first)\n",
              "| widths | seeds | two-stage G | ceiling G | second higher in | G / ceiling | "
              "KID cls / Gaussian's |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for a, b in itertools.combinations(nefs, 2):
        common = sorted(set(seeds[a]) & set(seeds[b]))
        if len(common) < 2:
            continue
        d = [fit[b, s] - fit[a, s] for s in common]
        dc = [ceil[b, s] - ceil[a, s] for s in common]
        dr = [ratio[b, s] - ratio[a, s] for s in common]
        dk = [kid[b, s] - kid[a, s] for s in common if (a, s) in kid and (b, s) in kid]
        lines.append(f"| {_width_name(b)} - {_width_name(a)} | {len(common)} | {cell(d)} | "
                     f"{cell(dc)} | "
                     f"{sum(x > 0 for x in d)}/{len(d)} | {cell(dr)} | "
                     f"{cell(dk) if dk else '-'} |")  # fmt: skip
    return lines


def _figure(rows: list[dict], path: str) -> None:
    r"""``G`` against epochs per width: each seed's curve (thin), their mean up to the last
    epoch every seed reached (thick, the number of seeds in the legend), and the classifier
    ceiling's mean over seeds (dashed, shaded over its range)."""

    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    widths = {_width(r) for r in rows if r["kind"] in ("two_stage", "ceiling")}
    for i, width in enumerate(sorted(widths, key=_order)):
        color, nef = f"C{i}", _width_name(width)
        curves = {}
        for r in rows:
            if r["kind"] == "two_stage" and _width(r) == width:
                curves.setdefault(r["seed"], {})[r["epoch"]] = r["gain"]
        for curve in curves.values():
            epochs = sorted(curve)
            ax.plot(epochs, [curve[e] for e in epochs], color=color, lw=0.7, alpha=0.5)
        epochs = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
        if epochs:  # the mean where every seed has a point
            mean = [sum(c[e] for c in curves.values()) / len(curves) for e in epochs]
            label = f"two-stage, nef {nef} ({len(curves)} seeds)"
            ax.plot(epochs, mean, color=color, lw=2, label=label)
        ceil = [r["gain"] for r in rows if r["kind"] == "ceiling" and _width(r) == width]
        if ceil:
            ax.axhline(sum(ceil) / len(ceil), color=color, ls="--",
                       label=f"classifier ceiling, nef {nef} ({len(ceil)} seeds)")  # fmt: skip
            ax.axhspan(min(ceil), max(ceil), color=color, alpha=0.1, lw=0)
    ax.set(xlabel="two-stage epochs", ylabel="G = E_q[f] - log Z (nats)",
           title="ELBO gain of the prior on a frozen VAE")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


main = claim1.main_of(parse_args, run, report)


if __name__ == "__main__":
    main()
