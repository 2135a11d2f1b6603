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

    zp = [torch.randn(3, d, dtype=torch.float64, requires_grad=True) for d in (3, 4)]
    assert torch.autograd.gradcheck(
        lambda *z: backbone_prior_loss(vae, list(z), [zi.detach() for zi in zn]).loss, zp
    )
    vae.zero_grad()
    pl = backbone_prior_loss(vae, zp, zn)
    torch.testing.assert_close(pl.loss, pl.log_p_neg - pl.log_p_pos)
    pl.loss.backward()
    assert all(z.grad is not None for z in zp), "positives keep their gradient"
    assert all(z.grad is None for z in zn), "negatives must be detached"

    prior.zero_grad()
    ts = two_stage_loss(prior, vae, x, zn)
    vae.zero_grad()
    ts.loss.backward()
    assert all(p.grad is None for p in vae.parameters()), "two-stage: the backbone is frozen"


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def test_joint_loss_gradient_per_parameter_group(f64):
    r"""The joint objective's gradient is, parameter group by parameter group: the contrastive
    EBM gradient (:func:`ebm_loss`) for :math:`a`; supplement Eq. 6 (:func:`backbone_prior_loss`)
    for the backbone prior; :math:`-\nabla \log p(x \mid z^+)` for the decoder; and the
    negative Gaussian-prior ELBO's gradient (the backbone's own ``elbo``) minus
    :math:`\nabla f_a(z^+)` for the encoder."""

    vae, prior = f64
    x = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    zn = [z.detach() for z in vae.eps_to_z(vae.sample_eps(5))]
    torch.manual_seed(1)
    post = vae.posterior(x)
    out = joint_loss(prior, vae, x, zn, posterior=post)
    torch.manual_seed(1)  # the same posterior sample, through the backbone's own ELBO
    elbo = vae.elbo(x)
    torch.testing.assert_close(out.elbo, elbo.mean())

    energy, backbone_prior = list(prior.parameters()), list(vae.prior_nets.parameters())
    decoder = list(vae.decoder.parameters())
    encoder = [*vae.encoder_x.parameters(), *vae.encoder_z.parameters()]
    assert len(backbone_prior + decoder + encoder) == len(list(vae.parameters()))
    z_sg = [z.detach() for z in post.z]
    expected = [
        (energy, ebm_loss(prior, post.z, zn).loss),
        (backbone_prior, backbone_prior_loss(vae, z_sg, zn).loss),
        (decoder, -vae.log_likelihood(x, z_sg).mean()),
        (encoder, -elbo.mean() - prior(post.z).mean()),
    ]
    for params, loss in expected:
        for g, e in zip(_grads(out.loss, params), _grads(loss, params)):
            torch.testing.assert_close(g, e)
        assert any(e.abs().sum() > 0 for e in _grads(loss, params))


def test_joint_loss_regulariser_trains_only_the_energy(f64):
    r"""The energy penalty :math:`\lambda f(z^+)^2` is computed on detached :math:`z^+`: with
    :math:`\lambda > 0` the encoder's gradient is the one at :math:`\lambda = 0`, while the
    energy's gradient changes (to :func:`ebm_loss`'s with the same :math:`\lambda`)."""

    vae, prior = f64
    x = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    zn = [z.detach() for z in vae.eps_to_z(vae.sample_eps(5))]
    torch.manual_seed(1)
    post = vae.posterior(x)
    encoder = [*vae.encoder_x.parameters(), *vae.encoder_z.parameters()]
    energy = list(prior.parameters())

    def grads(reg, params):
        return _grads(joint_loss(prior, vae, x, zn, posterior=post, reg=reg).loss, params)

    for g0, g1 in zip(grads(0.0, encoder), grads(0.5, encoder)):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)
    with_reg = grads(0.5, energy)
    assert any(not torch.allclose(a, b) for a, b in zip(grads(0.0, energy), with_reg))
    for g, e in zip(with_reg, _grads(ebm_loss(prior, post.z, zn, reg=0.5).loss, energy)):
        torch.testing.assert_close(g, e)


def test_energy_regulariser(f64):
    _, prior = f64
    zp = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)]
    zn = [torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    plain, reg = ebm_loss(prior, zp, zn), ebm_loss(prior, zp, zn, reg=0.5)
    expected = plain.loss + 0.5 * ((prior(zp) ** 2).mean() + (prior(zn) ** 2).mean())
    torch.testing.assert_close(reg.loss, expected)
    torch.testing.assert_close(reg.f_pos, plain.f_pos)
    # the penalty trains the energy only: no gradient reaches the samples
    zs = [z.clone().requires_grad_(True) for z in zp + zn]
    ebm_loss(prior, zs[:2], zs[2:], reg=0.5).loss.backward()
    assert all(z.grad is None for z in zs)
