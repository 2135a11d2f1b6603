r"""Seconds per iteration of two-stage fine-tuning on a real NVAE, against the floor.

    NVAE_ROOT=/path/to/NVAE python benchmarks/nvae_finetune.py                 # CIFAR-10 size
    NVAE_ROOT=/path/to/NVAE python benchmarks/nvae_finetune.py --device cuda --batch 32
    NVAE_ROOT=/path/to/NVAE python benchmarks/nvae_finetune.py --size tiny    # seconds on a CPU

Builds NVAE's ``model.AutoEncoder`` from your clone with random weights (``--size cifar10``: the
architecture of NVAE's CIFAR-10 training command, 30 groups of 20x16x16; ``--size tiny``: a
2-scale MNIST model) and the authors' energy networks, then times, interleaved repeat by repeat:

- **trainer**: one ``TwoStageTrainer.train_step`` (``--langevin-steps`` of eps-space Langevin for
  the negatives, the posterior for the positives, the loss, backward and Adam);
- **floor**: the same work written out by hand without the trainer: the sampler's steps
  (``EpsLangevin``), one posterior forward, one energy forward/backward.

It prints the median seconds per iteration and the ratio trainer/floor (the trainer's own
overhead: keyed generators, ``fork_rng``, statistics, the finiteness checks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from ebm_prior import EpsLangevin, TwoStageTrainer, ebm_loss
from ebm_prior.adapters.nvae import NVAEBackbone, nvae_args
from ebm_prior.apps.finetune_nvae import build_prior

SIZES = {
    # NVAE's README, CIFAR-10 command (8 GPUs, batch 32 each)
    "cifar10": dict(
        dataset="cifar10", num_channels_enc=128, num_channels_dec=128, num_latent_scales=1,
        num_groups_per_scale=30, num_preprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_blocks=1, num_postprocess_cells=2, num_cell_per_cond_enc=2,
        num_cell_per_cond_dec=2, num_latent_per_group=20, num_nf=1, use_se=True,
        res_dist=True,
    ),
    "tiny": dict(
        dataset="mnist", num_channels_enc=8, num_channels_dec=8, num_latent_scales=2,
        num_groups_per_scale=2, num_preprocess_blocks=1, num_preprocess_cells=1,
        num_postprocess_blocks=1, num_postprocess_cells=1, num_cell_per_cond_enc=1,
        num_cell_per_cond_dec=1, num_latent_per_group=5, num_nf=1, ada_groups=True,
    ),
}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="cifar10")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--langevin-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = NVAEBackbone.build(nvae_args(**SIZES[args.size]), device=device)
    ns = argparse.Namespace(
        nef=200, channels=64, step_size=6.3e-3, test_langevin_steps=40, t=1.0,
        target="exact", mala=False, clip_grad=None, langevin_steps=args.langevin_steps,
    )  # fmt: skip
    prior = build_prior(backbone, ns).to(device)
    n = args.batch * (args.repeats + 2)
    data = torch.rand(n, *backbone.x_shape, device=device)
    if backbone.nvae.dataset == "mnist":
        data = data.bernoulli()
    trainer = TwoStageTrainer(
        prior, backbone, data, batch_size=args.batch, lr=1e-4, betas=(0.99, 0.999),
        weight_decay=3e-5, langevin_steps=args.langevin_steps, step_size=6.3e-3, progress=False,
    )  # fmt: skip
    sampler = EpsLangevin(
        prior, backbone, step_size=6.3e-3, steps=args.langevin_steps, trace=False
    )
    opt = trainer.optimizer

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def floor(x: torch.Tensor) -> None:
        z_neg = sampler(backbone.sample_eps(len(x))).z
        with torch.no_grad():
            z_pos = backbone.posterior(x).z
        opt.zero_grad()
        ebm_loss(prior, z_pos, z_neg).loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"trainer": [], "floor": []}
    trainer.train_step()  # warm-up
    floor(data[: args.batch])
    for r in range(args.repeats):
        for name in ("trainer", "floor"):
            sync()
            t0 = time.perf_counter()
            if name == "trainer":
                trainer.train_step()
            else:
                floor(data[r * args.batch : (r + 1) * args.batch])
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in backbone.parameters())
    dims = sum(int(torch.tensor(s).prod()) for s in backbone.latent_shapes)
    energy = sum(p.numel() for p in prior.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"NVAE {args.size}: {params / 1e6:.1f}M parameters, {backbone.num_groups} groups, "
        f"{dims} latent dims; energy nets {energy / 1e6:.1f}M; "
        f"{device_name}, {torch.get_num_threads()} threads"
    )
    print("| batch | Langevin steps | trainer s/it | floor s/it | trainer / floor |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.batch} | {args.langevin_steps} | {med['trainer']:.3f} | {med['floor']:.3f} | "
        f"{med['trainer'] / med['floor']:.2f} |"
    )
    return [{"batch": args.batch, **med}]


if __name__ == "__main__":
    main()
