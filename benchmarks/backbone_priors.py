r"""Gaussian vs EBM prior on a trained BIVA, hvae-oodd or NVAE checkpoint, paired over prior seeds.

The backbone is one checkpoint trained with its own code; the priors are fitted on it by the
example scripts (``ebm-prior finetune-biva`` / ``finetune-oodd`` / ``finetune-nvae``), one per
seed. For each prior (seed :math:`s`) this measures, against the *same* backbone with its own
Gaussian prior:

- **test log-likelihood in nats**: the importance-weighted estimate with :math:`K` posterior
  draws, the same draws for both priors (the EBM prior's weights are the Gaussian weights times
  :math:`e^{f_a(z)}`), the EBM prior normalised by :math:`\log \hat Z` from
  :func:`ebm_prior.log_partition` (``method="auto"``: AIS when the ESS of plain importance
  sampling is low); the Gaussian row is the IWAE bound, the EBM row an estimate with the
  standard error of :math:`\log \hat Z`;
- **samples**: ``--samples`` images from the same base draws :math:`\epsilon_0` (seed
  :math:`s`), decoded directly (Gaussian prior) and after the prior's recorded eps-space
  Langevin chain (EBM prior); KID and FID at ``--fid-ns`` extrapolated to FID-infinity, in the
  features of a small classifier trained on the grey training images of ``--images`` (and, with
  ``--inception``, Inception-v3's pool3), against the grey test images; and the classifier's
  view of the samples (:func:`metrics.class_summary`): the total variation distance of the
  predicted-class histogram to the test set's class proportions, and the mean top-class
  probability.

Rows go to ``<out>/rows.jsonl`` as each seed finishes (a rerun skips the seeds already there);
``<out>/results.md`` has the per-seed table and the paired differences (EBM minus Gaussian of
the same seed: mean, s.d., 95% t interval)::

    python benchmarks/backbone_priors.py --backbone biva \
        --checkpoint runs/biva-train/binmnist-biva-seed42 \
        --test-file data/biva-mnist/bin-mnist/test.npy --images mnist \
        --priors runs/biva-prior/seed0/ebm-prior,runs/biva-prior/seed1/ebm-prior,... \
        --out runs/biva-eval

Priors fitted with ``finetune-nvae --joint-prior`` each come with their own rewritten NVAE
(``OUT/nvae/checkpoint.pt``): give ``--checkpoint`` one per prior (comma-separated) and
``--baseline`` the ``--out`` of the run on the original checkpoint. The rows are then also
compared with the original Gaussian prior of the same seed (same test images, posterior and base
draws, and the baseline's classifier); a baseline scored with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence

import torch

from ebm_prior import Backbone, EpsLangevin, JointEBMPrior, load_prior, log_partition
from ebm_prior.apps.compare_priors import paired
from ebm_prior.apps.data import load_images, load_labels
from ebm_prior.apps.prior_figures import load_backbone, test_images, to_unit
from ebm_prior.hub import atomic_write

if __package__:  # imported as benchmarks.backbone_priors
    from . import metrics
else:
    import metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", choices=("biva", "oodd", "nvae"), required=True)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="session dir / checkpoint of the backbone; or comma-separated, one per prior (the "
        "checkpoints finetune-nvae --joint-prior rewrites)",
    )
    p.add_argument("--nvae-root", default=None, help="NVAE clone (default: NVAE_ROOT)")
    p.add_argument(
        "--test-file",
        default=None,
        help="test data in the model's range (.npy/.pt); default: the test split of --images "
        "brought to the model's input as NVAE's loaders do (ebm_prior.apps.images.fit_to)",
    )
    p.add_argument(
        "--images",
        choices=("mnist", "fashion-mnist"),
        default="mnist",
        help="grey images: the classifier's training set and the FID/KID reference",
    )
    p.add_argument("--classifier-size", type=int, default=60_000, help="its training images")
    p.add_argument("--priors", required=True, help="comma-separated prior folders, one per seed")
    p.add_argument("--seeds", default=None, help="their seeds (default 0,1,2,...)")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--iw-samples", type=int, default=20, help="K of log p(x)")
    p.add_argument("--log-z-samples", type=int, default=20_000)
    p.add_argument("--samples", type=int, default=1000, help="generated images per prior")
    p.add_argument("--steps", type=int, default=None, help="Langevin steps (default: the prior's)")
    p.add_argument("--fid-ns", default="250,500,1000")
    p.add_argument("--fid-draws", type=int, default=5)
    p.add_argument("--inception", action="store_true", help="also Inception-v3 KID / FID")
    p.add_argument(
        "--baseline",
        default=None,
        help="--out of this benchmark on the original checkpoint, same seeds and settings: also "
        "report both priors of this run against its Gaussian prior (and use its classifier)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.priors = [d for d in args.priors.split(",") if d]
    args.seeds = (
        [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(len(args.priors)))
    )
    if len(args.seeds) != len(args.priors):
        p.error(f"{len(args.priors)} priors but {len(args.seeds)} seeds")
    args.checkpoints = [c for c in args.checkpoint.split(",") if c]
    if len(args.checkpoints) == 1:
        args.checkpoints *= len(args.priors)
    if len(args.checkpoints) != len(args.priors):
        p.error(f"{len(args.priors)} priors but {len(args.checkpoints)} checkpoints")
    args.fid_ns = [int(n) for n in args.fid_ns.split(",")]
    if max(args.fid_ns) > args.samples:
        p.error(f"--fid-ns up to {max(args.fid_ns)} needs --samples >= that")
    return args


@torch.no_grad()
def paired_log_likelihood(
    backbone: Backbone, prior: JointEBMPrior, x: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-image :math:`\log \frac1K \sum_k w_k` for the Gaussian prior and
    :math:`\log \frac1K \sum_k w_k e^{f_a(z_k)}` for the EBM prior (before :math:`-\log Z`),
    on the same posterior draws :math:`z_k \sim q(z|x)`; shapes :math:`(N,)` each."""

    gauss, ebm = [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for chunk in x.split(250):
            lw, f = [], []
            for _ in range(k):
                z, log_q = backbone.posterior(chunk)
                lw.append(backbone.log_likelihood(chunk, z) + backbone.log_prior(z) - log_q)
                f.append(prior(z))
            lw, f = torch.stack(lw).double(), torch.stack(f).double()
            gauss.append(torch.logsumexp(lw, 0) - math.log(k))
            ebm.append(torch.logsumexp(lw + f, 0) - math.log(k))
    return torch.cat(gauss), torch.cat(ebm)


def generate(
    backbone: Backbone, prior: JointEBMPrior, n: int, seed: int, steps: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``n`` images from the Gaussian prior and from the EBM prior, the same base draws."""

    gen = torch.Generator().manual_seed(seed)
    eps0 = backbone.sample_eps(n, generator=gen)
    options = dict(prior.sampler_config)
    if steps is not None:
        options["steps"] = steps
    sampler = EpsLangevin(prior, backbone, generator=gen, trace=False, **options)
    gauss, ebm = [], []
    for i in range(0, n, 100):
        e = [g[i : i + 100] for g in eps0]
        out = sampler(e)
        with torch.no_grad():
            gauss.append(to_unit(backbone, backbone.decode(backbone.eps_to_z(e))))
            ebm.append(to_unit(backbone, backbone.decode(out.z)))
    return torch.cat(gauss), torch.cat(ebm)


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    r"""Centre-crops images :math:`(N, C, H, W)` to ``size`` :math:`(h, w)`: a 32x32 NVAE MNIST
    model's images (28x28 padded by 2 pixels, as NVAE's loaders pad them) back to 28x28."""

    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if h < th or w < tw or (h - th) % 2 or (w - tw) % 2:
        raise ValueError(f"generated images are {h}x{w}; the reference images are {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def sample_scores(fake: torch.Tensor, real_feats, features, args, seed: int, tag: str) -> dict:
    feats = features(fake)
    out = {f"kid_{tag}": metrics.kernel_inception_distance(feats, real_feats, seed=seed)}
    fid = metrics.fid_infinity(feats, real_feats, args.fid_ns, args.fid_draws, seed)
    out.update({f"{k}_{tag}": v for k, v in fid.items()})
    return out


def evaluate(backbone, prior_dir: str, seed: int, test, ctx: dict, args) -> dict:
    t0 = time.time()
    prior = load_prior(prior_dir, backbone=backbone).eval().requires_grad_(False)
    lz = log_partition(prior, backbone, args.log_z_samples, batch_size=2_000, method="auto",
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    g, e = paired_log_likelihood(backbone, prior, test, args.iw_samples, seed + 1)
    e = e - lz.value
    row = {
        "seed": seed, "prior": prior_dir, "settings": settings(args), "log_z": lz.value,
        "log_z_se": lz.std_error, "ess": lz.ess, "method": lz.method,
        "ll_gaussian": g.mean().item(), "ll_ebm": e.mean().item(),
        "ll_per_image_sd": (e - g).std().item(),
    }  # fmt: skip
    t1 = time.time()
    images = generate(backbone, prior, args.samples, seed, args.steps)
    size = ctx["image_size"]
    fake = dict(zip(("gaussian", "ebm"), (crop_to(x, size) for x in images)))
    row["sample_s"] = time.time() - t1
    for name, x in fake.items():
        for tag, (feat, real) in ctx["features"].items():
            row.update({f"{k}_{name}": v for k, v in
                        sample_scores(x, real, feat, args, seed, tag).items()})  # fmt: skip
        classifier = ctx["features"]["cls"][0]
        summary = metrics.class_summary(classifier.probabilities(x), ctx["labels"])
        row.update({f"{k}_{name}": v for k, v in summary.items()})
    row["seconds"] = time.time() - t0
    return row


METRICS = (  # key, label, higher is better
    ("ll", "log p(x) nats", True),
    ("kid_cls", "KID cls", False),
    ("fid_inf_cls", "FID-inf cls", False),
    ("kid_inc", "KID Inception", False),
    ("fid_inf_inc", "FID-inf Inception", False),
    ("class_tv", "class TV", False),
    ("top_prob", "top-class prob", True),
)


def _key(metric: str, prior: str) -> str:
    return f"{metric}_{prior}"


def _favours(difference: float, higher: bool) -> bool:
    r"""Whether a paired difference favours the prior it is counted for; a tie (up to rounding,
    e.g. two class histograms' TV distances of 0.196 that differ by 1e-17) favours neither."""

    if abs(difference) <= 1e-12:
        return False
    return difference > 0 if higher else difference < 0


def _summary(d: list[float], higher: bool) -> tuple[str, str, str, str]:
    r"""Paired differences over seeds, formatted: mean, s.d., 95% t interval and the seeds
    favouring the prior (``k/n``); the s.d. and interval are ``-`` for a single seed."""

    mean, sd, lo, hi = paired(d)
    spread = (f"{sd:.3g}", f"[{lo:+.4g}, {hi:+.4g}]") if len(d) > 1 else ("-", "-")
    return f"{mean:+.4g}", *spread, f"{sum(_favours(v, higher) for v in d)}/{len(d)}"


def settings(args: argparse.Namespace) -> dict:
    r"""What makes two runs' rows of one seed paired: the same test images, posterior draws,
    base draws, chain and FID sample sizes."""

    return {
        "images": args.images, "test_file": args.test_file, "test_size": args.test_size,
        "iw_samples": args.iw_samples, "samples": args.samples, "steps": args.steps,
        "fid_ns": list(args.fid_ns), "fid_draws": args.fid_draws,
    }  # fmt: skip


def read_rows(out: str) -> list[dict]:
    r"""The rows already in ``<out>/rows.jsonl``, one per scored seed (none if it is absent)."""

    path = os.path.join(out, "rows.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_baseline(args: argparse.Namespace) -> dict[int, dict]:
    r"""The ``--baseline`` run's rows by seed; exits, before anything is computed, when a seed
    of this run is missing there or was scored with other settings (not paired)."""

    by_seed = {r["seed"]: r for r in read_rows(args.baseline)}
    missing = sorted(set(args.seeds) - set(by_seed))
    if missing:
        raise SystemExit(f"--baseline {args.baseline} has no row for seed(s) {missing}")
    mine = settings(args)
    for seed in args.seeds:
        theirs = by_seed[seed].get("settings")  # rows written before settings were recorded
        if theirs is not None and theirs != mine:
            raise SystemExit(
                f"seed {seed}: --baseline {args.baseline} was scored with {theirs}, this run "
                f"with {mine}; the rows are not paired"
            )
    return by_seed


def against_baseline(
    rows: list[dict], by_seed: dict[int, dict], args: argparse.Namespace
) -> list[str]:
    r"""Report lines: this run's Gaussian and EBM rows minus the baseline run's Gaussian row of
    the same seed (mean, s.d., 95% t interval over seeds, seeds better). After ``finetune-nvae
    --joint-prior`` this run's Gaussian prior is the fine-tuned :math:`p_b` and its EBM prior
    :math:`p_b e^{f_a} / Z`; the baseline's is the original prior."""

    pairs = [(r, by_seed[r["seed"]]) for r in rows]
    present = [m for m in METRICS if all(_key(m[0], "ebm") in r and _key(m[0], "gaussian")
                                         in b for r, b in pairs)]  # fmt: skip
    lines = ["", f"Against the baseline's Gaussian prior (`{args.baseline}`), same seed: this "
             "run's Gaussian prior and EBM prior minus it (mean ± s.d. [95% t interval], seeds "
             "better):", "", "| metric | better | baseline Gaussian | Gaussian minus baseline "
             "| EBM minus baseline |", "|---|---|---|---|---|"]  # fmt: skip
    for m, label, higher in present:
        ref = [b[_key(m, "gaussian")] for _, b in pairs]
        cells = [label, "higher" if higher else "lower", f"{sum(ref) / len(ref):.4g}"]
        for prior in ("gaussian", "ebm"):
            d = [r[_key(m, prior)] - b[_key(m, "gaussian")] for r, b in pairs]
            mean, sd, interval, wins = _summary(d, higher)
            cells.append(f"{mean} ± {sd} {interval}, {wins}" if len(d) > 1 else f"{mean}, {wins}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict], args: argparse.Namespace, base: dict[int, dict] | None = None) -> str:
    present = [m for m in METRICS if all(_key(m[0], "ebm") in r for r in rows)]
    head = ["seed", "log Z +- s.e. (method, ESS)"]
    for _, label, _ in present:
        head += [f"{label} Gaussian", f"{label} EBM"]
    lines = [
        f"{args.backbone} `{args.checkpoint}`, {args.test_size} test images (K = "
        f"{args.iw_samples}), {args.samples} samples per prior, FID at N = "
        f"{', '.join(map(str, args.fid_ns))} extrapolated",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r["seed"]), f"{r['log_z']:.3f} +- {r['log_z_se']:.3f} ({r['method']}, "
                 f"{r['ess']:,.0f})"]  # fmt: skip
        for m, _, _ in present:
            cells += [f"{r[_key(m, 'gaussian')]:.4g}", f"{r[_key(m, 'ebm')]:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired difference, EBM minus Gaussian of the same seed (mean, s.d., 95% t "
              "interval over seeds):", "", "| metric | better | mean | s.d. | 95% t interval | "
              "seeds favouring the EBM |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m, label, higher in present:
        d = [r[_key(m, "ebm")] - r[_key(m, "gaussian")] for r in rows]
        cells = [label, "higher" if higher else "lower", *_summary(d, higher)]
        lines.append("| " + " | ".join(cells) + " |")
    if base is not None:
        lines += against_baseline(rows, base, args)
    return "\n".join(lines) + "\n"


def context(args: argparse.Namespace) -> dict:
    r"""The reference side of the sample metrics: the classifier (trained once, cached in
    ``--out``), the features of the real test images in each feature space, and their labels."""

    n = args.classifier_size
    name = f"classifier_{args.images}_n{n}.safetensors"
    path = os.path.join(args.out, name)
    if args.baseline and os.path.exists(os.path.join(args.baseline, name)):
        path = os.path.join(args.baseline, name)  # the baseline's features, not a retrained twin
    classifier = metrics.ClassifierFeatures(
        load_images(args.images, "train")[:n], load_labels(args.images, "train")[:n], path
    )
    real = load_images(args.images, "test")
    features = {"cls": (classifier, classifier(real))}
    if args.inception:
        inc = metrics.InceptionFeatures()
        features["inc"] = (inc, inc(real[: max(args.fid_ns)]))
    return {
        "features": features,
        "image_size": tuple(real.shape[-2:]),
        "labels": load_labels(args.images, "test"),
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    rows = read_rows(args.out)
    base = check_baseline(args) if args.baseline else None
    done = {r["seed"] for r in rows}
    todo = [t for t in zip(args.seeds, args.priors, args.checkpoints) if t[0] not in done]
    if todo:  # the feature networks and the real images' features only when a seed is left
        ctx = context(args)
    loaded = None  # the checkpoint of the backbone in hand
    for seed, prior_dir, checkpoint in todo:
        if checkpoint != loaded:
            backbone = load_backbone(args.backbone, checkpoint, args.nvae_root)
            test = test_images(backbone, args.test_file, args.images, args.test_size)
            loaded = checkpoint
        row = evaluate(backbone, prior_dir, seed, test, ctx, args)
        rows.append(row)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("fid_")}), flush=True)
    rows.sort(key=lambda r: r["seed"])
    text = report(rows, args, base)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(os.path.join(args.out, "results.md"), write)
    print(text)
    return rows


if __name__ == "__main__":
    main()
