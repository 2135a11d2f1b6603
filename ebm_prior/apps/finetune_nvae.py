r"""Fit a joint EBM prior two-stage on a pretrained (frozen) NVAE, then sample from it.

    # one GPU, the authors' CIFAR-10 settings (20 Langevin steps in training, 40 at test)
    ebm-prior finetune-nvae --nvae-root NVAE --checkpoint cifar10/checkpoint.pt \
        --data cifar10 --download --out runs/nvae-cifar10 --steps 5000 --batch-size 64

    # several GPUs: the same global batch, split over the processes
    torchrun --nproc_per_node 2 examples/finetune_nvae.py ... --batch-size 64

    # an image folder or an .npz of images instead of a torchvision dataset
    ebm-prior finetune-nvae ... --data path/to/images/ (or images.npz)

The energy networks are the authors' NVAE ones (supplement Table 5: per group, 4x4 stride-2
convolutions with 64 channels down to 4x4, then ``Linear(200)`` layers). Training runs
:class:`ebm_prior.TwoStageTrainer`: the NVAE stays frozen in eval mode; with ``--joint-prior``
its prior cells (``dec_sampler``) are fine-tuned too (supplement Eq. 6). A checkpoint is written
atomically every ``--checkpoint-every`` steps to ``OUT/checkpoints/trainer.pt`` and the run
resumes from it when restarted with the same command (exactly: same prior, bit for bit).
With ``--joint-prior`` or ``--readjust-bn`` the NVAE itself changes: it is written to
``OUT/nvae/checkpoint.pt`` (``train.py`` layout) and the prior is bound to that file.

At the end rank 0 writes the prior (``OUT/ebm-prior``, ``save_pretrained`` format, with the
NVAE checkpoint's fingerprint and the test-time Langevin settings), ``samples.npz`` (uint8 array
``x``) and ``samples.png`` (the same starting noise through the NVAE prior and the EBM prior),
optionally the FID against the training images (``--fid-samples``: 8-bit images, the
Inception network of ``ebm-prior[fid]`` or torch-fidelity; ``ebm_prior.apps.fid``), and
pushes the prior with ``--push-to-hub REPO``. Step size ``s`` is the noise scale of
``eps += s^2/2 grad + s noise``; the authors' NVAE code's ``delta`` is ``s^2`` (docs/nvae.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ebm_prior import EpsLangevin, JointEBMPrior, TwoStageTrainer
from ebm_prior.adapters.nvae import NVAEBackbone, save_checkpoint
from ebm_prior.apps import fid as _fid
from ebm_prior.apps._common import (
    add_checkpoint_every,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.images import fit_to, image_source, load_images, save_grid, save_npz
from ebm_prior.hub import file_sha256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--nvae-root", default=None, help="clone of NVlabs/NVAE (default: NVAE_ROOT)")
    p.add_argument("--checkpoint", required=True, help="NVAE train.py checkpoint.pt")
    p.add_argument(
        "--data",
        type=image_source,
        required=True,
        help="cifar10, mnist, fashion-mnist, svhn, celeba, an image folder or .npz",
    )
    p.add_argument("--data-root", default="data", help="torchvision root")
    p.add_argument("--split", default="train")
    p.add_argument("--download", action="store_true", help="let torchvision download")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N images only")
    p.add_argument("--out", type=output_dir, default="runs/nvae-ebm", help="output directory")
    p.add_argument(
        "--steps", type=positive_int, default=5000, help="training iterations (authors: 5000)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="global batch (authors: 2 x 32)"
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="examples per forward/backward (gradient accumulation)",
    )
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.99, 0.999))
    p.add_argument("--weight-decay", type=nonnegative_float, default=3e-5)
    p.add_argument("--reg", type=nonnegative_float, default=0.0, help="L2 penalty on the energies")
    p.add_argument(
        "--langevin-steps", type=positive_int, default=20, help="Langevin steps in training"
    )
    p.add_argument(
        "--test-langevin-steps", type=positive_int, default=40, help="Langevin steps at test"
    )
    p.add_argument("--step-size", type=positive_float, default=6.3e-3, help="s = sqrt(delta)")
    p.add_argument("--t", type=positive_float, default=1.0, help="temperature of T_b")
    p.add_argument(
        "--target",
        choices=["exact", "anchor"],
        default="exact",
        help="Langevin target; 'anchor' is the authors' (docs/nvae.md)",
    )
    p.add_argument("--mala", action="store_true", help="Metropolis-adjusted Langevin")
    p.add_argument(
        "--clip-grad", type=positive_float, default=None, help="per-chain gradient clip"
    )
    p.add_argument("--nef", type=positive_int, default=200, help="energy MLP width")
    p.add_argument("--channels", type=positive_int, default=64, help="energy conv channels")
    p.add_argument(
        "--joint-prior",
        action="store_true",
        help="also fine-tune NVAE's prior cells (dec_sampler), supplement Eq. 6",
    )
    p.add_argument("--prior-lr", type=positive_float, default=None, help="their lr (default --lr)")
    p.add_argument(
        "--readjust-bn",
        type=nonnegative_int,
        default=0,
        metavar="ITERS",
        help="re-estimate NVAE's BN statistics at --t first (NVAE: 500)",
    )
    add_checkpoint_every(p, default=500)
    p.add_argument(
        "--sample-every", type=nonnegative_int, default=0, help="sample grid every N steps"
    )
    p.add_argument("--num-samples", type=positive_int, default=64)
    p.add_argument(
        "--fid-samples",
        type=nonnegative_int,
        default=0,
        help="FID of N EBM-prior and N NVAE-prior samples vs N training images",
    )
    p.add_argument("--push-to-hub", metavar="REPO", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.fid_samples == 1:
        p.error("--fid-samples: a covariance needs at least 2 images (0 turns FID off)")
    if args.fid_samples and _fid.fid_backend() is None:
        p.error(
            '--fid-samples needs the Inception network: pip install "ebm-prior[fid]" '
            "(or torch-fidelity)"
        )
    return args


def energy_layers(shape: Sequence[int]) -> int:
    r"""The authors' MLP depth for a ``(c, h, w)`` group: one ``Linear`` per stride-2 conv."""

    return max(1, int(math.log2(max(shape[1:]))) - 2)


