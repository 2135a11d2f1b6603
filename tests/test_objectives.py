"""Energies and objectives: float64 gradient checks and exact identities."""

import pytest
import torch

from ebm_prior import (
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
    backbone_prior_loss,
    ebm_loss,
    joint_loss,
    two_stage_loss,
)


@pytest.fixture
def f64():
    torch.manual_seed(0)
    vae = HierarchicalVAE(latent_dims=(3, 4), hidden=8, num_layers=1).double().eval()
    prior = JointEBMPrior(vae.latent_shapes, nef=6, num_layers=2).double()
    return vae, prior


@pytest.mark.parametrize("shapes", [[(3,), (5,)], [(2, 8, 8), (4,)], [(3, 4, 4)]])
def test_gradcheck_energies(shapes):
    torch.manual_seed(0)
    prior = JointEBMPrior(shapes, nef=5, num_layers=2, channels=3).double()
    z = [torch.randn(2, *s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *z: prior(list(z)), z)
    assert torch.autograd.gradcheck(lambda *z: prior.energies(list(z)), z)


def test_gradcheck_eps_space_target(f64):
    vae, prior = f64
    eps = [e.requires_grad_(True) for e in vae.sample_eps(3)]
    for target in ("exact", "anchor"):
        s = EpsLangevin(prior, vae, step_size=0.1, steps=1, target=target)
        assert torch.autograd.gradcheck(lambda *e, s=s: s.log_density(list(e)), eps)


def test_gradcheck_backbone_maps(f64):
    vae, _ = f64
    eps = [e.requires_grad_(True) for e in vae.sample_eps(3)]
    assert torch.autograd.gradcheck(lambda *e: tuple(vae.eps_to_z(list(e), 0.8)), eps)
    assert torch.autograd.gradcheck(lambda *z: vae.log_prior(list(z)), eps)


def test_ebm_loss_gradient_is_contrastive(f64):
    r""":math:`\nabla_a \mathcal{L}_a = \mathbb{E}_-[\nabla f] - \mathbb{E}_+[\nabla f]`,
    checked sample by sample in float64."""

    _, prior = f64
    zp = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)]
    zn = [torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    out = ebm_loss(prior, zp, zn)
    grads = torch.autograd.grad(out.loss, list(prior.parameters()))

    def mean_grad(z):
        acc = [torch.zeros_like(p) for p in prior.parameters()]
        n = z[0].shape[0]
        for i in range(n):
            g = torch.autograd.grad(prior([zi[i : i + 1] for zi in z]).sum(), prior.parameters())
            acc = [a + gi / n for a, gi in zip(acc, g)]
        return acc

    expected = [n - p for n, p in zip(mean_grad(zn), mean_grad(zp))]
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(out.loss, out.f_neg - out.f_pos)


def test_objectives_gradcheck_and_detach(f64):
    vae, prior = f64
    x = (torch.rand(3, 1, 8, 8) > 0.5).double()
    zn = [z.detach().requires_grad_(True) for z in vae.eps_to_z(vae.sample_eps(3))]
    torch.manual_seed(1)
    post = vae.posterior(x)
    out = joint_loss(prior, vae, x, zn, posterior=post)
    out.loss.backward()
    assert all(z.grad is None for z in zn), "negatives must be detached"
    assert all(p.grad is not None for p in prior.parameters())
    assert all(p.grad is not None for p in vae.encoder_x.parameters())
    manual = (
        -(
            vae.log_likelihood(x, post.z) + prior(post.z) + vae.log_prior(post.z) - post.log_q
        ).mean()
        + (prior(zn) + vae.log_prior(zn)).mean()
    )
    torch.testing.assert_close(out.loss, manual)

    zp = [torch.randn(3, d, dtype=torch.float64, requires_grad=True) for d in (3, 4)]
    assert torch.autograd.gradcheck(
        lambda *z: backbone_prior_loss(vae, list(z), [zi.detach() for zi in zn]).loss, zp
    )
    vae.zero_grad()
    pl = backbone_prior_loss(vae, zp, zn)
    torch.testing.assert_close(pl.loss, pl.log_p_neg - pl.log_p_pos)

    prior.zero_grad()
    ts = two_stage_loss(prior, vae, x, zn)
    vae.zero_grad()
    ts.loss.backward()
    assert all(p.grad is None for p in vae.parameters()), "two-stage: the backbone is frozen"


def test_energy_regulariser(f64):
    _, prior = f64
    zp = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)]
    zn = [torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    plain, reg = ebm_loss(prior, zp, zn), ebm_loss(prior, zp, zn, reg=0.5)
    expected = plain.loss + 0.5 * ((prior(zp) ** 2).mean() + (prior(zn) ** 2).mean())
    torch.testing.assert_close(reg.loss, expected)
    torch.testing.assert_close(reg.f_pos, plain.f_pos)