def build_prior(backbone: NVAEBackbone, args: argparse.Namespace) -> JointEBMPrior:
    r"""The authors' NVAE energy networks, recording the test-time sampler and the backbone."""

    return JointEBMPrior(
        backbone.latent_shapes,
        nef=args.nef,
        channels=args.channels,
        num_layers=[energy_layers(s) for s in backbone.latent_shapes],
        # the chain the prior is trained with (what the OOD scores' chains reuse); the longer
        # test-time chain is an option of the sampling commands
        sampler_config={
            "step_size": args.step_size, "steps": args.langevin_steps, "t": args.t,
            "target": args.target, "mala": args.mala, "clip_grad": args.clip_grad,
        },
        backbone=backbone.fingerprint(),
    )  # fmt: skip


def _setup_distributed(args: argparse.Namespace) -> torch.device:
    if "RANK" not in os.environ:
        return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is None and torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(args.device or "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def sample(
    prior: JointEBMPrior | None,
    backbone: NVAEBackbone,
    n: int,
    args: argparse.Namespace,
    seed: int,
    batch_size: int = 32,
) -> torch.Tensor:
    r"""Decoded samples :math:`(n, C, H, W)` in [0, 1]: the NVAE prior when ``prior`` is None,
    else ``--test-langevin-steps`` of eps-space Langevin from the same starting noise."""

    g = torch.Generator(backbone.device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        eps = backbone.sample_eps(min(batch_size, n - start), generator=g)
        if prior is None:
            with torch.no_grad():
                z = backbone.eps_to_z(eps, args.t)
        else:
            z = EpsLangevin(
                prior, backbone, step_size=args.step_size, steps=args.test_langevin_steps,
                t=args.t, target=args.target, mala=args.mala, clip_grad=args.clip_grad,
                generator=g, trace=False,
            )(eps).z  # fmt: skip
        with torch.no_grad():
            out.append(backbone.decode(z).cpu())
    return torch.cat(out)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    require("matplotlib", "examples", "the sample grids")
    device = _setup_distributed(args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        return _run(args, device, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device: torch.device, rank: int) -> dict:
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    backbone = NVAEBackbone.from_checkpoint(args.checkpoint, args.nvae_root, device=device)
    if args.readjust_bn:
        g = torch.Generator(device).manual_seed(args.seed)
        bs = args.chunk_size or args.batch_size
        backbone.readjust_bn(args.readjust_bn, bs, args.t, generator=g, progress=rank == 0)
    data = load_images(args.data, args.data_root, args.split, args.download, args.limit)
    data = fit_to(data, backbone.x_shape, seed=args.seed)
    if rank == 0:
        print(
            f"NVAE {args.checkpoint}: {backbone.num_groups} groups, "
            f"{sum(math.prod(s) for s in backbone.latent_shapes)} latent dims; "
            f"{len(data)} images {tuple(data.shape[1:])}"
        )
    prior = build_prior(backbone, args).to(device)

    def on_step(trainer: TwoStageTrainer, stats: dict) -> None:
        if args.sample_every and trainer.step % args.sample_every == 0:
            x = sample(trainer.prior, backbone, min(args.num_samples, 64), args, args.seed)
            path = os.path.join(args.out, f"samples_step{trainer.step:06d}.png")
            save_grid(path, x, title=f"EBM prior, step {trainer.step}")

    trainer = TwoStageTrainer(
        prior, backbone, data,
        batch_size=args.batch_size, chunk_size=args.chunk_size, lr=args.lr,
        betas=tuple(args.betas), weight_decay=args.weight_decay, reg=args.reg,
        langevin_steps=args.langevin_steps, step_size=args.step_size, t=args.t,
        target=args.target, mala=args.mala, clip_grad=args.clip_grad,
        backbone_prior_params=backbone.prior_parameters() if args.joint_prior else None,
        backbone_prior_lr=args.prior_lr, seed=args.seed,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress, on_step=on_step,
    )  # fmt: skip
    history = trainer.fit(args.steps)
    result: dict = {"history": history, "out": args.out, "rank": rank}
    if rank != 0:
        return result

    prior.eval().requires_grad_(False)
    if args.joint_prior or args.readjust_bn:
        # the NVAE changed (fine-tuned prior cells, new BN statistics): write it next to the
        # prior, in train.py's layout, and bind the prior to that file
        path = os.path.join(args.out, "nvae", "checkpoint.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(backbone, backbone.args, path)
        backbone.checkpoint_hash = file_sha256(path)
        prior.backbone = backbone.fingerprint()
        print(f"wrote the changed NVAE to {path}: sample with --checkpoint {path}")
    prior_dir = os.path.join(args.out, "ebm-prior")
    prior.save_pretrained(prior_dir)
    n = args.num_samples
    base = sample(None, backbone, n, args, args.seed + 1)
    ebm = sample(prior, backbone, n, args, args.seed + 1)
    save_npz(os.path.join(args.out, "samples.npz"), ebm)
    pairs = torch.stack([base[:32], ebm[:32]], 1).flatten(0, 1)
    title = "same noise: NVAE prior (odd columns) | EBM prior (even columns)"
    save_grid(os.path.join(args.out, "samples.png"), pairs, nrow=8, title=title)
    metrics: dict[str, float] = {}
    if args.fid_samples:
        real = data[torch.randperm(len(data))[: args.fid_samples]]
        k = args.fid_samples
        metrics["fid_nvae_prior"] = _fid.fid(
            real, sample(None, backbone, k, args, args.seed + 2), device
        )
        metrics["fid_ebm_prior"] = _fid.fid(
            real, sample(prior, backbone, k, args, args.seed + 2), device
        )
        print(json.dumps(metrics))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        last = history[-1] if history else {}
        json.dump({**metrics, "steps": trainer.step, "last_step": last}, f, indent=2)
    if args.push_to_hub:
        from ebm_prior import push_prior

        named = os.path.sep not in args.data and not args.data.endswith(".npz")
        url = push_prior(prior, args.push_to_hub, backbone=backbone, metrics=metrics or None,
                         datasets=[args.data] if named else None)  # fmt: skip
        print(f"pushed to {url}")
    seconds = [h["seconds"] for h in history[1:]] or [h["seconds"] for h in history]
    if seconds:
        print(f"{trainer.step} steps, {sum(seconds) / len(seconds):.3f} s/iteration")
    print(f"wrote {prior_dir}, samples.npz and samples.png to {args.out}")
    result.update(prior=prior, prior_dir=prior_dir, samples=ebm, base=base, metrics=metrics)
    return result


if __name__ == "__main__":
    main()
